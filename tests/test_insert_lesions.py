"""Lesion insertion (samft.synth): brain segmentation, noise model, physical resampling, placement, the written
data set.

The synthetic tests use a small demo phantom and ellipsoid masks on oblique grids; the real-data tests use
`../shared/data` (one head CT, a few expert masks) and skip when it is absent.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from samft.data import demo
from samft.data.preflight import preflight
from samft.data.readers import load_nifti, read_volume
from samft.data.sources import csv_records
from samft.errors import UserError
from samft.synth import NoiseModel, brain_mask, estimate_noise, insert_lesions, load_scan
from samft.synth.brain import brain_blocks
from samft.synth.cli import main as synth_main
from samft.synth.placement import MAX_ROTATION_DEG, lesion_occupancy, placements, read_lesion, top_voxels
from samft.synth.render import MAX_SHIFT_MM, shift_volume
from samft.synth.scan import Scan

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_TRAIN = ("059fb16067", "067b82e422", "03e92a47d9")  # 0.5 ml; 8.9 ml; 12.6 ml in several components
REAL_VAL = ("02bb3e7d9d",)


def _rotation_x(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def _ellipsoid_mask(path: Path, *, axes_mm: tuple[float, float, float], spacing: tuple[float, float, float],
                    tilt_deg: float) -> None:
    """An ellipsoid (semi-axes along the mm axes) on a tilted LPS grid like a scanner's, saved as NIfTI."""
    linear = _rotation_x(tilt_deg) @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    shape = np.ceil(2.6 * np.array(axes_mm) / np.array(spacing)).astype(int) + 4
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.array([20.0, -10.0, 30.0]) - linear @ ((shape - 1) / 2.0)
    world = np.tensordot(linear, np.indices(shape), axes=1) + (affine[:3, 3] - [20.0, -10.0, 30.0])[:, None, None, None]
    inside = sum((world[i] / axes_mm[i]) ** 2 for i in range(3)) <= 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), path)


def _volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    return float(np.count_nonzero(mask) * abs(np.linalg.det(affine[:3, :3])) / 1000.0)


def _spread_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Std of the lesion's voxel positions along its principal axes (mm; invariant to rotations and flips)."""
    points = np.argwhere(mask) @ affine[:3, :3].T
    return np.sqrt(np.linalg.eigvalsh(np.cov(points.T)))


def _manifest(out: Path, split: str) -> dict[str, dict[str, str]]:
    with open(out / f"{split}_lesions.csv", newline="") as f:
        return {row["stem"]: row for row in csv.DictReader(f)}


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_written(out: Path, ct_path: Path, sources: dict[str, Path]) -> None:
    """Every lesion inside the brain, with the source's volume and shape, painted at its blood HU."""
    hu, affine = load_nifti(ct_path)
    brain = brain_mask(hu, np.linalg.norm(affine[:3, :3], axis=0))
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    rows = {**_manifest(out, "train"), **_manifest(out, "val")}
    cores = 0
    for stem, source in sources.items():
        row = rows[stem]
        assert row["status"] == "inserted"
        image, image_affine = read_volume(out / "volumes" / f"{stem}.pkl")[:2]
        written, mask_affine = load_nifti(out / "masks" / f"{stem}.nii.gz")
        assert image.dtype == np.int16 and written.dtype == np.uint8
        np.testing.assert_allclose(image_affine, affine)
        np.testing.assert_allclose(mask_affine, affine, atol=1e-4)
        lesion = written == 1
        shift = (int(row["shift_x"]), int(row["shift_y"]), 0)
        assert not np.any(lesion & ~shift_volume(brain, shift, False)), f"{stem}: lesion voxels outside the brain"
        # judged without the module's brain mask too: the scan under the lesion was soft tissue, no bone or air
        under = shift_volume(hu, shift, -1000.0)[lesion]
        assert under.min() > -50.0 and under.max() < 100.0, f"{stem}: lesion over bone or air"
        assert 15.0 <= float(np.median(under)) <= 60.0, f"{stem}: lesion not over parenchyma"
        assert abs(float(row["rotation_deg"])) <= MAX_ROTATION_DEG == 15.0, f"{stem}: rotated too far"
        # Volume: the written lesion is the K most covered CT voxels, K = source volume / CT voxel volume,
        # so it matches to half a CT voxel by construction (the occupancy test checks the resampling itself).
        source_mask, source_affine = load_nifti(source)
        assert abs(_volume_ml(lesion, affine) - _volume_ml(source_mask, source_affine)) <= 0.5 * voxel_ml + 1e-9
        # Shape: the principal spreads agree up to slice discretisation (a 5-6 mm slice adds up to
        # thickness^2 / 12 to a variance, ~0.5 mm on a 2.5 mm spread) and partial volume: 10% or 0.6 mm.
        source_spread, spread = _spread_mm(source_mask != 0, source_affine), _spread_mm(lesion, affine)
        assert np.all(np.abs(spread - source_spread) <= np.maximum(0.1 * source_spread, 0.6)), stem
        # Density: blood HU drawn from 50-90; the lesion core (all 26 neighbours lesion: full coverage, no
        # edge blur) has that mean up to noise; partial-volume edges make the whole lesion darker, never brighter.
        blood = float(row["blood_hu"])
        assert 50.0 <= blood <= 90.0
        core = ndimage.binary_erosion(lesion, structure=np.ones((3, 3, 3), dtype=bool))
        if core.sum() >= 20:
            cores += 1
            assert abs(image[core].mean() - blood) < 4.0, stem
        assert 25.0 < image[lesion].mean() <= blood + 4.0
    assert cores, "no lesion large enough to measure its core"


def _check_loads(out: Path, n_train: int, n_val: int) -> None:
    """The CSVs load through the csv source and pass the pre-flight check without a problem or warning."""
    train, val = csv_records(out / "train.csv", out / "val.csv", out / "masks")
    assert (len(train), len(val)) == (n_train, n_val)
    report = preflight(train, val)
    assert report.skipped == [] and report.warnings == []
    assert len(report.train) == n_train and len(report.val) == n_val
    for record in train + val:
        assert record["patient_id"] == record["case_id"]
        empty = not load_nifti(record["label"])[0].any()
        assert empty == (record["ich"] == 0)
    assert {r["ich"] for r in train} == {0, 1} and {r["ich"] for r in val} == {0, 1}


# ---------------------------------------------------------------------------------------------- synthetic


def test_brain_mask_keeps_parenchyma_and_drops_csf_bone_air() -> None:
    spacing = (0.5, 0.5, 5.0)
    hu = np.full((100, 100, 6), -1000.0)
    hu[15:85, 15:85, :] = 1000.0  # skull
    hu[20:80, 20:80, 1:5] = 30.0  # parenchyma
    hu[48:51, 20:50, 1:5] = 5.0  # a 1.5 mm sulcus from the surface inwards
    hu[55:75, 55:75, 1:5] = 5.0  # a 10 mm ventricle
    strict = brain_mask(hu, spacing)
    assert strict[35, 35, 2] and strict[35, 35, 1] and strict[70, 40, 4]
    assert not strict[49, 30, 2] and not strict[65, 65, 2]  # CSF
    assert not strict[17, 50, 2] and not strict[5, 5, 2] and not strict[50, 50, 0]  # bone, air
    assert not strict[21, 35, 2] and not strict[54, 65, 2]  # eroded 1.5 mm off the skull and the ventricle
    sulci = brain_mask(hu, spacing, sulci_mm=3.0)
    assert sulci[49, 30, 2] and not sulci[65, 65, 2]  # the sulcus is taken in, the ventricle not
    assert np.all(strict <= sulci)


def test_noise_estimate_recovers_a_known_noise_model() -> None:
    truth = NoiseModel(sigma=5.0, corr=(1.2, 0.6))
    noise = truth.sample(np.random.default_rng(0), (128, 128, 8))
    assert abs(noise.std() - 5.0) < 0.2
    brain = np.zeros(noise.shape, dtype=bool)
    brain[8:-8, 8:-8] = True
    fitted = estimate_noise(30.0 + noise, brain)
    assert abs(fitted.sigma - 5.0) < 0.5
    assert np.allclose(fitted.corr, truth.corr, atol=0.15)


def test_occupancy_keeps_physical_volume_and_shape(tmp_path: Path) -> None:
    """An ellipsoid on a tilted 0.5 x 0.5 x 2 mm grid, rotated and mirrored onto a 0.9 x 0.9 x 5 mm grid
    tilted the other way: the occupancy integrates to the source volume and has its second moments."""
    _ellipsoid_mask(tmp_path / "m.nii.gz", axes_mm=(9.0, 6.0, 5.0), spacing=(0.5, 0.5, 2.0), tilt_deg=15.0)
    lesion = read_lesion(tmp_path / "m.nii.gz")
    ct_linear = _rotation_x(-10.0) @ np.diag([-0.9, -0.9, 5.0])
    turn = _rotation_x(12.0) @ np.diag([-1.0, 1.0, 1.0])
    occupancy = lesion_occupancy(lesion, ct_linear, turn, np.array([0.3, 0.7, 0.1]))
    voxel_mm3 = abs(np.linalg.det(ct_linear))
    assert occupancy.min() >= 0.0 and occupancy.max() == pytest.approx(1.0)
    assert occupancy.sum() * voxel_mm3 == pytest.approx(lesion.volume_mm3, rel=0.01)
    assert lesion.volume_mm3 == pytest.approx(4.0 / 3.0 * np.pi * 9 * 6 * 5, rel=0.05)
    points = np.argwhere(occupancy > 0) @ ct_linear.T
    weights = occupancy[occupancy > 0]
    centred = points - np.average(points, axis=0, weights=weights)
    spread = np.sqrt(np.linalg.eigvalsh(np.cov(centred.T, aweights=weights)))
    # a solid ellipsoid's std along a semi-axis a is a / sqrt(5); the 5 mm slices add up to 25/12 mm^2
    expected = np.array([5.0, 6.0, 9.0]) / np.sqrt(5.0)
    assert np.all(np.abs(spread - expected) <= np.maximum(0.1 * expected, 0.6))
    label = top_voxels(occupancy, round(lesion.volume_mm3 / voxel_mm3))
    assert label.sum() == round(lesion.volume_mm3 / voxel_mm3)
    assert occupancy[label].min() >= occupancy[~label].max()


@pytest.mark.parametrize("pool", [(1, 1, 1), (2, 2, 1)])
def test_placements_keep_every_lesion_voxel_in_the_brain(pool: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    brain = ndimage.gaussian_filter(rng.random((40, 36, 10)), 2.0) > 0.5
    label = np.zeros((5, 4, 3), dtype=bool)
    label[1:4, :, 1] = True
    label[2, 1:3, :] = True
    origin, outside = brain_blocks(brain, np.array(pool))
    scan = Scan(np.zeros(brain.shape, np.float32), np.eye(4), brain, NoiseModel(1.0, (0.0, 0.0)),
                    np.array(pool), origin, outside)
    found = {tuple(o) for o in placements(scan, label)}
    fits = {o for o in np.ndindex(*(np.array(brain.shape) - label.shape + 1))
            if brain[tuple(slice(a, a + n) for a, n in zip(o, label.shape))][label].all()}
    assert found and found <= fits
    if pool == (1, 1, 1):
        assert found == fits


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom head CT, two train and one val ellipsoid masks, and the data set the CLI makes of them."""
    root = tmp_path_factory.mktemp("phantom")
    head = demo.make_phantom(np.random.default_rng(0), shape=(128, 128, 24), spacing=(1.5, 1.5, 6.0), n_bleeds=0)
    nib.save(nib.Nifti1Image(head.image, head.affine), root / "ct.nii.gz")
    _ellipsoid_mask(root / "train" / "a.nii.gz", axes_mm=(8.0, 5.0, 6.0), spacing=(0.5, 0.5, 2.0), tilt_deg=15.0)
    _ellipsoid_mask(root / "train" / "b.nii.gz", axes_mm=(14.0, 10.0, 12.0), spacing=(0.8, 0.8, 3.0), tilt_deg=-10.0)
    _ellipsoid_mask(root / "val" / "c.nii.gz", axes_mm=(7.0, 7.0, 9.0), spacing=(0.45, 0.45, 5.0), tilt_deg=0.0)
    synth_main(["--ct", str(root / "ct.nii.gz"), "--masks", str(root / "train"), "--val-masks", str(root / "val"),
             "--out", str(root / "out"), "--seed", "3"])
    return root


def test_phantom_lesions_lie_in_the_brain_with_their_volume_shape_and_density(phantom: Path) -> None:
    masks = {s: phantom / split / f"{s}.nii.gz" for s, split in (("a", "train"), ("b", "train"), ("c", "val"))}
    _check_written(phantom / "out", phantom / "ct.nii.gz", masks)


def test_phantom_set_passes_preflight_with_negatives(phantom: Path) -> None:
    out = phantom / "out"
    _check_loads(out, n_train=3, n_val=2)  # half as many negatives as lesions, rounded up
    with open(out / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"path": "volumes/a.pkl", "ich": "1", "patient_id": "a"},
        {"path": "volumes/b.pkl", "ich": "1", "patient_id": "b"},
        {"path": "volumes/train_neg000.pkl", "ich": "0", "patient_id": "train_neg000"},
    ]
    # a negative is the scan shifted by a few voxels with fresh noise of half the scan's on top
    ct = load_nifti(phantom / "ct.nii.gz")[0]
    sigma = load_scan(phantom / "ct.nii.gz").noise.sigma
    for split in ("train", "val"):
        row = _manifest(out, split)[f"{split}_neg000"]
        shift = (int(row["shift_x"]), int(row["shift_y"]), 0)
        assert max(map(abs, shift)) <= MAX_SHIFT_MM / 1.5
        negative = read_volume(out / "volumes" / f"{split}_neg000.pkl").array.astype(float)
        brain = shift_volume(brain_mask(ct, (1.5, 1.5, 6.0)), shift, False)
        extra = (negative - shift_volume(ct, shift, ct.min()))[brain]
        assert abs(extra.mean()) < 0.5 and 0.4 * sigma < extra.std() < 0.6 * sigma


def test_api_records_are_the_csv_records(tmp_path: Path, phantom: Path) -> None:
    records = insert_lesions(ct_path=phantom / "ct.nii.gz", mask_paths=[phantom / "train" / "a.nii.gz"],
                                out_dir=tmp_path, split="train", seed=3, negatives=2)
    (tmp_path / "val.csv").write_text("path,ich,patient_id\nvolumes/a.pkl,1,x\n")
    assert records == csv_records(tmp_path / "train.csv", tmp_path / "val.csv", tmp_path / "masks")[0]
    assert [r["ich"] for r in records] == [1, 0, 0]


def test_same_seed_same_bytes_whatever_the_other_masks(tmp_path: Path, phantom: Path) -> None:
    """Each volume depends on the seed and its own name only: a subset run reproduces the full run's files."""
    for name, seed in (("again", 3), ("other", 4)):
        insert_lesions(ct_path=phantom / "ct.nii.gz", mask_paths=[phantom / "train" / "b.nii.gz"],
                          out_dir=tmp_path / name, split="train", seed=seed, negatives=1)
    full, again, other = _digests(phantom / "out"), _digests(tmp_path / "again"), _digests(tmp_path / "other")
    for name in ("volumes/b.pkl", "masks/b.nii.gz", "volumes/train_neg000.pkl", "masks/train_neg000.nii.gz"):
        assert again[name] == full[name]
    assert other["volumes/b.pkl"] != full["volumes/b.pkl"]
    assert other["masks/b.nii.gz"] != full["masks/b.nii.gz"]


def test_a_lesion_that_cannot_fit_is_reported_not_written(tmp_path: Path, phantom: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _ellipsoid_mask(tmp_path / "masks" / "huge.nii.gz", axes_mm=(45.0, 50.0, 40.0), spacing=(3.0, 3.0, 6.0),
                    tilt_deg=0.0)
    with caplog.at_level(logging.WARNING, logger="samft.data"):
        records = insert_lesions(ct_path=phantom / "ct.nii.gz", out_dir=tmp_path / "out", split="val", seed=0,
                                    mask_paths=[tmp_path / "masks" / "huge.nii.gz", phantom / "val" / "c.nii.gz"],
                                    negatives=0)
    assert [r["case_id"] for r in records] == ["c"]
    assert "skipped" in caplog.text and "huge.nii.gz" in caplog.text and "does not fit" in caplog.text
    row = _manifest(tmp_path / "out", "val")["huge"]
    assert row["status"] == "skipped" and "does not fit" in row["note"]
    assert not (tmp_path / "out" / "volumes" / "huge.pkl").exists()
    with pytest.raises(UserError, match="no lesion of the 1 train mask"):
        insert_lesions(ct_path=phantom / "ct.nii.gz", mask_paths=[tmp_path / "masks" / "huge.nii.gz"],
                          out_dir=tmp_path / "out", split="train", seed=0, negatives=0)


def test_user_errors(tmp_path: Path, phantom: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct, a = phantom / "ct.nii.gz", phantom / "train" / "a.nii.gz"
    with pytest.raises(SystemExit) as exit_info:
        synth_main(["--ct", str(tmp_path / "missing.nii.gz"), "--masks", str(phantom / "train"),
                    "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.nii.gz" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="exists; write into a new --out folder"):
        insert_lesions(ct_path=ct, mask_paths=[a], out_dir=phantom / "out", split="train")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train.csv").write_text("path,ich,patient_id\nvolumes/a.pkl,1,a\n")
    with pytest.raises(UserError, match="already in .*train.csv; a mask may be in one split only"):
        insert_lesions(ct_path=ct, mask_paths=[a], out_dir=tmp_path / "x", split="val")
    with pytest.raises(SystemExit):
        synth_main(["--ct", str(ct), "--masks", str(phantom / "train"), "--val-masks", str(phantom / "train"),
                 "--out", str(tmp_path / "z")])
    assert "in both --masks and --val-masks" in capsys.readouterr().err
    with pytest.raises(UserError, match="mask names repeat"):
        insert_lesions(ct_path=ct, mask_paths=[a, a], out_dir=tmp_path / "y", split="train")


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three train and one val expert mask inserted into the real head CT."""
    masks = [SHARED / "hemorrhage_masks" / "train" / f"{s}.nii.gz" for s in REAL_TRAIN]
    val = [SHARED / "hemorrhage_masks" / "val" / f"{s}.nii.gz" for s in REAL_VAL]
    if not all(p.is_file() for p in [SHARED / "head_ct.nii.gz", *masks, *val]):
        pytest.skip(f"real data not found in {SHARED}")
    out = tmp_path_factory.mktemp("real")
    for split, paths in (("train", masks), ("val", val)):
        insert_lesions(ct_path=SHARED / "head_ct.nii.gz", mask_paths=paths, out_dir=out, split=split, seed=0)
    return out


@pytest.mark.slow
def test_real_lesions_lie_in_the_brain_with_their_volume_shape_and_density(real: Path) -> None:
    sources = {s: SHARED / "hemorrhage_masks" / "train" / f"{s}.nii.gz" for s in REAL_TRAIN}
    sources.update({s: SHARED / "hemorrhage_masks" / "val" / f"{s}.nii.gz" for s in REAL_VAL})
    _check_written(real, SHARED / "head_ct.nii.gz", sources)


@pytest.mark.slow
def test_real_set_passes_preflight_with_negatives(real: Path) -> None:
    _check_loads(real, n_train=len(REAL_TRAIN) + 2, n_val=len(REAL_VAL) + 1)  # half as many negatives, rounded up


@pytest.mark.slow
def test_real_subset_reproduces_the_same_bytes(real: Path, tmp_path: Path) -> None:
    insert_lesions(ct_path=SHARED / "head_ct.nii.gz", out_dir=tmp_path, split="train", seed=0, negatives=1,
                      mask_paths=[SHARED / "hemorrhage_masks" / "train" / f"{REAL_TRAIN[0]}.nii.gz"])
    full, subset = _digests(real), _digests(tmp_path)
    for name in (f"volumes/{REAL_TRAIN[0]}.pkl", f"masks/{REAL_TRAIN[0]}.nii.gz", "volumes/train_neg000.pkl"):
        assert subset[name] == full[name]
