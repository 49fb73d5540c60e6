"""Mask decoder: a two-way transformer between prompt tokens and the image embedding, then upscaling."""

from __future__ import annotations

import torch
from torch import nn

from samft.model.attention import TokenAttention
from samft.model.layers import FeedForward, LayerNorm3d, ReluMLP


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(self, dim: int, num_heads: int, *, mlp_dim: int, downsample_rate: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate=downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, activation=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample_rate=downsample_rate)
        self.skip_first_pe = skip_first_pe

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens B x T x dim, image B x N x dim (and their positional encodings) -> updated pair."""
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)

        image_keys = image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, image_keys, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(image_keys, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks and a final token->image attention."""

    def __init__(self, *, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, num_heads, mlp_dim=mlp_dim, downsample_rate=downsample_rate, skip_first_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate=downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image, image_pe B x dim x g x g x g; tokens B x T x dim -> tokens B x T x dim, image B x g^3 x dim."""
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, image = layer(queries, image, tokens, image_pe)
        attn = self.final_attn_token_to_image(queries + tokens, image + image_pe, image)
        return self.norm_final_attn(queries + attn), image


class MaskDecoder3D(nn.Module):
    """Predicts low-resolution mask logits (4x the embedding grid) and IoU scores from prompt embeddings."""

    def __init__(
        self,
        *,
        dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int,
        iou_head_depth: int,
        iou_head_hidden_dim: int,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            ReluMLP(dim, dim, dim // 8, num_layers=3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = ReluMLP(dim, iou_head_hidden_dim, self.num_mask_tokens,
                                           num_layers=iou_head_depth)

    def forward(
        self,
        *,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings, dense B x dim x g^3; image_pe 1 x dim x g^3; sparse B x T x dim.

        Returns logits B x M x 4g x 4g x 4g and IoU scores B x M: M = 1 (mask token 0) or, with
        `multimask_output`, the other mask tokens.
        """
        batch = image_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        image_pe = image_pe.expand(batch, -1, -1, -1, -1)
        hs, image = self.transformer(image_embeddings + dense, image_pe, tokens)

        image = image.transpose(1, 2).reshape(image_embeddings.shape)
        upscaled = self.output_upscaling(image)
        selected = range(1, self.num_mask_tokens) if multimask_output else range(1)
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in selected], dim=1)
        masks = (hyper @ upscaled.flatten(2)).view(batch, len(selected), *upscaled.shape[2:])
        iou = self.iou_prediction_head(hs[:, 0])[:, list(selected)]
        return masks, iou
