"""The 3D ViT image encoder: patch embedding, transformer blocks, convolutional neck."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from samft.model.attention import GridSelfAttention
from samft.model.layers import FeedForward, LayerNorm3d


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches: B x in_chans x S x S x S -> B x S/p x S/p x S/p x dim."""

    def __init__(self, *, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).movedim(1, -1)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block on a token grid: B x G x G x G x C -> same shape."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, key_grid: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GridSelfAttention(dim, num_heads, key_grid=key_grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder3D(nn.Module):
    """ViT image encoder with windowed and global blocks: B x in_chans x S x S x S -> B x out_chans x g x g x g.

    g = img_size // patch_size. Blocks listed in `global_attn_indexes` attend globally; the others use
    `window_size`, which must be 0 (global) or at least g: the window then holds the whole grid plus zero
    padding, as in SAM-Med3D (window 14 on an 8^3 grid).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int = 1,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        out_chans: int,
        window_size: int,
        global_attn_indexes: Sequence[int],
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = img_size // patch_size
        if 0 < window_size < grid:
            raise ValueError(f"window_size {window_size} must be 0 or >= the token grid {grid}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.grid_size = grid
        self.out_chans = out_chans
        self.gradient_checkpointing = gradient_checkpointing

        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.patch_embed = PatchEmbed3D(patch_size=patch_size, in_chans=in_chans, dim=dim)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                key_grid=grid if (i in global_attn_indexes or window_size == 0) else window_size,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.movedim(-1, 1))
