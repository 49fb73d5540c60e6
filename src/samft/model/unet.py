"""The baseline an ICH researcher tries first: MONAI's UNet behind `segment`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import UNet
from torch import nn

from samft.model.sam3d import SegmentOutput


@dataclass(frozen=True)
class UNetSpec:
    """MONAI UNet settings: `channels` per level, `strides` between levels (one int or three per axis, so thick
    slices can keep their axis, as nnU-Net's anisotropic plans do), residual units per block, `norm`. Each patch
    side must be a multiple of the product of the strides on its axis (`samft.config.unet_divisor`)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[tuple[int, int, int], ...] = ((2, 2, 1), (2, 2, 2), (2, 2, 2))
    num_res_units: int = 0
    norm: str = "instance"


class UNetSegmenter(nn.Module):
    """MONAI UNet, prompt-free: `segment` ignores clicks and `prompt_free`.

    image B x 1 x D x H x W (each side a multiple of the strides' product on its axis) -> one round of logits
    B x 1 x D x H x W; no ICH head and no encoder to export.
    """

    takes_clicks = False
    exports_encoder = False
    has_unused_parameters = False
    ich_heads: tuple[str, ...] = ()

    def __init__(self, spec: UNetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or UNetSpec()
        self.net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=self.spec.channels,
                        strides=self.spec.strides, num_res_units=self.spec.num_res_units, norm=self.spec.norm)

    def segment(
        self,
        image: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        num_clicks: int = 0,
        generator: torch.Generator | None = None,
        prompt_free: bool = False,
    ) -> SegmentOutput:
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"expected image B x 1 x D x H x W, got {tuple(image.shape)}")
        logits = self.net(image)
        return SegmentOutput(logits=[logits], ich_logit=None, features=logits.new_zeros(image.shape[0], 0, 1, 1, 1))

    forward = segment
