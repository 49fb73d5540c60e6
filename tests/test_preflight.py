"""Pre-flight check: one test per bad-input kind, the error and skip modes, warnings."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samft.data.preflight import PreflightReport, preflight
from samft.data.sources import csv_records
from samft.errors import UserError

SHAPE = (16, 16, 8)
SPACING = (0.5, 0.5, 5.0)
AFFINE = np.diag([*SPACING, 1.0])


def ct_volume() -> np.ndarray:
    """Air around a head: -1000 HU, brain 40 HU, a skull rim 1000 HU, a 2 x 2 x 2 bleed of 70 HU."""
    image = np.full(SHAPE, -1000, np.int16)
    image[2:14, 2:14, 1:7] = 1000
    image[3:13, 3:13, 2:6] = 40
    image[6:8, 6:8, 3:5] = 70
    return image


def lesion_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[6:8, 6:8, 3:5] = 1
    return mask


def save_pkl(path: Path, image: object, **extra: object) -> str:
    path.write_bytes(pickle.dumps({"image": image, "spacing": SPACING, **extra}))
    return str(path)


def save_nii(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def record(folder: Path, name: str, *, ich: int = 1, patient: str | None = None, image=None, mask=None) -> dict:
    """A valid sample unless ``image``/``mask`` override the written arrays (mask=False: no mask file)."""
    image_path = save_pkl(folder / f"{name}.pkl", ct_volume() if image is None else image)
    if mask is False:
        label = None
    else:
        default = lesion_mask() if ich else np.zeros(SHAPE, np.uint8)
        label = save_nii(folder / f"{name}.nii.gz", default if mask is None else mask)
    return {"image": image_path, "label": label, "ich": ich, "patient_id": patient or f"p-{name}",
            "case_id": name, "origin": f"train.csv line {name}"}


@pytest.fixture
def good(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    train = [record(tmp_path, "t1"), record(tmp_path, "t2", ich=0, mask=False), record(tmp_path, "t3", ich=0)]
    val = [record(tmp_path, "v1")]
    return train, val


def problems_of(train: list[dict], val: list[dict]) -> list[str]:
    """The problem lines of the UserError raised in error mode (after the summary line)."""
    with pytest.raises(UserError) as info:
        preflight(train, val, on_bad_sample="error")
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def test_good_data_passes(good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    report = preflight(train, val)
    assert report.train == train and report.val == val
    assert report.skipped == [] and report.warnings == []
    assert set(report.cases) == {"t1", "t2", "t3", "v1"}
    stats = report.stats(report.train)
    assert stats["n_samples"] == 3 and stats["n_positive"] == 1
    assert report.stats()["n_samples"] == 4
    assert stats["lesion_volume_ml"]["max"] == pytest.approx(8 * 0.5 * 0.5 * 5.0 / 1000)
    json.dumps([report.skipped, report.warnings])  # both go into summary.json


def bad_case(tmp_path: Path, kind: str) -> tuple[dict, str]:
    """One sample with one problem, and the text its problem line must contain."""
    if kind == "missing image":
        rec = record(tmp_path, "b")
        os.remove(rec["image"])
        return rec, r"image .*b\.pkl: file not found"
    if kind == "missing mask":
        rec = record(tmp_path, "b")
        os.remove(rec["label"])
        return rec, r"mask .*b\.nii\.gz: file not found"
    if kind == "ich=1 without mask":
        return record(tmp_path, "b", mask=False), "ich=1 but there is no mask file"
    if kind == "corrupt image":
        rec = record(tmp_path, "b")
        Path(rec["image"]).write_bytes(b"\x80\x04garbage")
        return rec, r"image .*b\.pkl: cannot read it as a pickle"
    if kind == "corrupt mask":
        rec = record(tmp_path, "b")
        Path(rec["label"]).write_bytes(Path(rec["label"]).read_bytes()[:100])
        return rec, r"mask .*b\.nii\.gz: cannot read it as NIfTI"
    if kind == "malicious image":
        marker = tmp_path / "pwned"

        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        rec = record(tmp_path, "b")
        Path(rec["image"]).write_bytes(pickle.dumps(Payload()))
        return rec, r"image .*b\.pkl: refused to unpickle the global '(posix|nt|os)\.system'"
    if kind == "wrong dimensionality":
        return record(tmp_path, "b", image=ct_volume()[:, :, 0]), r"shape \(16, 16\); expected a 3-D volume"
    if kind == "shape mismatch":
        return record(tmp_path, "b", mask=lesion_mask()[:, :, :6]), (
            r"image shape \(16, 16, 8\) and mask shape \(16, 16, 6\) differ"
        )
    if kind == "geometry mismatch":
        rec = record(tmp_path, "b")
        save_nii(Path(rec["label"]), lesion_mask(), np.diag([0.5, 0.5, 2.5, 1.0]))
        return rec, r"image and mask geometry differ: image spacing 0\.5x0\.5x5 mm.*mask spacing 0\.5x0\.5x2\.5 mm"
    if kind == "NaN voxels":
        image = ct_volume().astype(np.float32)
        image[0, 0, :3] = [np.nan, np.inf, -np.inf]
        return record(tmp_path, "b", image=image), "image has 3 NaN or Inf voxel"
    if kind == "mask values":
        return record(tmp_path, "b", mask=lesion_mask() * 255), r"holds values other than 0 and 1 \(255\)"
    if kind == "ich=1 empty mask":
        return record(tmp_path, "b", mask=np.zeros(SHAPE, np.uint8)), r"ich=1 but the mask .*b\.nii\.gz is empty"
    if kind == "ich=0 lesion in mask":
        return record(tmp_path, "b", ich=0, mask=lesion_mask()), "ich=0 but the mask .* has 8 lesion voxel"
    raise AssertionError(kind)


BAD_KINDS = [
    "missing image", "missing mask", "ich=1 without mask", "corrupt image", "corrupt mask", "malicious image",
    "wrong dimensionality", "shape mismatch", "geometry mismatch", "NaN voxels", "mask values",
    "ich=1 empty mask", "ich=0 lesion in mask",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_sample_is_named_in_error_mode(
    tmp_path: Path, good: tuple[list[dict], list[dict]], kind: str
) -> None:
    train, val = good
    bad, expected = bad_case(tmp_path, kind)
    with pytest.raises(UserError) as info:
        preflight([*train, bad], val, on_bad_sample="error")
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "pre-flight check found 1 problem(s) in 5 samples; fix them, or set data.on_bad_sample=skip "
        "to leave bad samples out:"
    )
    assert len(lines) == 2
    assert lines[1].startswith("  train.csv line b: ")
    assert re.search(expected, lines[1]), lines[1]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_sample_is_listed_in_skip_mode(
    tmp_path: Path, good: tuple[list[dict], list[dict]], kind: str
) -> None:
    train, val = good
    bad, expected = bad_case(tmp_path, kind)
    report = preflight([*train, bad], val, on_bad_sample="skip")
    assert report.train == train and report.val == val
    assert [(s["case_id"], s["origin"], s["split"]) for s in report.skipped] == [("b", "train.csv line b", "train")]
    assert re.search(expected, report.skipped[0]["reason"])
    assert report.lines()[0].startswith("skipped train sample train.csv line b: ")
    assert "b" not in report.cases
    json.dumps([report.skipped, report.warnings])  # both go into summary.json


def test_every_problem_is_listed(tmp_path: Path, good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    bad, expected = [], []
    for kind in BAD_KINDS:
        (tmp_path / kind).mkdir()
        rec, pattern = bad_case(tmp_path / kind, kind)
        bad.append({**rec, "case_id": kind})
        expected.append(pattern)
    lines = problems_of([*train, *bad], val)
    assert len(lines) == len(BAD_KINDS)
    for line, pattern in zip(lines, expected):
        assert re.search(pattern, line), (pattern, line)
    report = preflight([*train, *bad], val, on_bad_sample="skip")
    assert len(report.skipped) == len(BAD_KINDS)


def test_duplicate_rows(tmp_path: Path, good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    repeat = {**train[0], "origin": "train.csv line 9"}
    (tmp_path / "other").mkdir()
    renamed_twin = record(tmp_path / "other", "t1")
    renamed_twin["origin"] = "train.csv line 10"
    lines = problems_of([*train, repeat, renamed_twin], val)
    assert lines == [
        "train.csv line 9: duplicate row: same image as train.csv line t1",
        "train.csv line 10: duplicate case_id t1 (also train.csv line t1); rename one of the files",
    ]
    report = preflight([*train, repeat], val, on_bad_sample="skip")
    assert report.train == train and [s["origin"] for s in report.skipped] == ["train.csv line 9"]


def test_patient_in_train_and_val_is_always_an_error(tmp_path: Path, good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    val = [{**val[0], "patient_id": train[0]["patient_id"]}]
    leak = "patient_id p-t1 is in train (train.csv line t1) and in val (train.csv line v1): leakage"
    for mode in ("error", "skip"):
        with pytest.raises(UserError) as info:
            preflight(train, val, on_bad_sample=mode)
        lines = str(info.value).splitlines()
        assert lines[0].endswith("move each patient into one split only:")
        assert [line.strip() for line in lines[1:]] == [leak]
    bad, _ = bad_case(tmp_path, "missing image")
    lines = problems_of([*train, bad], val)
    assert lines[0] == leak and "b.pkl: file not found" in lines[1]


def test_empty_splits(tmp_path: Path, good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    with pytest.raises(UserError, match="the val split has no samples"):
        preflight(train, [])
    bad, _ = bad_case(tmp_path, "missing image")
    with pytest.raises(UserError) as info:
        preflight(train, [bad], on_bad_sample="skip")
    assert str(info.value).splitlines()[0] == "pre-flight check skipped every val sample:"
    assert re.fullmatch(r"  train\.csv line b: image .*b\.pkl: file not found", str(info.value).splitlines()[1])
    with pytest.raises(UserError, match="on_bad_sample is 'drop'"):
        preflight(train, val, on_bad_sample="drop")


def test_implausible_hu_range_is_a_warning(tmp_path: Path, good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    windowed = np.clip(ct_volume().astype(np.float32) / 80.0, 0.0, 1.0)
    report = preflight([*train, record(tmp_path, "w", image=windowed)], val)
    assert len(report.train) == 4 and report.skipped == []
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("train.csv line w: ")
    assert "w.pkl: intensities p0.5..p99.5 = 0..1 do not look like Hounsfield units" in report.warnings[0]


def test_image_without_geometry(tmp_path: Path, good: tuple[list[dict], list[dict]]) -> None:
    train, val = good
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(ct_volume()))
    negative = {**train[1], "image": str(bare), "case_id": "bare"}
    report = preflight([*train, negative], val)
    assert report.warnings == [
        f"1 image(s) without mask have no spacing or affine (e.g. {bare}): 1 mm isotropic voxels assumed; save "
        "the .pkl as a dict with 'spacing' or 'affine' for true sizes"
    ]
    with_mask = {**train[0], "image": str(bare), "case_id": "bare"}
    report = preflight([*train[1:], with_mask], val)
    assert report.train == [*train[1:], with_mask]
    assert report.warnings == [f"1 image(s) have no spacing or affine (e.g. {bare}): their mask's geometry is used"]
    assert report.cases["bare"]["spacing"] == pytest.approx(SPACING)


def test_through_csv_rows_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    save_pkl(tmp_path / "001.pkl", ct_volume())
    save_pkl(tmp_path / "002.pkl", ct_volume())
    save_nii(tmp_path / "masks" / "001.nii", lesion_mask())
    (tmp_path / "train.csv").write_text("path,ich,patient_id\n001.pkl,1,a\n002.pkl,1,b\n")
    (tmp_path / "val.csv").write_text("path,ich,patient_id\n001.pkl,1,c\n")
    train, val = csv_records(tmp_path / "train.csv", tmp_path / "val.csv", tmp_path / "masks")
    lines = problems_of(train, val)
    assert lines == [
        f"{tmp_path / 'train.csv'} line 3: mask {tmp_path / 'masks' / '002.nii'}: file not found",
        f"{tmp_path / 'val.csv'} line 2: duplicate row: same image as {tmp_path / 'train.csv'} line 2",
    ]


def test_report_is_a_dataclass_with_defaults() -> None:
    report = PreflightReport(train=[], val=[])
    assert report.skipped == [] and report.warnings == [] and report.cases == {} and report.lines() == []


def test_the_run_logs_the_reports_lines(tmp_path: Path, good: tuple[list[dict], list[dict]],
                                        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`records.load_records` (what a training run calls) logs the skipped samples and warnings as
    `PreflightReport.lines` words them, and hands them on for summary.json."""
    import logging
    from types import SimpleNamespace

    from samft.data import records

    train, val = good
    bad, _ = bad_case(tmp_path, "missing image")
    monkeypatch.setattr(records, "source_records", lambda data, seed: ([*train, bad], val))
    with caplog.at_level(logging.WARNING, logger="samft.data"):
        bundle = records.load_records(SimpleNamespace(on_bad_sample="skip"), seed=0, run_dir=tmp_path)
    report = preflight([*train, bad], val, on_bad_sample="skip")
    logged = [r.getMessage() for r in caplog.records if r.name == "samft.data" and r.levelno == logging.WARNING]
    assert logged == report.lines() and logged[0].startswith("skipped train sample train.csv line b: ")
    assert bundle.skipped == report.skipped and bundle.warnings == report.warnings
