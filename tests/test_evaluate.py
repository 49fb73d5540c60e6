"""`samft.evaluate`: per-case metrics worked out by hand, size bands, the reader's click, and a whole CLI run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.patience import patience
from scipy.ndimage import distance_transform_edt

from samft.data.demo import ensure_demo_dataset
from samft.engine.checkpoint import FORMAT, save_checkpoint
from samft.model import build_model
from samft.scoring import case_metrics, interior_click, summarize

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm^3 voxels = 0.002 ml


def _box(corner: tuple[int, int, int], size: int, shape: tuple[int, int, int] = (12, 12, 12)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    x, y, z = corner
    mask[x : x + size, y : y + size, z : z + size] = 1
    return mask


def test_case_metrics_dice_volumes_and_hits() -> None:
    truth = _box((2, 2, 2), 4)  # 64 voxels
    half = truth.copy()
    half[2:4] = 0  # 32 voxels inside the lesion
    row = case_metrics(half, truth, AFFINE)
    assert row["dice"] == pytest.approx(2 * 32 / (64 + 32))
    assert row["pred_volume_ml"] == pytest.approx(32 * 0.002) and row["true_volume_ml"] == pytest.approx(64 * 0.002)
    assert row["detected"] and row["positive"] and row["hd95_mm"] == pytest.approx(4.0)  # two 2 mm slabs missed

    elsewhere = case_metrics(_box((8, 8, 8), 3), truth, AFFINE)
    assert not elsewhere["detected"] and elsewhere["dice"] == 0.0  # a prediction beside the lesion is no hit
    false_alarm = case_metrics(_box((8, 8, 8), 3), np.zeros_like(truth), AFFINE)
    assert false_alarm["detected"] and not false_alarm["positive"] and math.isnan(false_alarm["hd95_mm"])


def test_summary_per_size_band() -> None:
    rows = [
        {"dice": 0.8, "hd95_mm": 2.0, "pred_volume_ml": 0.4, "true_volume_ml": 0.5, "detected": True, "positive": True},
        {"dice": 0.0, "hd95_mm": math.nan, "pred_volume_ml": 0.0, "true_volume_ml": 20.0, "detected": False,
         "positive": True},
        {"dice": 0.6, "hd95_mm": 4.0, "pred_volume_ml": 18.0, "true_volume_ml": 12.0, "detected": True,
         "positive": True},
        {"dice": 0.0, "hd95_mm": math.nan, "pred_volume_ml": 1.0, "true_volume_ml": 0.0, "detected": True,
         "positive": False},
    ]
    summary = summarize(rows)
    assert summary["dice_positive_mean"] == pytest.approx(1.4 / 3) and summary["hd95_mm_mean"] == pytest.approx(3.0)
    assert summary["sensitivity"] == pytest.approx(2 / 3) and summary["specificity"] == 0.0
    assert summary["volume_abs_error_ml_mean"] == pytest.approx((0.1 + 20.0 + 6.0) / 3)
    bands = summary["by_size"]
    assert bands["under 1 ml"]["n_positive"] == 1 and bands["under 1 ml"]["dice_positive_mean"] == pytest.approx(0.8)
    assert bands["1-10 ml"]["n_positive"] == 0 and bands["1-10 ml"]["sensitivity"] is None
    assert bands["over 10 ml"]["n_positive"] == 2 and bands["over 10 ml"]["sensitivity"] == pytest.approx(0.5)


def test_interior_click_is_the_innermost_lesion_voxel() -> None:
    assert interior_click(_box((3, 3, 3), 5), np.eye(4)) == [5.0, 5.0, 5.0, 1.0]
    assert interior_click(np.zeros((4, 4, 4)), np.eye(4)) is None


def test_interior_click_measures_depth_in_mm_on_anisotropic_voxels() -> None:
    """A bleed three 5 mm slices thick and 21 x 21 voxels of 0.5 mm: counted in voxels every in-plane voxel two
    from the edge is as deep as the centre (the slices bound it), and the first of them is at a corner; in mm the
    centre is the deepest."""
    truth = np.zeros((25, 25, 5), dtype=np.uint8)
    truth[2:23, 2:23, 1:4] = 1
    assert interior_click(truth, np.diag([0.5, 0.5, 5.0, 1.0])) == [12.0, 12.0, 2.0, 1.0]


@pytest.mark.parametrize("seed", range(40))
def test_interior_click_equals_the_whole_scan_distance_transform(seed: int) -> None:
    """Random blobs, some cut by the scan's edge, some with ties, on isotropic (even seeds) and random anisotropic
    voxels: the bounding-box computation picks the voxel the whole-scan distance transform in mm picks (its first
    maximum in raster order)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 24, size=3))
    spacing = np.ones(3) if seed % 2 == 0 else rng.uniform(0.4, 5.0, size=3)
    grid = np.indices(shape).astype(float)
    truth = np.zeros(shape, dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(-2, np.array(shape) + 2)[:, None, None, None]
        radii = rng.uniform(1, 6, size=3)[:, None, None, None]
        truth |= ((((grid - centre) / radii) ** 2).sum(axis=0) <= 1.0).astype(np.uint8)
    if not truth.any():
        truth[tuple(int(rng.integers(0, n)) for n in shape)] = 1
    whole = distance_transform_edt(truth > 0, sampling=spacing)
    expected = [float(i) for i in np.unravel_index(int(whole.argmax()), shape)]
    assert interior_click(truth, np.diag([*spacing, 1.0])) == [*expected, 1.0]


def test_evaluate_cli_writes_per_case_rows_summary_and_overlays(tmp_path: Path) -> None:
    _, val_csv, mask_dir = ensure_demo_dataset(root=tmp_path / "demo", n_patients=3, seed=0)
    torch.manual_seed(0)
    tiny = {"name": "sam_med3d_tiny", "visual_tokens": 32}
    data = {"spacing": [1.5, 1.5, 1.5], "roi_size": 128, "intensity": "window", "window_center": 40.0,
            "window_width": 80.0}
    save_checkpoint({"format": FORMAT, "model": build_model(**tiny).state_dict(),
                     "config": {"model": {**tiny, "prompt_mode": "both"}, "data": data}}, tmp_path / "best_model.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "samft.evaluate", f"ckpt={tmp_path / 'best_model.pth'}", f"input={val_csv}",
         f"mask_dir={mask_dir}", f"output={tmp_path / 'eval'}", "click_from_label=true"],
        capture_output=True, text=True, timeout=patience(600),
        env={**os.environ, "SAMFT_LOG_DIR": str(tmp_path / "logs")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = pd.read_csv(val_csv)
    rows = pd.read_csv(tmp_path / "eval" / "per_case.csv", dtype={"case_id": str})
    assert len(rows) == len(cases) and set(rows["mode"]) <= {"click", "auto"}
    assert (rows["mode"] == "click").tolist() == rows["positive"].tolist()  # one reader's click per positive scan
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    # the expectation from the rows themselves (pandas), not from the summarising code under test
    positive = rows[rows["positive"].astype(bool)]
    assert summary["n_positive"] == len(positive) > 0
    assert summary["dice_positive_mean"] == pytest.approx(float(positive["dice"].mean()))
    assert all(0.0 <= d <= 1.0 for d in rows["dice"].dropna())
    assert sorted(p.stem for p in (tmp_path / "eval" / "overlays").glob("*.png")) == sorted(rows["case_id"])
