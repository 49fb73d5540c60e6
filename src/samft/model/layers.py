"""Small building blocks shared by the encoder, the prompt encoder and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of B x C x D x H x W."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class FeedForward(nn.Module):
    """Two linear layers with an activation between them: ... x dim -> ... x dim."""

    def __init__(self, dim: int, hidden_dim: int, *, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class ReluMLP(nn.Module):
    """`num_layers` linear layers with ReLU between them: ... x in_dim -> ... x out_dim."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)
