"""The baseline an ICH researcher tries first: MONAI's BasicUNet behind the same `segment` API."""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

from samft.model.sam3d import SegmentOutput


class UNetSegmenter(nn.Module):
    """MONAI BasicUNet (features 16-32-64-128-256-16 by default), prompt-free: `segment` ignores clicks.

    image B x 1 x S x S x S -> one round of logits B x 1 x S x S x S; no ICH head (ich_logit None).
    """

    def __init__(self, *, img_size: int = 128, features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)) -> None:
        super().__init__()
        self.img_size = img_size
        self.net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=features)

    def segment(
        self,
        image: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        num_clicks: int = 0,
        generator: torch.Generator | None = None,
    ) -> SegmentOutput:
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"expected image B x 1 x D x H x W, got {tuple(image.shape)}")
        logits = self.net(image)
        return SegmentOutput(logits=[logits], ich_logit=None, features=logits.new_zeros(image.shape[0], 0, 1, 1, 1))

    forward = segment
