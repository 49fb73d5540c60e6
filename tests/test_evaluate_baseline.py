"""`samft.baseline`: the threshold baseline on a synthetic head, and its masks scored by `samft.evaluate pred_dir=`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.patience import patience
from omegaconf import OmegaConf

from samft.baseline import intracranial_cavity, threshold_mask
from samft.errors import UserError

SPACING = (1.0, 1.0, 2.0)  # mm; 2 mm^3 voxels = 0.002 ml
AFFINE = np.diag([*SPACING, 1.0])
SETTINGS = {"hu_min": 55.0, "hu_max": 100.0, "min_component_ml": 0.1, "bone_hu": 300.0, "erode_mm": 3.0}


def _head(shape: tuple[int, int, int] = (64, 64, 12)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU X x Y x Z: air, a scalp ring (r 24-31 voxels), a skull ring (r 20-24), brain (30 HU) inside, and a
    1-voxel 80 HU rim on the skull's inner surface (partial volume). Blood-density (70 HU) blobs: `inside`
    (3x5x5 voxels = 0.15 ml at the centre), `outside` (in the scalp, 0.25 ml), `speck` (inside, 0.016 ml)."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    radius = np.hypot(x - 32, y - 32)[..., None] * np.ones(shape[2])
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[radius < 31] = 30.0
    hu[(radius >= 20) & (radius < 24)] = 1000.0
    hu[(radius >= 19) & (radius < 20)] = 80.0
    blobs = {name: np.zeros(shape, dtype=bool) for name in ("inside", "outside", "speck")}
    blobs["inside"][30:35, 30:35, 5:8] = True
    blobs["outside"][58:63, 30:35, 4:9] = True  # x 58-62: radius 26-30, in the scalp
    blobs["speck"][40:42, 32:34, 2:4] = True  # 8 voxels, 8-10 voxels from the centre: deep inside
    for blob in blobs.values():
        hu[blob] = 70.0
    return hu, blobs


def test_threshold_marks_the_bleed_inside_the_skull_only() -> None:
    hu, blobs = _head()
    mask = threshold_mask(hu, AFFINE, **SETTINGS)
    assert mask.dtype == np.uint8
    assert mask[blobs["inside"]].all()
    assert not mask[blobs["outside"]].any()  # blood density in the scalp, outside the cavity
    assert not mask[blobs["speck"]].any()  # 0.016 ml < min_component_ml
    assert mask.sum() == blobs["inside"].sum()  # the 80 HU rim on the skull is eroded away


def test_component_limit_and_erosion_are_the_settings() -> None:
    hu, blobs = _head()
    kept = threshold_mask(hu, AFFINE, **{**SETTINGS, "min_component_ml": 0.01})
    assert kept[blobs["speck"]].all() and kept.sum() == blobs["inside"].sum() + blobs["speck"].sum()
    rim = threshold_mask(hu, AFFINE, **{**SETTINGS, "erode_mm": 0.0})
    assert rim.sum() > kept.sum() and not rim[blobs["outside"]].any()  # the skull's 80 HU rim comes back


def test_cavity_is_enclosed_by_bone_in_each_axial_slice() -> None:
    hu, _ = _head()
    cavity = intracranial_cavity(hu, AFFINE, bone_hu=300.0, erode_mm=0.0)
    x, y = np.ogrid[:64, :64]
    inside = np.hypot(x - 32, y - 32) < 20
    assert (cavity == inside[..., None]).all()
    # the same head stored with slices along the first voxel axis: the axial axis follows the affine
    swapped = intracranial_cavity(np.moveaxis(hu, 2, 0), _slices_first_affine(), bone_hu=300.0, erode_mm=0.0)
    assert (swapped == np.moveaxis(cavity, 2, 0)).all()


def _slices_first_affine() -> np.ndarray:
    """Voxel axis 0 runs head-foot (world z, 2 mm), axes 1 and 2 run along world x and y (1 mm)."""
    return np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])


def _write_cases(root: Path) -> Path:
    hu, blobs = _head()
    (root / "scans").mkdir(parents=True)
    (root / "masks").mkdir()
    nib.save(nib.Nifti1Image(hu, AFFINE), root / "scans" / "bleed.nii.gz")
    nib.save(nib.Nifti1Image(blobs["inside"].astype(np.uint8), AFFINE), root / "masks" / "bleed.nii.gz")
    clean = hu.copy()
    clean[blobs["inside"] | blobs["speck"]] = 30.0
    nib.save(nib.Nifti1Image(clean, AFFINE), root / "scans" / "clean.nii.gz")
    pd.DataFrame({"path": ["scans/bleed.nii.gz", "scans/clean.nii.gz"], "ich": [1, 0],
                  "patient_id": ["1", "2"]}).to_csv(root / "cases.csv", index=False)
    return root / "cases.csv"


def _run(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=patience(300),
                          env={**os.environ, "SAMFT_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_baseline_masks_are_scored_by_evaluate_pred_dir(tmp_path: Path) -> None:
    csv = _write_cases(tmp_path)
    made = _run("samft.baseline", f"input={csv}", f"output={tmp_path / 'baseline'}", tmp_path=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == ["bleed_mask.nii.gz", "clean_mask.nii.gz"]
    written = nib.load(tmp_path / "baseline" / "bleed_mask.nii.gz")
    assert np.allclose(written.affine, AFFINE) and written.shape == (64, 64, 12)

    scored = _run("samft.evaluate", f"pred_dir={tmp_path / 'baseline'}", f"input={csv}",
                  f"mask_dir={tmp_path / 'masks'}", f"output={tmp_path / 'eval'}", tmp_path=tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["dice_positive_mean"] == pytest.approx(1.0)  # the bleed exactly, nothing else
    assert summary["specificity"] == 1.0 and summary["fp_volume_ml_median"] == 0.0


def test_baseline_settings_that_cannot_work_are_one_line(tmp_path: Path) -> None:
    from samft.baseline import run_baseline

    cfg = OmegaConf.create({"input": str(tmp_path), "output": str(tmp_path / "out"), **SETTINGS, "hu_min": 120.0})
    with pytest.raises(UserError, match="hu_min=120.0 must be below hu_max=100.0"):
        run_baseline(cfg)
    proc = _run("samft.baseline", f"input={tmp_path / 'nothing.nii.gz'}", f"output={tmp_path / 'out'}",
                tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nothing.nii.gz does not exist" in proc.stderr
