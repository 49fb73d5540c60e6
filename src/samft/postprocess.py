"""Post-processing decided on the validation split, as nnU-Net decides its own: drop predicted connected
components smaller than a volume, when that raises the validation Dice. The choice is stored with the run
(`postprocessing.json` beside the checkpoints) and applied by `samft.predict` and `samft.evaluate`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from samft.data.stats import voxel_spacing

FILE = "postprocessing.json"
CANDIDATES_ML = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def remove_small_components(mask: np.ndarray, affine: np.ndarray, *, min_ml: float,
                            keep_at: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """mask X x Y x Z {0,1} on a grid with `affine` (mm) -> the same without 26-connected components under
    `min_ml` millilitres (unchanged for min_ml <= 0), except those holding a voxel of `keep_at` (indices x, y, z:
    the positive clicks, whose object the reader asked for whatever its size)."""
    if min_ml <= 0 or not mask.any():
        return mask
    labels, voxels, voxel_ml = _components(mask, affine)
    keep = voxels * voxel_ml >= min_ml
    keep[[labels[tuple(voxel)] for voxel in keep_at]] = True
    keep[0] = False
    return keep[labels].astype(mask.dtype)


def _components(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The 26-connected components of `mask` on a grid with `affine` (mm): labels X x Y x Z (0 background), each
    label's voxel count, and the millilitres of one voxel."""
    voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000.0
    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, np.bincount(labels.ravel(), minlength=count + 1), voxel_ml


def dice_by_min_component(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray,
                           candidates: Sequence[float] = CANDIDATES_ML) -> dict[str, float]:
    """The Dice of `pred` against `truth` (X x Y x Z {0,1} on a grid with `affine`, mm) after
    `remove_small_components` at each candidate volume, keyed by `str(candidate)`; 1 when both are empty. One
    labelling serves every candidate."""
    labels, voxels, voxel_ml = _components(pred, affine)
    overlap = np.bincount(labels[truth > 0], minlength=len(voxels))
    true_voxels = int(np.count_nonzero(truth))
    out = {}
    for candidate in candidates:
        keep = voxels * voxel_ml >= candidate if candidate > 0 else np.ones(len(voxels), dtype=bool)
        keep[0] = False
        total = int(voxels[keep].sum()) + true_voxels
        out[str(candidate)] = 1.0 if total == 0 else 2.0 * int(overlap[keep].sum()) / total
    return out


def choose(dice_by_candidate: Mapping[float, Sequence[float]]) -> dict[str, Any]:
    """The smallest-volume candidate with the best mean Dice over all validation scans (a scan without a lesion
    scores 1 when nothing is predicted, else 0), kept only if it beats no post-processing."""
    means = {float(c): float(np.mean(v)) for c, v in dice_by_candidate.items() if len(v)}
    best = max(sorted(means), key=lambda c: (means[c], -c))
    chosen = best if means[best] > means.get(0.0, -1.0) else 0.0
    return {"min_component_ml": chosen, "mean_dice_by_min_component_ml": {str(c): m for c, m in means.items()},
            "n_scans": len(next(iter(dice_by_candidate.values())))}


def save(run_dir: Path, decision: Mapping[str, Any]) -> None:
    tmp = run_dir / f".{FILE}.tmp"
    tmp.write_text(json.dumps(dict(decision), indent=2) + "\n")
    tmp.replace(run_dir / FILE)


def load_min_component_ml(run_dir: Path) -> float:
    """The run's choice, or 0 (none) for a run without `postprocessing.json`."""
    path = run_dir / FILE
    return float(json.loads(path.read_text())["min_component_ml"]) if path.exists() else 0.0
