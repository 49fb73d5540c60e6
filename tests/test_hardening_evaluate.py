"""`samft.evaluate` keeps going past a bad scan, refuses bad options in one line, and reads bare arrays on their
mask's geometry exactly as training does."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.hardening import AFFINE, run_cli, scan, tool_config, unet_checkpoint, write_nifti

from samft.errors import UserError
from samft.evaluate import evaluate_cases


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unet_checkpoint(tmp_path_factory.mktemp("run"))


def _dataset(root: Path, *, bare: bool, n: int = 3) -> tuple[Path, Path]:
    """n scans (NIfTI with their affine, or bare .pkl arrays) with lesion masks on the 2 x 2 x 5 mm grid."""
    rows = []
    for index in range(n):
        hu = scan(seed=index)
        mask = np.zeros(hu.shape, dtype=np.uint8)
        mask[10 + index : 20, 10:20, 3:7] = 1
        name = f"case{index}"
        if bare:
            (root / "scans").mkdir(parents=True, exist_ok=True)
            with (root / "scans" / f"{name}.pkl").open("wb") as handle:
                pickle.dump(hu, handle)
            rows.append(f"scans/{name}.pkl,1,p{index}")
        else:
            write_nifti(root / "scans" / f"{name}.nii.gz", hu)
            rows.append(f"scans/{name}.nii.gz,1,p{index}")
        write_nifti(root / "masks" / f"{name}.nii.gz", mask)
    (root / "cases.csv").write_text("path,ich,patient_id\n" + "\n".join(rows) + "\n")
    return root / "cases.csv", root / "masks"


def _evaluate(*overrides: str) -> dict:
    return evaluate_cases(tool_config("evaluate", "device=cpu", *overrides))


def _scores_with_affine_and_bare(tmp_path: Path, ckpt: Path, *extra: str, n: int = 3) -> list[pd.DataFrame]:
    scores = []
    for bare in (False, True):
        csv, masks = _dataset(tmp_path / f"bare{bare}", bare=bare, n=n)
        output = tmp_path / f"eval_{bare}"
        _evaluate(f"ckpt={ckpt}", f"input={csv}", f"mask_dir={masks}", f"output={output}", *extra)
        scores.append(pd.read_csv(output / "per_case.csv").set_index("case_id"))
    return scores


def test_bare_arrays_score_exactly_as_the_same_scans_with_their_affine(tmp_path: Path, ckpt: Path) -> None:
    with_affine, bare = _scores_with_affine_and_bare(tmp_path, ckpt)
    assert (with_affine["pred_volume_ml"] > 0).any() and (with_affine["dice"] > 0).any()  # masks, not empty ones
    pd.testing.assert_frame_equal(with_affine, bare)


def test_bare_arrays_score_exactly_as_with_their_affine_with_a_click(tmp_path: Path) -> None:
    import torch

    from samft.engine.checkpoint import FORMAT, save_checkpoint
    from samft.model import build_model

    torch.manual_seed(0)
    tiny = {"name": "sam_med3d_tiny", "visual_tokens": 32}
    data = {"spacing": [1.5, 1.5, 1.5], "roi_size": 128, "intensity": "window", "window_center": 40.0,
            "window_width": 80.0}
    (tmp_path / "run").mkdir()
    save_checkpoint({"format": FORMAT, "model": build_model(**tiny).state_dict(),
                     "config": {"model": {**tiny, "prompt_mode": "click"}, "data": data}},
                    tmp_path / "run" / "best_model.pth")
    with_affine, bare = _scores_with_affine_and_bare(tmp_path, tmp_path / "run" / "best_model.pth",
                                                     "click_from_label=true", n=1)
    assert list(with_affine["mode"]) == ["click"]
    pd.testing.assert_frame_equal(with_affine, bare)


def test_predict_gives_a_bare_array_the_mask_geometry_when_told(tmp_path: Path, ckpt: Path) -> None:
    import torch

    from samft.inference import Predictor

    hu = scan()
    with (tmp_path / "s.pkl").open("wb") as handle:
        pickle.dump(hu, handle)
    write_nifti(tmp_path / "s.nii.gz", hu)
    predictor = Predictor(ckpt, device=torch.device("cpu"))
    on_mask_grid = predictor.predict(tmp_path / "s.pkl", mask_affine=AFFINE)
    with_affine = predictor.predict(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(on_mask_grid.probabilities, with_affine.probabilities)
    np.testing.assert_array_equal(on_mask_grid.affine, AFFINE)
    identity = predictor.predict(tmp_path / "s.pkl")  # no mask: 1 mm, as training reads a negative without one
    assert not identity.has_geometry and np.array_equal(identity.affine, np.eye(4))


def test_a_missing_scan_or_a_mask_of_another_shape_fails_alone(tmp_path: Path, ckpt: Path) -> None:
    csv, masks = _dataset(tmp_path, bare=False, n=4)
    (tmp_path / "scans" / "case1.nii.gz").unlink()
    write_nifti(masks / "case2.nii.gz", np.zeros((8, 8, 8), dtype=np.uint8))
    poisoned = scan(seed=3)
    poisoned[1, 1, 1] = np.nan
    write_nifti(tmp_path / "scans" / "case3.nii.gz", poisoned)
    with pytest.raises(UserError, match=r"3 of 4 scan\(s\) could not be scored") as err:
        _evaluate(f"ckpt={ckpt}", f"input={csv}", f"mask_dir={masks}", f"output={tmp_path / 'eval'}")
    message = str(err.value)
    assert "\n" not in message and "case1.nii.gz: file not found" in message and "shape (8, 8, 8)" in message
    assert "NaN or Inf" in message
    table = pd.read_csv(tmp_path / "eval" / "per_case.csv").set_index("case_id")
    assert table.loc["case0", "mode"] == "auto" and not np.isnan(table.loc["case0", "dice"])
    assert list(table.loc[["case1", "case2", "case3"], "mode"]) == ["failed"] * 3
    assert (tmp_path / "eval" / "summary.json").exists()


@pytest.mark.slow
def test_a_mask_of_another_shape_with_pred_dir_is_one_line_at_the_cli(tmp_path: Path) -> None:
    csv, masks = _dataset(tmp_path, bare=False, n=2)
    write_nifti(masks / "case1.nii.gz", np.zeros((8, 8, 8), dtype=np.uint8))
    for index in range(2):
        write_nifti(tmp_path / "pred" / f"case{index}.nii.gz", np.zeros((40, 36, 10), dtype=np.uint8))
    proc = run_cli("samft.evaluate", f"pred_dir={tmp_path / 'pred'}", f"input={csv}", f"mask_dir={masks}",
                   f"output={tmp_path / 'eval'}", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and "1 of 2 scan(s) could not be scored" in last and "case1" in last
    assert len(pd.read_csv(tmp_path / "eval" / "per_case.csv")) == 2


@pytest.mark.parametrize("override, message", [
    ("overlap=1.5", "'overlap' is 1.5"),
    ("sw_batch_size=0", "'sw_batch_size' is 0"),
    ("threshold=abc", "'threshold'"),
    ("device=tpu", "'device' is 'tpu'"),
    ("threshold=inf", "'threshold' is inf"),
    ("+epochs=3", "unknown config key 'epochs'.*click_from_label"),
])
def test_evaluate_options_outside_the_schema_fail_before_any_work(tmp_path: Path, override: str, message: str,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr("samft.evaluate._records", lambda cfg: pytest.fail("work began before the check"))
    with pytest.raises(UserError, match=message) as err:
        _evaluate("ckpt=x.pth", f"output={tmp_path}", override)
    assert "\n" not in str(err.value)


def test_evaluate_bad_points_and_output_under_a_file_are_one_line(tmp_path: Path, ckpt: Path) -> None:
    csv, masks = _dataset(tmp_path, bare=False, n=1)
    (tmp_path / "points.json").write_text("{broken")
    with pytest.raises(UserError, match="not readable JSON"):
        _evaluate(f"ckpt={ckpt}", f"input={csv}", f"mask_dir={masks}", f"output={tmp_path / 'eval'}",
                  f"points={tmp_path / 'points.json'}")
    with pytest.raises(UserError, match="under a file"):
        _evaluate(f"ckpt={ckpt}", f"input={csv}", f"mask_dir={masks}", f"output={csv / 'eval'}")
    with pytest.raises(UserError, match="the CSV has a header but no rows"):
        (tmp_path / "empty.csv").write_text("path,ich,patient_id\n")
        _evaluate(f"ckpt={ckpt}", f"input={tmp_path / 'empty.csv'}", f"mask_dir={masks}",
                  f"output={tmp_path / 'eval2'}")


def test_a_mask_or_prediction_header_declaring_too_many_voxels_fails_alone(tmp_path: Path) -> None:
    import nibabel as nib

    csv, masks = _dataset(tmp_path, bare=False, n=2)
    header = nib.Nifti1Header()
    header.set_data_shape((1400, 1400, 1200))
    with (masks / "case1.nii").open("wb") as handle:  # a header only: its voxels would be 2.4 billion
        header.write_to(handle)
    (masks / "case1.nii.gz").unlink()
    for index in range(2):
        write_nifti(tmp_path / "pred" / f"case{index}.nii.gz", np.zeros((40, 36, 10), dtype=np.uint8))
    with pytest.raises(UserError, match=r"1 of 2 scan\(s\).*case1.nii: 1400 x 1400 x 1200 voxels exceed max_voxels"):
        _evaluate(f"pred_dir={tmp_path / 'pred'}", f"input={csv}", f"mask_dir={masks}", f"output={tmp_path / 'e'}")
    with (tmp_path / "pred" / "case0.nii").open("wb") as handle:
        header.write_to(handle)
    (tmp_path / "pred" / "case0.nii.gz").unlink()
    with pytest.raises(UserError, match=r"2 of 2 scan\(s\).*case0.nii: 1400 x 1400 x 1200 voxels exceed"):
        _evaluate(f"pred_dir={tmp_path / 'pred'}", f"input={csv}", f"mask_dir={masks}", f"output={tmp_path / 'e'}")
