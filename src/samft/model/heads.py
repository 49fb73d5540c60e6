"""Heads on the image-encoder features: visual tokens for a downstream language model, ICH presence."""

from __future__ import annotations

import torch
from torch import nn


class RepresentationHead(nn.Module):
    """Encoder features B x C x g x g x g -> visual tokens B x g^3 x dim (a two-layer MLP per token).

    `in_channels` is the width of the encoder the head is attached to, so any encoder variant works.
    """

    def __init__(self, *, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_channels, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.flatten(2).transpose(1, 2))


class PresenceHead(nn.Module):
    """Visual tokens B x N x dim -> one logit per volume (B): mean-pool, LayerNorm, linear."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(tokens.mean(dim=1))).squeeze(-1)
