"""Bad data through the real entry point: exit code 2, one message naming the file or row, no traceback,
no code run from a pickle; and `data.on_bad_sample=skip` lists what it leaves out."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.patience import patience
from omegaconf import OmegaConf

from samft.data.records import load_records


class Payload:
    """Unpickling this would create the marker file (if the loader executed it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_case(folder: Path, stem: str, *, ich: int) -> None:
    affine = np.diag([0.9, 0.9, 5.0, 1.0])
    image = np.full((24, 24, 6), 30, dtype=np.int16)
    image[:2] = -1024
    mask = np.zeros((24, 24, 6), dtype=np.uint8)
    if ich:
        mask[10:13, 10:13, 2:4] = 1
        image[mask == 1] = 70
    with open(folder / f"{stem}.pkl", "wb") as handle:
        pickle.dump({"image": image, "affine": affine}, handle)
    nib.save(nib.Nifti1Image(mask, affine), folder / "masks" / f"{stem}.nii.gz")


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    (tmp_path / "masks").mkdir()
    for i, ich in enumerate([1, 0, 1, 0]):
        write_case(tmp_path, f"{i:03d}", ich=ich)
    (tmp_path / "train.csv").write_text("path,ich,patient_id\n000.pkl,1,p0\n001.pkl,0,p1\n")
    (tmp_path / "val.csv").write_text("path,ich,patient_id\n002.pkl,1,p2\n003.pkl,0,p3\n")
    return tmp_path


def train(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "samft.train", "data=csv", f"data.train_csv={folder / 'train.csv'}",
         f"data.val_csv={folder / 'val.csv'}", f"data.mask_dir={folder / 'masks'}", f"output_dir={folder / 'out'}",
         *extra],
        capture_output=True, text=True, timeout=patience(300),
    )


def test_malicious_pickle_is_refused_and_never_runs(dataset: Path) -> None:
    marker = dataset / "pwned"
    with open(dataset / "004.pkl", "wb") as handle:
        pickle.dump(Payload(marker), handle)
    with open(dataset / "train.csv", "a") as handle:
        handle.write("004.pkl,0,p4\n")
    proc = train(dataset)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "004.pkl" in proc.stderr and "train.csv line 4" in proc.stderr
    assert not marker.exists()
    assert not list((dataset / "out").rglob("*.pth"))


def test_missing_file_and_missing_columns_name_the_row_and_the_file(dataset: Path) -> None:
    with open(dataset / "train.csv", "a") as handle:
        handle.write("missing.pkl,0,p5\n")
    proc = train(dataset)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing.pkl" in proc.stderr and "train.csv line 4" in proc.stderr

    (dataset / "val.csv").write_text("file,ich\n002.pkl,1\n")
    proc = train(dataset)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "val.csv" in proc.stderr and "path" in proc.stderr and "patient_id" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_patient_leakage_is_an_error_even_when_skipping(dataset: Path) -> None:
    (dataset / "val.csv").write_text("path,ich,patient_id\n002.pkl,1,p0\n003.pkl,0,p3\n")
    proc = train(dataset, "data.on_bad_sample=skip")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "p0" in proc.stderr


def test_skip_lists_every_left_out_sample(dataset: Path, tmp_path: Path) -> None:
    (dataset / "005.pkl").write_bytes(b"\x80\x04 truncated")
    with open(dataset / "train.csv", "a") as handle:
        handle.write("005.pkl,0,p5\n")
    data = OmegaConf.create({
        "source": "csv", "train_csv": str(dataset / "train.csv"), "val_csv": str(dataset / "val.csv"),
        "mask_dir": str(dataset / "masks"), "on_bad_sample": "skip",
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bundle = load_records(data, seed=0, run_dir=run_dir)
    assert [r["case_id"] for r in bundle.train] == ["000", "001"]
    assert len(bundle.skipped) == 1
    assert bundle.skipped[0]["origin"].endswith("train.csv line 4") and bundle.skipped[0]["split"] == "train"
    assert (run_dir / "stats.json").exists()


@pytest.mark.slow
def test_skip_through_the_cli_trains_without_the_bad_sample_and_lists_it_in_the_summary(dataset: Path) -> None:
    (dataset / "005.pkl").write_bytes(b"\x80\x04 truncated")
    with open(dataset / "train.csv", "a") as handle:
        handle.write("005.pkl,0,p5\n")
    proc = train(dataset, "data.on_bad_sample=skip", "hardware=cpu", "epochs=1", "max_steps_per_epoch=1",
                 "model.train_clicks=1", "model.val_clicks=[1]", "data.cache=none", "hardware.num_workers=0",
                 f"hydra.run.dir={dataset / 'out' / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "005.pkl" in proc.stdout + proc.stderr  # the warning names it
    summary = json.loads((dataset / "out" / "run" / "summary.json").read_text())
    [skipped] = summary["skipped_samples"]
    assert skipped["origin"].endswith("train.csv line 4") and skipped["split"] == "train"
    assert summary["epochs_run"] == 1
