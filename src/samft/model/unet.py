"""The baseline an ICH researcher tries first: MONAI's UNet, as in its 3D segmentation tutorials, behind `segment`."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn

from samft.model.sam3d import SegmentOutput


class UNetSegmenter(nn.Module):
    """MONAI UNet (channels 16-32-64-128-256, stride 2, two residual units, batch norm: MONAI's spleen tutorial),
    prompt-free: `segment` ignores clicks and `prompt_free`.

    image B x 1 x S x S x S (S a multiple of 16) -> one round of logits B x 1 x S x S x S; no ICH head.
    MONAI's BasicUNet costs 11x the CPU time per step at 128^3 and was too slow to compare at a CPU budget.
    """

    def __init__(self, *, channels: tuple[int, ...] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        self.net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=2, norm="batch")

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
