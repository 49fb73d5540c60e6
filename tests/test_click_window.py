"""The click windows of `samft.segmentation.scan_logits`: a scan shorter than the window along an axis is padded
there on both sides, as training's SpatialPad pads it, and the click and the output stay on the scan's voxels; a
model that learned both modes gets its clicks in every sliding window that holds a positive one."""

from __future__ import annotations

from types import SimpleNamespace

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


class TwoWayEchoModel(nn.Module):
    """Prompt-free: its window as the logits; with clicks: its window + 100, recording the window and its clicks."""

    def __init__(self) -> None:
        super().__init__()
        self.clicked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def segment(self, image: torch.Tensor, *, num_clicks: int) -> SimpleNamespace:
        assert num_clicks == 0
        return SimpleNamespace(logits=[image.clone()])

    def segment_points(self, image: torch.Tensor, *, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.clicked.append((image.clone(), coords.clone(), labels.clone()))
        return image + 100.0


def test_a_model_that_learned_both_modes_decodes_the_windows_holding_a_positive_click_with_their_clicks() -> None:
    # x: windows of 32 at overlap 0.5 start at 0, 16 and 32; y and z are shorter than the window (padded)
    volume = torch.rand(1, 1, 64, 25, 20, generator=torch.Generator().manual_seed(0)) + 1.0
    model = TwoWayEchoModel()
    clicks = torch.tensor([[10.0, 15.0, 5.0, 1.0], [20.0, 3.0, 3.0, 0.0]], dtype=torch.float64)
    logits = scan_logits(model, volume, roi_size=(32, 32, 32), overlap=0.5, air=-1.0, clicks=clicks,
                         prompt_mode="both")
    # only the first window holds the positive click; the second holds just the negative one: prompt-free
    assert len(model.clicked) == 1
    window, coords, labels = model.clicked[0]
    expected = SpatialPad(spatial_size=(64, 32, 32), value=-1.0)(volume[0])[:, :32]
    torch.testing.assert_close(window[0], expected, rtol=0, atol=0)
    assert labels.tolist() == [[1, 0]]
    for (x, y, z), (cx, cy, cz) in zip(coords[0].long().tolist(), [(10, 15, 5), (20, 3, 3)]):
        assert window[0, 0, x, y, z] == volume[0, 0, cx, cy, cz]
    assert logits.shape == volume.shape
    # seen by the clicked window only, by it and a prompt-free one (blended), by prompt-free windows only
    torch.testing.assert_close(logits[..., :16, :, :], volume[..., :16, :, :] + 100.0)
    blended = logits[..., 16:32, :, :] - volume[..., 16:32, :, :]
    assert (blended > 0.1).all() and (blended < 99.9).all()
    torch.testing.assert_close(logits[..., 48:, :, :], volume[..., 48:, :, :])
