"""Small building blocks shared by the encoder, the prompt encoder and the decoder."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

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


@lru_cache(maxsize=32)
def _linear_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """n_out x n_in weights of 1-D linear interpolation with align_corners=False, computed as F.interpolate
    computes them (source position (o + 0.5) * n_in / n_out - 0.5, clamped at 0; the last voxel repeated).
    Built outside inference mode: the cached tensor also serves later calls that autograd records."""
    with torch.inference_mode(False):
        source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        low = source.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        fraction = source - low
        rows = torch.arange(n_out)
        weights = torch.zeros(n_out, n_in, dtype=torch.float64)
        weights.index_put_((rows, low), 1 - fraction, accumulate=True)
        weights.index_put_((rows, high), fraction, accumulate=True)
        return weights.to(device, dtype)


def trilinear_resize(x: torch.Tensor, size: Sequence[int], *,
                     window: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """B x C x X x Y x Z -> B x C x size: `F.interpolate(x, size, mode="trilinear", align_corners=False)` as three
    matrix products, one per axis (equal up to float rounding).

    window: (starts B x 3, edge): only each sample's cube of `edge` output voxels from its start, B x C x edge^3
    (the resized volume cropped there, from the interpolation matrices' rows of the cube alone).

    Why not F.interpolate: on a CPU its forward + backward is 10-20x slower at the sizes of SAM-Med3D's output
    upsampling (32^3 or 64^3 to 128^3), where it took about 40 % of a training step (benchmarks/upsampling.py).
    """
    weights = [_linear_weights(n, int(s), x.device, x.dtype) for n, s in zip(x.shape[2:], size, strict=True)]
    if window is None:
        return _resize(x, weights)
    starts, edge = window
    return torch.cat([_resize(x[i:i + 1], [w[a:a + edge] for w, a in zip(weights, start, strict=True)])
                      for i, start in enumerate(starts.tolist())])


def _resize(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """x B x C x X x Y x Z and per-axis weights X' x X, Y' x Y, Z' x Z -> B x C x X' x Y' x Z'."""
    b, c, nx, _, _ = x.shape
    wx, wy, wz = weights
    x = x @ wz.T  # B x C x X x Y x Z'
    x = wy @ x  # B x C x X x Y' x Z'
    out = wx @ x.reshape(b * c, nx, -1)  # BC x X' x Y'Z'
    return out.reshape(b, c, wx.shape[0], wy.shape[0], wz.shape[0])
