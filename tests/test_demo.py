"""The demo phantom: deterministic, in the users' format, anatomically plausible, cached atomically."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from samft.data import demo
from samft.data.readers import load_nifti, read_volume
from samft.data.sources import csv_records
from samft.errors import UserError

SMALL = {"shape": (64, 64, 16), "spacing": (3.0, 3.0, 10.0)}  # same field of view as the default, few voxels


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    demo.write_demo_dataset(root, n_patients=6, seed=3, **SMALL)
    return root


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        demo.write_demo_dataset(tmp_path / name, n_patients=3, seed=7, **SMALL)
    demo.write_demo_dataset(tmp_path / "c", n_patients=3, seed=8, **SMALL)
    first, second, other = (_digest(tmp_path / n) for n in "abc")
    assert len(first) == 2 + 2 * 6  # two CSVs, 6 volumes and 6 masks
    assert first == second
    assert first["volumes/000.pkl"] != other["volumes/000.pkl"]


def test_csv_format_patient_split_and_negative_share(dataset: Path) -> None:
    train, val = _rows(dataset / "train.csv"), _rows(dataset / "val.csv")
    assert list(train[0]) == ["path", "ich", "patient_id"]
    train_patients = {r["patient_id"] for r in train}
    val_patients = {r["patient_id"] for r in val}
    assert train_patients and val_patients and not train_patients & val_patients
    rows = train + val
    assert len(rows) == 12 and len({r["patient_id"] for r in rows}) == 6  # two scans per patient
    negatives = sum(r["ich"] == "0" for r in rows)
    assert negatives == 4  # a third
    assert {r["ich"] for r in val} == {"0", "1"}  # validation sees both kinds
    for r in rows:  # relative paths, resolved against the CSV's folder
        assert not Path(r["path"]).is_absolute() and (dataset / r["path"]).is_file()
        assert (dataset / "masks" / f"{Path(r['path']).stem}.nii.gz").is_file()


def test_records_read_safely_with_matching_geometry(dataset: Path) -> None:
    train, val = csv_records(dataset / "train.csv", dataset / "val.csv", dataset / "masks")
    for record in train + val:
        image, image_affine = read_volume(record["image"])[:2]
        mask, mask_affine = load_nifti(record["label"])
        assert image.dtype == np.int16 and mask.dtype == np.uint8
        assert image.shape == mask.shape == SMALL["shape"]
        np.testing.assert_allclose(mask_affine, image_affine, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(image_affine[:3, :3], axis=0), SMALL["spacing"], rtol=1e-6)
        assert set(np.unique(mask)) <= {0, 1}
        assert bool(mask.any()) == bool(record["ich"])


def test_default_geometry_is_anisotropic_scanner_like() -> None:
    phantom = demo.make_phantom(np.random.default_rng(0), n_bleeds=1)
    assert phantom.image.shape == demo.DEFAULT_SHAPE
    np.testing.assert_allclose(np.linalg.norm(phantom.affine[:3, :3], axis=0), demo.DEFAULT_SPACING)
    assert nib.aff2axcodes(phantom.affine) == ("L", "P", "S")  # as DICOM converters store CT


def test_tissues_have_ct_values() -> None:
    phantom = demo.make_phantom(np.random.default_rng(1), n_bleeds=0)
    hu = phantom.image.astype(np.float32)
    assert hu.min() == demo.AIR_HU
    assert 900 <= np.percentile(hu[hu > 300], 50) <= 1300  # skull
    inside = _inside_skull(hu)
    soft = hu[inside & (hu > 15) & (hu < 60)]
    assert 30 <= np.median(soft) <= 40  # parenchyma
    csf = hu[inside & (hu > -20) & (hu < 15)]
    assert csf.size > 500 and abs(np.median(csf) - 5) < 4  # ventricles and CSF
    noise = hu[inside & (hu > 15) & (hu < 60)].std()
    assert 3 <= noise <= 12


def _inside_skull(hu: np.ndarray) -> np.ndarray:
    """Voxels enclosed by bone, slice by slice, excluding the bone itself."""
    bone = hu > 300
    filled = np.stack([ndimage.binary_fill_holes(bone[:, :, z]) for z in range(hu.shape[2])], axis=2)
    return filled & ~bone


def test_bleeds_are_blood_dense_inside_the_brain_with_varied_sizes(dataset: Path) -> None:
    sizes = []
    train, val = csv_records(dataset / "train.csv", dataset / "val.csv", dataset / "masks")
    for record in (r for r in train + val if r["ich"]):
        image, affine = read_volume(record["image"])[:2]
        mask = load_nifti(record["label"])[0] > 0
        hu = image.astype(np.float32)
        assert np.all(_inside_skull(hu)[mask])
        labels, count = ndimage.label(mask)
        assert 1 <= count <= 3 + 2  # 1-3 bleeds; a lumpy one may split at this coarse test resolution
        core = ndimage.binary_erosion(mask, iterations=1)
        assert 50 <= np.median(hu[core if core.any() else mask]) <= 90
        sizes.append(mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)
    assert min(sizes) < 1.0 and max(sizes) > 5.0  # small bleeds (< 1 ml) and large ones


def test_small_bleeds_at_default_resolution() -> None:
    rng = np.random.default_rng(5)
    volumes = [demo.make_phantom(rng, n_bleeds=1, force_small=True).lesion_ml for _ in range(3)]
    assert all(0.05 < v < 1.0 for v in volumes)


def test_ensure_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def small_writer(root: Path, **kwargs) -> tuple[Path, Path, Path]:
        calls.append(root)
        return write(root, **kwargs, **SMALL)

    write = demo.write_demo_dataset
    monkeypatch.setattr(demo, "write_demo_dataset", small_writer)
    root = tmp_path / "cache" / "demo-0-3"
    train_csv, val_csv, mask_dir = demo.ensure_demo_dataset(root=root, n_patients=3, seed=0)
    assert (train_csv, val_csv, mask_dir) == (root / "train.csv", root / "val.csv", root / "masks")
    assert train_csv.is_file() and len(list(mask_dir.iterdir())) == 6
    assert calls and calls[0] != root  # written elsewhere, then renamed into place
    assert sorted(p.name for p in root.parent.iterdir()) == ["demo-0-3"]  # no temporary folders left
    before = _digest(root)
    demo.ensure_demo_dataset(root=root, n_patients=3, seed=0)
    assert len(calls) == 1 and _digest(root) == before
    demo.ensure_demo_dataset(root=root, n_patients=4, seed=0)  # other settings: regenerated in place
    assert len(calls) == 2 and len(list(mask_dir.iterdir())) == 8


def test_a_concurrent_process_keeps_reading_the_set_it_finished_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes generate the same set at once: the one that finishes second must not move aside (and delete)
    the first one's finished folder, which that process is reading by now."""
    root = tmp_path / "demo-0-3"
    write = demo.write_demo_dataset

    def racing_writer(folder: Path, **kwargs) -> tuple[Path, Path, Path]:
        monkeypatch.setattr(demo, "write_demo_dataset", lambda f, **kw: write(f, **kw, **SMALL))
        demo.ensure_demo_dataset(root=root, n_patients=3, seed=0)  # the other process wins the race
        (root / "opened-by-the-winner").touch()  # stands for the winner's open files
        return write(folder, **kwargs, **SMALL)

    monkeypatch.setattr(demo, "write_demo_dataset", racing_writer)
    train_csv, _, _ = demo.ensure_demo_dataset(root=root, n_patients=3, seed=0)
    assert (root / "opened-by-the-winner").exists() and train_csv.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-0-3"]  # the loser's copy is gone


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(root: Path, **kwargs) -> None:
        (root / "volumes").mkdir()
        (root / "volumes" / "000.pkl").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_demo_dataset", crash)
    root = tmp_path / "demo-0-3"
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(root=root, n_patients=3, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a samft demo data set"):
        demo.ensure_demo_dataset(root=tmp_path, n_patients=3, seed=0)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_default_folder_follows_xdg_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.default_demo_dir(seed=4, n_patients=16) == tmp_path / "samft" / "demo-4-16"
