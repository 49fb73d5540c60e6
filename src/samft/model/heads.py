"""Heads on the image-encoder features: visual tokens for a downstream language model, ICH presence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn

from samft.model.head_crop import Box
from samft.model.layers import trilinear_resize


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


class RefinementHead(nn.Module):
    """Lifts the mask decoder's 4-voxel grid towards full crop resolution, guided by the clicks.

    image B x 1 x S x S x S, the decoder logits B x 1 x S/4 x S/4 x S/4 and the clicks (or None) -> logits
    B x 1 x S x S x S: the official trilinear upsampling of the decoder logits plus a correction,
    UNet(image, coarse, guidance), computed on the grid of S/`downsample` (the CT average-pooled, the logits
    upsampled) by a small MONAI UNet (instance norm) and upsampled to S. The UNet's output layer starts at zero,
    so an untrained head gives exactly the official output, and it learns at full scale from the first step (a
    zero-initialised gate would need about 1/lr steps to open under Adam).
    Guidance, as in MONAI's DeepEdit: one channel for the positive clicks and one for the negative ones, each a
    Gaussian of `guidance_sigma` grid voxels around every click (zero without clicks: the prompt-free mode). The
    decoder sees a click only through its 6 mm token grid; the guidance puts it on the head's own grid, so a click
    on a bleed the decoder missed still reaches the output.
    `downsample=2` (a 3 mm grid at 1.5 mm input) costs an eighth of full resolution on a CPU; the
    upsample-then-threshold ceiling of that grid is about Dice 0.90 on real hemorrhage masks, against 0.66 for
    the decoder's 6 mm grid. `full_resolution=True` keeps that cost and that grid but loses no voxel: the UNet
    takes each cell's d^3 CT voxels as channels (MONAI's pixel unshuffle) instead of their mean, and adds d^3
    output channels put back at full resolution (pixel shuffle) to the upsampled correction (ceiling 0.96).
    The default widths (16-32-64-128, 0.49 M parameters, under 1 % of the released model) give the head the depth
    to delineate what the decoder's 6 mm grid only locates; a second level of width costs about 30 % more than
    the 8-16-32 head on a CPU, as the deep levels are small.
    The UNet's first convolution takes its three inputs apart and sums (equal to convolving their concatenation):
    the CT's share (`image_term`) needs no input gradient and is the same in every round of a training step, so
    `SamMed3D.segment` computes it once; the guidance's share is skipped without clicks. On a CPU that makes a
    training step about 1.24x faster (benchmarks/refinement_head.py).
    `cell_mlp` > 0 (full resolution only) adds a last, per-voxel stage: the UNet's finest nonlinear features lie
    on a grid of 2d voxels, and its output layer is linear, so it cannot threshold each voxel's own intensity.
    An MLP of `cell_mlp` hidden units, applied to every d^3 cell alone (1 x 1 x 1 convolutions on the grid of
    S/d), takes the cell's d^3 CT voxels, its d^3 logits so far and the UNet's output channels, and adds a
    correction to each of the d^3 voxels. Its output layer starts at zero too.
    """

    def __init__(self, *, channels: tuple[int, ...] = (16, 32, 64, 128), downsample: int = 2,
                 guidance_sigma: float = 2.0, full_resolution: bool = False, norm: str = "instance",
                 cell_mlp: int = 0) -> None:
        super().__init__()
        self.downsample = downsample
        self.guidance_sigma = guidance_sigma
        self.full_resolution = full_resolution
        # full resolution: the CT's d^3 voxels of each grid cell as d^3 channels in, and d^3 channels out that are
        # put back in place, beside the one trilinearly upsampled correction channel
        cells = downsample**3 if full_resolution else 0
        self.net = UNet(spatial_dims=3, in_channels=max(cells, 1) + 3, out_channels=1 + cells, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=0, norm=norm)
        output = [m for m in self.net.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)][-1]
        assert output.out_channels == 1 + cells, "the UNet's last convolution must be its output layer"
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        self.image_channels = max(cells, 1)
        self.cell_mlp = None
        if cell_mlp:
            if not full_resolution:
                raise ValueError("cell_mlp needs full_resolution=True (it reads each cell's own voxels)")
            # LeakyReLU, not the UNet's PReLU: in a profile of an earlier form of this stage on a CPU, PReLU's
            # backward cost about 5 % of a training step
            inputs = 3 * cells + 1  # the cell's d^3 logits and d^3 CT voxels, the UNet's 1 + d^3 output channels
            self.cell_mlp = nn.Sequential(nn.Conv3d(inputs, cell_mlp, 1), nn.LeakyReLU(0.01),
                                          nn.Conv3d(cell_mlp, cells, 1))
            nn.init.zeros_(self.cell_mlp[-1].weight)
            nn.init.zeros_(self.cell_mlp[-1].bias)
        first = self.net.model[0]
        assert len(self.net.model) == 3 and isinstance(first, Convolution) and isinstance(first.conv, nn.Conv3d) \
            and first.conv.groups == 1 and first.conv.padding_mode == "zeros", \
            "the UNet must start with one plain convolution (down, skip, up), which forward splits by input"

    def forward(self, image: torch.Tensor, low_res: torch.Tensor,
                clicks: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                image_term: torch.Tensor | None = None, box: Box | None = None) -> torch.Tensor:
        """clicks: coords B x N x 3 (voxel indices of the S^3 image) and labels B x N (1 positive, 0 negative,
        any other value ignored, e.g. NO_CLICK padding); image_term: `self.image_term` of the image (of its box)
        when the caller has it already (the rounds of one step); box: refine only each sample's box (training with
        `model.refine_crop`), giving B x 1 x size^3 logits."""
        full, d = image.shape[2:], self.downsample
        size = full if box is None else (box.size,) * 3
        grid = [s // d for s in size]
        if image_term is None:
            image_term = self.image_term(image if box is None else box.crop(image))
        coarse_size = [s // d for s in full]
        if box is None:
            coarse, upsampled = trilinear_resize(low_res, coarse_size), trilinear_resize(low_res, full)
        else:  # the box's part of the upsampled logits only
            coarse = trilinear_resize(low_res, coarse_size, window=box.window(scale=d))
            upsampled = trilinear_resize(low_res, full, window=box.window())
            if clicks is not None:
                clicks = (clicks[0] - box.starts[:, None].to(clicks[0].dtype), clicks[1])
        coarse = coarse.to(image_term.dtype)
        c = self.image_channels
        first = image_term + self._first_convolution(coarse, slice(c, c + 1))
        if clicks is not None and clicks[0].shape[1] > 0:  # without clicks the guidance is zero
            guidance = self.guidance(clicks, batch=image.shape[0], grid=grid, like=coarse)
            first = first + self._first_convolution(guidance, slice(c + 1, c + 3))
        correction = self._after_first_convolution(first)
        refined = upsampled + trilinear_resize(correction[:, :1], size)
        if self.full_resolution:
            refined = refined + pixelshuffle(correction[:, 1:], spatial_dims=3, scale_factor=d)
        if self.cell_mlp is not None:
            logit_cells = pixelunshuffle(refined, spatial_dims=3, scale_factor=d)
            ct_cells = pixelunshuffle(image if box is None else box.crop(image), spatial_dims=3, scale_factor=d)
            step = self.cell_mlp(torch.cat([logit_cells, ct_cells.to(refined.dtype), correction], dim=1))
            refined = refined + pixelshuffle(step, spatial_dims=3, scale_factor=d)
        return refined

    def image_term(self, image: torch.Tensor) -> torch.Tensor:
        """The CT's share of the UNet's first convolution, with its bias: image B x 1 x S x S x S -> B x C1 x
        (S/2d)^3 (C1 the UNet's first width). The CT goes in as each grid cell's d^3 voxels (full resolution) or
        their mean."""
        d = self.downsample
        if self.full_resolution:
            small = pixelunshuffle(image, spatial_dims=3, scale_factor=d)
        else:
            small = F.avg_pool3d(image, d) if d > 1 else image
        term = self._first_convolution(small, slice(0, self.image_channels))
        bias = self.net.model[0].conv.bias
        return term if bias is None else term + bias.view(1, -1, 1, 1, 1)

    def _first_convolution(self, x: torch.Tensor, channels: slice) -> torch.Tensor:
        """The UNet's first convolution restricted to its input channels `channels` (no bias): x B x k x grid."""
        conv = self.net.model[0].conv
        return F.conv3d(x, conv.weight[:, channels], None, conv.stride, conv.padding, conv.dilation)

    def _after_first_convolution(self, first: torch.Tensor) -> torch.Tensor:
        """The rest of the MONAI UNet: its first block's norm and activation, the skip connection, the up path."""
        down, skip, up = self.net.model
        return up(skip(down.adn(first)))

    def guidance(self, clicks: tuple[torch.Tensor, torch.Tensor] | None, *, batch: int, grid: list[int],
                 like: torch.Tensor) -> torch.Tensor:
        """Guidance B x 2 x grid: the largest Gaussian of the positive (channel 0) and negative (channel 1) clicks
        at each voxel, 1 at a click's own position."""
        maps = like.new_zeros(batch, 2, *grid)
        if clicks is None or clicks[0].shape[1] == 0:
            return maps
        coords, labels = clicks
        # a voxel-index click at c of the S^3 image lies at (c + 0.5) / d - 0.5 on the grid of S/d (voxel centres)
        centres = (coords.to(like.dtype) + 0.5) / self.downsample - 0.5  # B x N x 3
        axes = [torch.arange(n, device=like.device, dtype=like.dtype) for n in grid]
        squared = sum((axis.view(1, 1, *[-1 if a == i else 1 for a in range(3)])
                       - centres[..., i].view(*centres.shape[:2], 1, 1, 1)) ** 2
                      for i, axis in enumerate(axes))  # B x N x grid
        blobs = torch.exp(-squared / (2 * self.guidance_sigma ** 2))
        for channel, label in enumerate((1, 0)):
            chosen = (labels == label).to(like.dtype).view(*labels.shape, 1, 1, 1)
            maps[:, channel] = (blobs * chosen).amax(dim=1)
        return maps
