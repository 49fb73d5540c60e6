"""Scores computed where the prediction is: `case_metrics` takes tensors on a device (device as a parameter; the
CPU runs the same code a GPU does), reads the host once (twice with HD95), and gives exactly what the numpy
path gave; whole-scan validation hands it the prediction and the truth on the run's device."""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from samft.scoring import case_metrics

SAMFT = Path(__import__("samft").__file__).parent
AFFINE = np.diag([0.8, 0.9, 5.0, 1.0])


def old_case_metrics(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray, *, hd95: bool = True) -> dict:
    """`samft.scoring.case_metrics` before the change (commit f291181): numpy in, CPU only."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    p = torch.as_tensor(pred > 0)[None, None].float()
    t = torch.as_tensor(truth > 0)[None, None].float()
    dice = DiceMetric(include_background=True, ignore_empty=False, reduction="none")(p, t).item()
    distance = math.nan
    if hd95 and p.any() and t.any():
        metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        distance = metric(p, t, spacing=spacing.tolist()).item()
    return {
        "dice": dice, "hd95_mm": distance,
        "pred_volume_ml": float(p.sum()) * voxel_ml, "true_volume_ml": float(t.sum()) * voxel_ml,
        "detected": bool((p * t).any()) if t.any() else bool(p.any()), "positive": bool(t.any()),
    }


def _box(shape: tuple[int, int, int], lo: int, hi: int) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[lo:hi, lo:hi, 1:3] = True
    return out


SHAPE = (24, 20, 6)
CASES = {
    "overlap": (_box(SHAPE, 4, 12), _box(SHAPE, 6, 14)),
    "miss": (_box(SHAPE, 0, 3), _box(SHAPE, 10, 16)),
    "false alarm": (_box(SHAPE, 2, 5), np.zeros(SHAPE, bool)),
    "both empty": (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)),
    "nothing found": (np.zeros(SHAPE, bool), _box(SHAPE, 5, 9)),
}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) if isinstance(a[k], float) and math.isnan(a[k]) else a[k] == b[k]
        and type(a[k]) is type(b[k]) for k in a)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", [torch.device("cpu")])
def test_scores_of_tensors_on_a_device_equal_the_numpy_scores(case: str, device: torch.device) -> None:
    pred, truth = CASES[case]
    want = old_case_metrics(pred, truth, AFFINE)
    on_device = case_metrics(torch.from_numpy(pred).to(device), torch.from_numpy(truth).to(device), AFFINE)
    assert _same(on_device, want), (on_device, want)
    assert _same(case_metrics(pred, truth, AFFINE, device=device), want)  # numpy in, moved to the device
    assert _same(case_metrics(pred, truth, AFFINE), want)  # evaluate's call, unchanged


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The value reads (each a sync on a GPU) that samft.scoring itself makes."""
    counting: dict[str, Any] = {"where": []}
    for name in ("item", "tolist", "__bool__", "__float__", "cpu", "numpy", "any"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == str(SAMFT / "scoring.py"):
                counting["where"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counting


def test_scores_read_the_host_once_and_twice_with_hd95(host_reads: dict[str, Any]) -> None:
    pred, truth = (torch.from_numpy(a) for a in CASES["overlap"])
    case_metrics(pred, truth, AFFINE, hd95=False)
    assert host_reads["where"] == ["tolist"]
    row = case_metrics(pred, truth, AFFINE)
    assert host_reads["where"] == ["tolist", "tolist", "item"] and math.isfinite(row["hd95_mm"])


def test_whole_scan_validation_scores_on_the_runs_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.tiny_unet import tiny_unet_on_demo

    from samft.engine import validation as V

    _, model, preprocessing, scans, records = tiny_unet_on_demo(tmp_path, patients=2)
    validation = V.ScanValidation(scans=scans, transform=preprocessing.transforms("val"), records=records,
                                  roi_size=preprocessing.roi, overlap=0.25, air=preprocessing.air, prompt_mode="auto")
    device = torch.device("cpu")
    seen = []

    def spy(pred, truth, affine, **kwargs):
        seen.append((type(pred), pred.device, type(truth), truth.device))
        return case_metrics(pred, truth, affine, **kwargs)

    monkeypatch.setattr(V, "case_metrics", spy)
    rows = validation.case_rows(model, device=device, autocast=nullcontext)
    assert seen and set(seen) == {(torch.Tensor, device, torch.Tensor, device)}
    # the same rows as scored from numpy arrays before
    monkeypatch.setattr(V, "case_metrics", lambda pred, truth, affine, **kw: old_case_metrics(
        pred.numpy(), truth.numpy(), affine, **kw))
    assert validation.case_rows(model, device=device, autocast=nullcontext) == rows
