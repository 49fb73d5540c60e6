"""`samft.evaluate pred_dir=`: masks written by any tool, scored against hand-made truths with known Dice."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.patience import patience
from omegaconf import OmegaConf

from samft.errors import UserError
from samft.evaluate import evaluate_cases

SHAPE = (12, 12, 12)
AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 1.0, 0, 5.0], [0, 0, 1.0, 3.0], [0, 0, 0, 1]])  # 2 mm^3 voxels
VOXEL_ML = 0.002


def _box(corner: tuple[int, int, int], size: tuple[int, int, int], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = 1
    return mask


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _dataset(root: Path) -> tuple[Path, Path, Path]:
    """Scans, true masks and predictions named every way pred_dir accepts; returns (csv, mask_dir, pred_dir).

    pos_a: truth 4x4x4 at (2,2,2), prediction the same box shifted one voxel: overlap 3x4x4 = 48 voxels.
    pos_b (a bare .pkl scan; its mask's header is the geometry): truth 2x2x2, nothing predicted.
    neg_c, neg_d_0000 (nnU-Net naming), neg_e: no lesion; 0, 8 and 27 voxels predicted.
    """
    scans, masks, preds = root / "scans", root / "masks", root / "preds"
    scan = np.full(SHAPE, 30.0, dtype=np.float32)
    rows = []
    for stem, suffix in (("pos_a", ".nii.gz"), ("pos_b", ".pkl"), ("neg_c", ".nii.gz"), ("neg_d_0000", ".nii"),
                         ("neg_e", ".nii.gz")):
        if suffix == ".pkl":
            scans.mkdir(parents=True, exist_ok=True)
            (scans / f"{stem}.pkl").write_bytes(pickle.dumps(scan))
        else:
            _nifti(scans / f"{stem}{suffix}", scan)
        rows.append({"path": f"scans/{stem}{suffix}", "ich": int(stem.startswith("pos")), "patient_id": stem})
    pd.DataFrame(rows).to_csv(root / "cases.csv", index=False)
    _nifti(masks / "pos_a.nii.gz", _box((2, 2, 2), (4, 4, 4)))
    _nifti(masks / "pos_b.nii", _box((6, 6, 6), (2, 2, 2)))
    _nifti(preds / "pos_a.nii.gz", _box((3, 2, 2), (4, 4, 4)))
    _nifti(preds / "pos_b_mask.nii.gz", np.zeros(SHAPE, np.uint8), np.eye(4))  # samft.predict on a bare .pkl
    _nifti(preds / "neg_c.nii", np.zeros(SHAPE, np.uint8))
    _nifti(preds / "neg_d.nii.gz", _box((0, 0, 0), (2, 2, 2)))
    _nifti(preds / "neg_e_mask.nii.gz", _box((5, 5, 5), (3, 3, 3)).astype(np.float32))
    return root / "cases.csv", masks, preds


def _cfg(**overrides: object) -> object:
    base = {"ckpt": None, "pred_dir": None, "input": None, "mask_dir": None, "output": None, "points": None,
            "click_from_label": False, "threshold": 0.5, "overlap": 0.25, "sw_batch_size": 1, "device": "cpu"}
    return OmegaConf.create({**base, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}})


def _run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samft.evaluate", *args], capture_output=True, text=True,
                          timeout=patience(300), env={**os.environ, "SAMFT_LOG_DIR": str(tmp_path / "logs")})


def test_pred_dir_scores_hand_made_masks(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))
    rows = pd.read_csv(tmp_path / "eval" / "per_case.csv").set_index("case_id")
    assert list(rows.index) == ["pos_a", "pos_b", "neg_c", "neg_d_0000", "neg_e"] and set(rows["mode"]) == {"file"}
    assert rows.loc["pos_a", "dice"] == pytest.approx(2 * 48 / (64 + 64))
    assert rows.loc["pos_b", "dice"] == 0.0 and not rows.loc["pos_b", "detected"]
    # the bare .pkl scan is measured on its mask's 2 mm grid, not the identity its prediction file carries
    assert rows.loc["pos_b", "true_volume_ml"] == pytest.approx(8 * VOXEL_ML)
    assert rows["pred_volume_ml"].tolist() == pytest.approx([64 * VOXEL_ML, 0.0, 0.0, 8 * VOXEL_ML, 27 * VOXEL_ML])

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["dice_positive_mean"] == pytest.approx((0.75 + 0.0) / 2)
    assert summary["sensitivity"] == 0.5 and summary["specificity"] == pytest.approx(1 / 3)
    assert summary["fp_volume_ml_median"] == pytest.approx(8 * VOXEL_ML)  # median of 0, 8 and 27 voxels
    assert summary["by_size"]["under 1 ml"]["n_positive"] == 2
    assert sorted(p.stem for p in (tmp_path / "eval" / "overlays").glob("*.png")) == sorted(rows.index)


@pytest.mark.parametrize("given", [{}, {"ckpt": "run/best_model.pth", "pred_dir": "preds"}])
def test_ckpt_and_pred_dir_are_exclusive(tmp_path: Path, given: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in given.items()]
    proc = _run_cli(*args, f"output={tmp_path / 'eval'}", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "exactly one of ckpt=" in proc.stderr and "pred_dir=" in proc.stderr


def test_pred_dir_needs_input_and_mask_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pred_dir= needs input=<csv of scans> and mask_dir="):
        evaluate_cases(_cfg(pred_dir=tmp_path, output=tmp_path / "eval"))
    with pytest.raises(UserError, match="the masks in pred_dir are already made"):
        evaluate_cases(_cfg(pred_dir=tmp_path, click_from_label=True, output=tmp_path / "eval"))


def test_prediction_with_another_shape_names_both_files(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    _nifti(pred_dir / "pos_a.nii.gz", _box((3, 2, 2), (4, 4, 4), shape=(12, 12, 10)))
    with pytest.raises(UserError, match=r"preds/pos_a\.nii\.gz has shape \(12, 12, 10\) but .*masks/pos_a\.nii\.gz "
                                        r"has \(12, 12, 12\)"):
        evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))


def test_prediction_off_the_mask_grid_is_refused(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01  # 10 micrometres: above the 1e-3 mm tolerance
    _nifti(pred_dir / "pos_a.nii.gz", _box((3, 2, 2), (4, 4, 4)), shifted)
    with pytest.raises(UserError, match=r"preds/pos_a\.nii\.gz is not on the grid of .*masks/pos_a\.nii\.gz"):
        evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))


def test_missing_predictions_are_listed_per_scan_before_scoring(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    (pred_dir / "pos_a.nii.gz").unlink()
    (pred_dir / "neg_d.nii.gz").unlink()
    with pytest.raises(UserError) as err:
        evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))
    message = str(err.value)
    assert message.startswith("2 scan(s) have no prediction") and "\n" not in message
    assert "pos_a.nii.gz (looked for pos_a.nii.gz, pos_a.nii, pos_a_mask.nii.gz)" in message
    assert ("neg_d_0000.nii (looked for neg_d_0000.nii.gz, neg_d_0000.nii, neg_d_0000_mask.nii.gz, neg_d.nii.gz"
            in message)  # nnU-Net names its output after the case without the _0000 channel suffix
    assert not (tmp_path / "eval").exists()  # nothing scored before every file was found


def test_two_predictions_for_one_scan_are_refused(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    _nifti(pred_dir / "pos_a_mask.nii.gz", _box((3, 2, 2), (4, 4, 4)))
    with pytest.raises(UserError, match=r"have several predictions; keep one.*pos_a\.nii\.gz and pos_a_mask\.nii\.gz"):
        evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))


def test_probability_maps_are_refused(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    _nifti(pred_dir / "pos_a.nii.gz", _box((3, 2, 2), (4, 4, 4)).astype(np.float32) * 0.7)
    with pytest.raises(UserError, match="fractional values"):
        evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))


def test_mask_dir_as_pred_dir_is_refused(tmp_path: Path) -> None:
    csv, mask_dir, _ = _dataset(tmp_path)
    with pytest.raises(UserError, match="is the mask_dir"):
        evaluate_cases(_cfg(pred_dir=mask_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))


def test_summary_reports_no_fp_median_without_negatives(tmp_path: Path) -> None:
    csv, mask_dir, pred_dir = _dataset(tmp_path)
    table = pd.read_csv(csv)
    table[table["ich"] == 1].to_csv(csv, index=False)
    summary = evaluate_cases(_cfg(pred_dir=pred_dir, input=csv, mask_dir=mask_dir, output=tmp_path / "eval"))
    assert summary["n_negative"] == 0 and summary["fp_volume_ml_median"] is None
    assert summary["specificity"] is None and not math.isnan(summary["dice_positive_mean"])
