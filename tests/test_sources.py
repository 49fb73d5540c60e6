"""Sources: the predecessor's CSVs, the CT-ICH layout, plain NIfTI folders, patient-level splits."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samft.data.sources import csv_records, ct_ich_records, nifti_folder_records, split_records
from samft.errors import UserError

SHAPE = (16, 16, 8)


def write_mask(path: Path, foreground: bool) -> Path:
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:8, 4:8, 2:4] = int(foreground)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, np.diag([0.5, 0.5, 5.0, 1.0])), path)
    return path


def write_pkl(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(np.zeros(SHAPE, np.int16)))
    return path


@pytest.fixture
def csv_layout(tmp_path: Path) -> Path:
    """train.csv / val.csv next to images/, masks in masks/ (.nii and .nii.gz)."""
    for stem in ("001", "002", "003", "004"):
        write_pkl(tmp_path / "images" / f"{stem}.pkl")
    write_mask(tmp_path / "masks" / "001.nii", True)
    write_mask(tmp_path / "masks" / "004.nii.gz", True)
    (tmp_path / "train.csv").write_text(
        f"path,ich,patient_id\nimages/001.pkl,1,007\n{tmp_path}/images/002.pkl,0,008\nimages/003.pkl,1.0,009\n"
    )
    (tmp_path / "val.csv").write_text("path, ich, patient_id\nimages/004.pkl, 1, 010\n")
    return tmp_path


def test_csv_records(csv_layout: Path) -> None:
    train, val = csv_records(csv_layout / "train.csv", csv_layout / "val.csv", csv_layout / "masks")
    images = csv_layout / "images"
    assert train == [
        {"image": str(images / "001.pkl"), "label": str(csv_layout / "masks" / "001.nii"), "ich": 1,
         "patient_id": "007", "case_id": "001", "origin": f"{csv_layout / 'train.csv'} line 2"},
        # ich=0 and no mask file: an empty mask
        {"image": str(images / "002.pkl"), "label": None, "ich": 0, "patient_id": "008", "case_id": "002",
         "origin": f"{csv_layout / 'train.csv'} line 3"},
        # ich=1 and no mask file: the expected path, reported missing by the pre-flight check
        {"image": str(images / "003.pkl"), "label": str(csv_layout / "masks" / "003.nii"), "ich": 1,
         "patient_id": "009", "case_id": "003", "origin": f"{csv_layout / 'train.csv'} line 4"},
    ]
    assert val[0]["label"] == str(csv_layout / "masks" / "004.nii.gz")
    assert json.loads(json.dumps(train + val)) == train + val


def test_missing_csv(csv_layout: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.csv: CSV file not found"):
        csv_records(csv_layout / "nope.csv", csv_layout / "val.csv", csv_layout / "masks")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the CSV is empty"),
        ("path,ich,patient_id\n", "the CSV has a header but no rows"),
        ("path,label\nimages/001.pkl,1\n", r"missing column\(s\) ich, patient_id \(found path, label\)"),
    ],
)
def test_empty_csv_and_missing_columns(csv_layout: Path, content: str, message: str) -> None:
    (csv_layout / "val.csv").write_text(content)
    with pytest.raises(UserError, match=rf"val\.csv: {message}"):
        csv_records(csv_layout / "train.csv", csv_layout / "val.csv", csv_layout / "masks")


def test_malformed_cells_are_listed_by_line(csv_layout: Path) -> None:
    (csv_layout / "val.csv").write_text("path,ich,patient_id\nimages/004.pkl,yes,010\n,1,011\nimages/001.pkl,1,\n")
    with pytest.raises(UserError) as info:
        csv_records(csv_layout / "train.csv", csv_layout / "val.csv", csv_layout / "masks")
    lines = str(info.value).splitlines()
    assert lines[0].endswith("val.csv has 3 malformed row(s):")
    assert "val.csv line 2: ich is 'yes', expected 0 or 1" in lines[1]
    assert "val.csv line 3: path is empty" in lines[2]
    assert "val.csv line 4: patient_id is empty" in lines[3]


def test_two_masks_for_one_image(csv_layout: Path) -> None:
    write_mask(csv_layout / "masks" / "001.nii.gz", True)
    with pytest.raises(UserError, match=r"train\.csv line 2: both .*001\.nii and .*001\.nii\.gz exist"):
        csv_records(csv_layout / "train.csv", csv_layout / "val.csv", csv_layout / "masks")


def test_missing_mask_dir(csv_layout: Path) -> None:
    with pytest.raises(UserError, match=r"data\.mask_dir .*nomasks is not a folder"):
        csv_records(csv_layout / "train.csv", csv_layout / "val.csv", csv_layout / "nomasks")


def ct_ich_layout(root: Path, positives: dict[int, bool]) -> Path:
    rows = ["PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
            "No_Hemorrhage,Fracture_Yes_No"]
    for number, positive in positives.items():
        write_mask(root / "ct_scans" / f"{number:03d}.nii", False)
        write_mask(root / "masks" / f"{number:03d}.nii", positive)
        for slice_number in range(1, 4):
            bleed = positive and slice_number == 2
            rows.append(f"{number},{slice_number},0,{int(bleed)},0,0,0,{int(not bleed)},0")
    rows.append("60,1,0,0,0,0,0,1,0")  # listed in the CSV without a scan, as in the real release
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("\n".join(rows) + "\n")
    return root


def test_ct_ich_records_split_by_patient_with_seed(tmp_path: Path) -> None:
    root = ct_ich_layout(tmp_path, {49 + i: i % 2 == 0 for i in range(10)})
    train, val = ct_ich_records(root, val_fraction=0.2, seed=3)
    assert len(train) == 8 and len(val) == 2
    assert {r["ich"] for r in val} == {0, 1}  # stratified by ich
    record = next(r for r in train + val if r["case_id"] == "049")
    assert record == {"image": str(root / "ct_scans" / "049.nii"), "label": str(root / "masks" / "049.nii"),
                      "ich": 1, "patient_id": "049", "case_id": "049", "origin": "ct_scans/049.nii (patient 49)"}
    assert ct_ich_records(root, val_fraction=0.2, seed=3) == (train, val)
    splits = {tuple(r["case_id"] for r in ct_ich_records(root, val_fraction=0.2, seed=s)[1]) for s in range(8)}
    assert len(splits) > 1


def test_ct_ich_split_file(tmp_path: Path) -> None:
    root = ct_ich_layout(tmp_path, {49: True, 50: False, 51: True})
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [49, "050"], "val": ["51"]}))
    train, val = ct_ich_records(root, val_fraction=0.2, seed=0, split_file=split)
    assert [r["case_id"] for r in train] == ["049", "050"]
    assert [r["case_id"] for r in val] == ["051"]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"train": [49, 50]}, r'expected \{"train"'),
        ({"train": [49, 50], "val": [51, 52]}, "unknown patient id.*: 52"),
        ({"train": [49, 50], "val": [50, 51]}, "listed more than once: 050"),
        ({"train": [49], "val": [51]}, "not listed in train or val: 050"),
    ],
)
def test_bad_split_file(tmp_path: Path, split: dict, message: str) -> None:
    root = ct_ich_layout(tmp_path, {49: True, 50: False, 51: True})
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(UserError, match=rf"split\.json: .*{message}"):
        ct_ich_records(root, val_fraction=0.2, seed=0, split_file=tmp_path / "split.json")


def test_ct_ich_layout_problems(tmp_path: Path) -> None:
    root = ct_ich_layout(tmp_path, {49: True, 50: False})
    write_mask(root / "ct_scans" / "077.nii", False)
    with pytest.raises(UserError, match=r"077\.nii: patient 77 has no rows in hemorrhage_diagnosis_raw_ct\.csv"):
        ct_ich_records(root, val_fraction=0.5, seed=0)
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("PatientNumber,SliceNumber\n49,1\n")
    with pytest.raises(UserError, match=r"missing column\(s\) No_Hemorrhage"):
        ct_ich_records(root, val_fraction=0.5, seed=0)
    with pytest.raises(UserError, match="has no ct_scans/ folder"):
        ct_ich_records(tmp_path / "elsewhere", val_fraction=0.5, seed=0)


def test_nifti_folders(tmp_path: Path) -> None:
    for i in range(5):
        write_mask(tmp_path / "img" / f"case{i}.nii.gz", False)
        if i != 4:
            write_mask(tmp_path / "lbl" / f"case{i}.nii.gz", i < 2)
    train, val = nifti_folder_records(tmp_path / "img", tmp_path / "lbl", val_fraction=0.4, seed=0)
    records = {r["case_id"]: r for r in train + val}
    assert len(train) == 3 and len(val) == 2
    assert [records[f"case{i}"]["ich"] for i in range(5)] == [1, 1, 0, 0, 0]
    assert records["case4"]["label"] == str(tmp_path / "lbl" / "case4.nii")  # missing: pre-flight reports it
    assert records["case0"]["origin"] == str(tmp_path / "img" / "case0.nii.gz")
    with pytest.raises(UserError, match="holds no .nii or .nii.gz files"):
        nifti_folder_records(tmp_path, tmp_path / "lbl", val_fraction=0.4, seed=0)


def test_split_keeps_patients_together() -> None:
    records = [
        {"image": f"{i}.nii", "label": None, "ich": i % 2, "patient_id": f"p{i // 3}", "case_id": str(i),
         "origin": str(i)}
        for i in range(30)
    ]
    train, val = split_records(records, val_fraction=0.3, seed=1)
    assert len(train) + len(val) == 30
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in val}
    with pytest.raises(UserError, match="val_fraction=0.0"):
        split_records(records, val_fraction=0.0, seed=1)
