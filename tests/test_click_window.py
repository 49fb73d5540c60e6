"""The one-click window of `samft.segmentation.scan_logits`: a scan shorter than the window along an axis is padded
there on both sides, as training's SpatialPad pads it, and the click and the output stay on the scan's voxels."""

from __future__ import annotations

import torch
from monai.transforms import SpatialPad
from torch import nn

from samft.segmentation import OUTSIDE_LOGIT, scan_logits


class EchoModel(nn.Module):
    """`segment_points` returns its window as the logits and records the window and the clicks it got."""

    def segment_points(self, image: torch.Tensor, *, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.seen = (image.clone(), coords.clone(), labels.clone())
        return image


def test_a_click_window_pads_a_short_axis_on_both_sides_as_training_does() -> None:
    volume = torch.rand(1, 1, 40, 25, 20, generator=torch.Generator().manual_seed(0)) + 1.0  # air is -1
    model = EchoModel()
    clicks = torch.tensor([[10.0, 15.0, 5.0, 1.0]], dtype=torch.float64)
    logits = scan_logits(model, volume, roi_size=(32, 32, 32), overlap=0.5, air=-1.0, clicks=clicks)
    window, coords, labels = model.seen
    # x is longer than the window (which starts at 0 around x = 10); y and z are padded as training pads them
    expected = SpatialPad(spatial_size=(40, 32, 32), value=-1.0)(volume[0])[:, :32]
    torch.testing.assert_close(window[0], expected, rtol=0, atol=0)
    x, y, z = coords[0, 0].long().tolist()
    assert window[0, 0, x, y, z] == volume[0, 0, 10, 15, 5] and labels.tolist() == [[1]]
    assert logits.shape == volume.shape
    torch.testing.assert_close(logits[..., :32, :, :], volume[..., :32, :, :], rtol=0, atol=0)
    assert (logits[..., 32:, :, :] == OUTSIDE_LOGIT).all()
