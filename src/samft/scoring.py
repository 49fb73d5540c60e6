"""Per-case segmentation scores on a scan's own grid, and their summaries: one definition for validation during
training (`samft.engine.validation`) and `samft.evaluate`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy.ndimage import distance_transform_edt

SIZE_BANDS_ML = (("under 1 ml", 0.0, 1.0), ("1-10 ml", 1.0, 10.0), ("over 10 ml", 10.0, float("inf")))


def case_metrics(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray, *, hd95: bool = True) -> dict[str, Any]:
    """pred, truth: X x Y x Z {0,1} arrays on one grid with `affine` (mm). HD95 is NaN when either is empty (or
    when `hd95` is False: it is the slowest score).

    `detected`: on a scan with a lesion, the prediction overlaps it; on one without, anything is predicted (a
    false alarm), so sensitivity and specificity count hits, not any voxel anywhere.
    """
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


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases, and the same per true lesion-size band (`by_size`)."""
    summary = _means(rows)
    summary["by_size"] = {
        name: _means([r for r in rows if r["positive"] and low <= r["true_volume_ml"] < high])
        for name, low, high in SIZE_BANDS_ML
    }
    return summary


def interior_click(truth: np.ndarray) -> list[float] | None:
    """The click a reader would give: the lesion voxel farthest from the lesion border, as [x, y, z, 1]."""
    if not truth.any():
        return None
    depth = distance_transform_edt(truth > 0)
    return [*map(float, np.unravel_index(int(depth.argmax()), truth.shape)), 1.0]


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    positives = [r for r in rows if r["positive"]]
    negatives = [r for r in rows if not r["positive"]]
    finite_hd = [r["hd95_mm"] for r in positives if math.isfinite(r["hd95_mm"])]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    negative_volumes = [r["pred_volume_ml"] for r in negatives]  # on a negative every predicted voxel is false
    return {
        "n_cases": len(rows), "n_positive": len(positives), "n_negative": len(negatives),
        "dice_positive_mean": mean([r["dice"] for r in positives]),
        "hd95_mm_mean": mean(finite_hd),
        "volume_abs_error_ml_mean": mean([abs(r["pred_volume_ml"] - r["true_volume_ml"]) for r in positives]),
        "sensitivity": mean([float(r["detected"]) for r in positives]),
        "specificity": mean([float(not r["detected"]) for r in negatives]),
        "fp_volume_ml_median": float(np.median(negative_volumes)) if negative_volumes else None,
    }
