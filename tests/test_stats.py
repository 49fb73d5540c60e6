"""Dataset statistics: exact values on tiny synthetic volumes, JSON output, real mask volumes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samft.data.readers import Volume
from samft.data.stats import case_summary, dataset_stats, format_stats, summarize_cases, voxel_spacing
from samft.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPE = (16, 16, 8)


def write_case(folder: Path, name: str, *, lesion: int, spacing: tuple[float, float, float]) -> dict:
    """Image -1000 HU, brain 40 HU in the middle, ``lesion`` voxels of 60/80 HU labelled 1."""
    image = np.full(SHAPE, -1000, np.int16)
    image[2:14, 2:14, 2:6] = 40
    mask = np.zeros(SHAPE, np.uint8)
    mask.reshape(-1)[:lesion] = 1  # the first voxels along x: inside the first rows of slice 0
    image[mask == 1] = np.where(np.arange(lesion) % 2, 80, 60)
    affine = np.diag([*spacing, 1.0])
    (folder / f"{name}.pkl").write_bytes(pickle.dumps({"image": image, "affine": affine}))
    label = None
    if lesion:
        label = str(folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), label)
    return {"image": str(folder / f"{name}.pkl"), "label": label, "ich": int(lesion > 0),
            "patient_id": name[0], "case_id": name, "origin": name}


@pytest.fixture
def records(tmp_path: Path) -> list[dict]:
    return [
        write_case(tmp_path, "a1", lesion=10, spacing=(0.5, 0.5, 2.0)),
        write_case(tmp_path, "a2", lesion=0, spacing=(1.0, 1.0, 1.0)),
        write_case(tmp_path, "b1", lesion=40, spacing=(1.0, 1.0, 5.0)),
    ]


def test_dataset_stats_values(records: list[dict]) -> None:
    stats = dataset_stats(records, workers=2)
    assert json.loads(json.dumps(stats)) == stats
    assert (stats["n_samples"], stats["n_patients"], stats["n_positive"], stats["n_negative"]) == (3, 2, 2, 1)
    assert stats["positive_ratio"] == pytest.approx(2 / 3)
    assert stats["shape"] == {"min": [16, 16, 8], "median": [16, 16, 8], "max": [16, 16, 8]}
    assert stats["spacing_mm"] == {"min": [0.5, 0.5, 1.0], "median": [1.0, 1.0, 2.0], "max": [1.0, 1.0, 5.0]}
    # 10 voxels of 0.5 mm^3 and 40 voxels of 5 mm^3
    assert stats["lesion_volume_ml"] == pytest.approx(
        {"count": 2, "min": 0.005, "median": 0.1025, "mean": 0.1025, "max": 0.2}
    )
    fg = stats["foreground_intensity"]
    assert fg["n_voxels"] == 50
    assert (fg["min"], fg["max"], fg["mean"], fg["std"]) == pytest.approx((60, 80, 70, 10))
    assert fg["percentile_00_5"] == pytest.approx(60) and fg["percentile_99_5"] == pytest.approx(80)
    hu = stats["hu_percentiles"]
    assert list(hu) == ["p0.5", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "p99.5"]
    assert hu["p0.5"] == -1000 and hu["p99.5"] <= 80
    assert [c["lesion_ml"] for c in stats["cases"]] == pytest.approx([0.005, 0.0, 0.2])


def test_summaries_are_deterministic_and_bounded(records: list[dict]) -> None:
    image = Volume(np.random.default_rng(0).normal(0, 100, (64, 64, 32)).astype(np.float32), np.eye(4), True)
    first = case_summary(records[0], image, None)
    again = case_summary(records[0], image, None)
    assert first["intensity_sample"].size == 10_000
    np.testing.assert_array_equal(first["intensity_sample"], again["intensity_sample"])
    assert first["foreground_sample"].size == 0 and first["lesion_ml"] == 0.0


def test_spacing_of_an_image_without_geometry_comes_from_the_mask(records: list[dict]) -> None:
    mask = Volume(np.ones(SHAPE, np.uint8), np.diag([0.4, 0.4, 5.0, 1.0]), True)
    summary = case_summary(records[0], Volume(np.zeros(SHAPE, np.int16), np.eye(4), False), mask)
    assert summary["spacing"] == pytest.approx([0.4, 0.4, 5.0])
    assert summary["lesion_ml"] == pytest.approx(np.prod(SHAPE) * 0.8 / 1000)


def test_voxel_spacing_of_an_oblique_affine() -> None:
    tilt = np.radians(18.5)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    affine[:3, :3] *= [0.488, 0.488, 5.0]
    assert voxel_spacing(affine) == pytest.approx([0.488, 0.488, 5.0])


def test_format_stats(records: list[dict]) -> None:
    text = format_stats(dataset_stats(records))
    assert "samples 3 (2 patients): 2 with hemorrhage, 1 without (positive ratio 0.67)" in text
    assert "spacing  min 0.50 x 0.50 x 1.00" in text
    assert "lesions  2: min 0.01  median 0.10  mean 0.10  max 0.20 ml" in text
    assert "foreground intensity  mean 70.0  std 10.0  p0.5 60.0  p99.5 80.0 HU" in text
    negatives = format_stats(dataset_stats([r for r in records if not r["ich"]]))
    assert "lesions  none" in negatives and "foreground intensity  none" in negatives


def test_no_samples() -> None:
    with pytest.raises(UserError, match="no samples"):
        summarize_cases([])


def test_real_mask_lesion_volumes(tmp_path: Path) -> None:
    masks = sorted((SHARED_DATA / "hemorrhage_masks" / "val").glob("*.nii.gz"))[:3]
    if not masks:
        pytest.skip("../shared/data is absent")
    records = [
        {"image": str(m), "label": str(m), "ich": 1, "patient_id": m.name, "case_id": m.name, "origin": m.name}
        for m in masks
    ]
    stats = dataset_stats(records)
    for case, path in zip(stats["cases"], masks):
        image = nib.load(path)
        expected = np.count_nonzero(np.asanyarray(image.dataobj)) * np.prod(image.header.get_zooms()[:3]) / 1000
        assert case["lesion_ml"] == pytest.approx(expected, rel=1e-4)
        assert 0.01 < case["lesion_ml"] < 200
        assert case["spacing"] == pytest.approx(image.header.get_zooms()[:3], rel=1e-4)
    assert stats["foreground_intensity"]["mean"] == pytest.approx(1.0)  # the mask read as its own image
