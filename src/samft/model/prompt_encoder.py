"""Prompt encoder: point clicks and a low-resolution mask -> sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from samft.model.layers import LayerNorm3d


class RandomFourierPE(nn.Module):
    """Positional encoding with random Gaussian frequencies: ... x 3 coordinates in [0, 1] -> ... x 3F."""

    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_feats))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([proj.sin(), proj.cos(), proj.sin()], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        """Encoding of the voxel centres of a size^3 grid: 3F x size x size x size.

        The first two coordinates are swapped with respect to point prompts (the released model's
        convention, which its weights depend on): channel 0 encodes the second grid axis, 1 the first.
        """
        device = self.positional_encoding_gaussian_matrix.device
        centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        first, second, third = torch.meshgrid(centres, centres, centres, indexing="ij")
        return self(torch.stack([second, first, third], dim=-1)).movedim(-1, 0)


class PromptEncoder3D(nn.Module):
    """Embeds clicks (sparse tokens) and a low-resolution mask prompt (dense grid).

    Clicks are voxel indices (float) in the axis order of the S^3 input; the mask prompt is
    B x 1 x 4g x 4g x 4g logits, g the encoder's token grid.
    """

    def __init__(self, *, dim: int, grid_size: int, img_size: int, mask_in_chans: int) -> None:
        super().__init__()
        if dim % 3:
            raise ValueError(f"prompt embedding width {dim} is not divisible by 3")
        self.dim = dim
        self.grid_size = grid_size
        self.img_size = img_size
        self.pe_layer = RandomFourierPE(dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(2))  # negative, positive
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: 1 x dim x g x g x g."""
        return self.pe_layer.grid(self.grid_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords B x N x 3 voxel indices, labels B x N (1 pos, 0 neg, -1 pad) -> B x (N + 1) x dim.

        One not-a-point token is appended, as the released model was trained with.
        """
        coords = torch.cat([coords + 0.5, coords.new_zeros(coords.shape[0], 1, 3)], dim=1)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)[..., None]
        pe = self.pe_layer(coords.float() / self.img_size)
        neg, pos = (e.weight[0] for e in self.point_embeddings)
        pe = pe + torch.where(labels == 1, pos, torch.where(labels == 0, neg, torch.zeros_like(pos)))
        return torch.where(labels == -1, self.not_a_point_embed.weight[0], pe)

    def forward(
        self,
        *,
        batch_size: int,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_prompt: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> sparse B x T x dim (T = 0 without points), dense B x dim x g x g x g."""
        if points is None:
            sparse = self.no_mask_embed.weight.new_zeros(batch_size, 0, self.dim)
        else:
            sparse = self.embed_points(*points)
        if mask_prompt is None:
            g = self.grid_size
            dense = self.no_mask_embed.weight.view(1, -1, 1, 1, 1).expand(batch_size, -1, g, g, g)
        else:
            dense = self.mask_downscaling(mask_prompt)
        return sparse, dense
