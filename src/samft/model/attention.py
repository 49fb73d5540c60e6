"""Attention layers: the encoder's grid self-attention and the decoder's token attention.

Both run through `torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_rows(table: torch.Tensor, *, query_len: int, key_len: int) -> torch.Tensor:
    """Rows of a relative-position table for every (query i, key j) pair: query_len x key_len x C.

    `table` is (2 * key_len - 1) x C, indexed by the offset i - j shifted by key_len - 1.
    """
    offsets = torch.arange(query_len, device=table.device)[:, None] - torch.arange(key_len, device=table.device)
    return table[offsets + key_len - 1]


def _pad_grid(tokens: torch.Tensor, fill: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """B x G x G x G x h x c tokens in the corner of a B x size x h x c grid filled with `fill` (h x c)."""
    grid = tokens.shape[1]
    out = fill.to(tokens.dtype).expand(tokens.shape[0], *size, *fill.shape).clone()
    out[:, :grid, :grid, :grid] = tokens
    return out


class GridSelfAttention(nn.Module):
    """Multi-head self-attention on a cubic token grid with SAM-Med3D's decomposed relative-position bias.

    The queries are the G^3 tokens of the input grid. The keys and values span a K^3 grid (K = `key_grid`
    >= G): with K > G the input is treated as zero-padded to K^3, so every padding token's query, key and
    value is the qkv bias, and all K^3 keys enter the softmax. That is exactly SAM-Med3D's windowed
    attention (a window of 14 on an 8^3 grid pads to 14^3), computed for the G^3 real query rows only;
    K = G is global attention.

    The bias reproduces how the released model broadcasts its three terms (its weights were trained so).
    With q(x, y, z) the unscaled query at grid position (x, y, z), R_a[i, j] = rel_pos_a[i - j + K - 1],
    the bias between query (x, y, z) and key (kd, kh, kw) is
        q(x, y, z) . R_d[x, kw]  +  q(x, y, kd) . R_h[y, kw]  +  q(x, y, kh) . R_w[kh, kw],
    not the textbook q(x, y, z) . (R_d[x, kd] + R_h[y, kh] + R_w[z, kw]). The last two terms read the
    queries of other tokens in the same (x, y) row, padding tokens included.
    """

    def __init__(self, dim: int, num_heads: int, *, key_grid: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.key_grid = key_grid
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * key_grid - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * key_grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * key_grid - 1, head_dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x G x G x G x C -> B x G x G x G x C."""
        batch, grid, channels = x.shape[0], x.shape[1], x.shape[-1]
        size, heads = self.key_grid, self.num_heads
        q, k, v = self.qkv(x).view(batch, grid, grid, grid, 3, heads, -1).unbind(4)
        q_rows = q  # queries of the real (x, y) rows, along z up to K (see the class docstring)
        if size > grid:
            # A zero input token's query/key/value is the qkv bias (zero without a bias).
            bias = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(3 * channels)
            bias_q, bias_k, bias_v = bias.view(3, heads, -1)
            q_rows = _pad_grid(q, bias_q, (grid, grid, size))
            k, v = _pad_grid(k, bias_k, (size,) * 3), _pad_grid(v, bias_v, (size,) * 3)

        attn_bias = self._rel_pos_bias(q, q_rows)
        q, k, v = (t.flatten(1, 3).transpose(1, 2) for t in (q, k, v))  # B x heads x tokens x c
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, grid, grid, grid, channels))

    def _rel_pos_bias(self, q: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
        """Bias from the real queries B x G x G x G x h x c and the row queries B x G x G x K x h x c.

        Returns B x h x G^3 x K^3.
        """
        batch, grid, heads, size = q.shape[0], q.shape[1], q.shape[4], self.key_grid
        rows_d = relative_rows(self.rel_pos_d, query_len=grid, key_len=size).to(q.dtype)
        rows_h = relative_rows(self.rel_pos_h, query_len=grid, key_len=size).to(q.dtype)
        rows_w = relative_rows(self.rel_pos_w, query_len=size, key_len=size).to(q.dtype)
        # Contiguous factors make the broadcast sums contiguous, so the final view needs no copy.
        term_d = torch.einsum("bxyzhc,xkc->bhxyzk", q, rows_d).contiguous()  # [x, y, z, kw]
        term_h = torch.einsum("bxyshc,ykc->bhxysk", q_rows, rows_h).contiguous()  # [x, y, kd, kw]
        term_w = torch.einsum("bxyshc,skc->bhxysk", q_rows, rows_w).contiguous()  # [x, y, kh, kw]
        rows_bias = term_h[..., :, None, :] + term_w[..., None, :, :]  # B x h x G x G x K x K x K
        bias = term_d[..., None, None, :] + rows_bias[:, :, :, :, None]
        return bias.view(batch, heads, grid**3, size**3)


class TokenAttention(nn.Module):
    """Multi-head attention with q/k/v projected down to dim // downsample_rate channels.

    q: B x Nq x dim, k and v: B x Nk x dim -> B x Nq x dim.
    """

    def __init__(self, dim: int, num_heads: int, *, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(proj(t)) for proj, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """B x N x (h c) -> B x h x N x c."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
