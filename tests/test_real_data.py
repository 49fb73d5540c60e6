"""Real files from ../shared/data (skipped when absent): the oblique, anisotropic geometry of a real head CT
and of real hemorrhage masks survives reading, preprocessing, inversion and writing back."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import MetaTensor
from monai.transforms import Invertd

from samft.data.transforms import build_transforms, crop_around_label

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEAD_CT = SHARED_DATA / "head_ct.nii.gz"
# a 0.3 ml bleed on a gantry-tilted grid (oblique affine, 5.39 mm between slices), a 0.5 ml one axis-aligned
MASKS = [SHARED_DATA / "hemorrhage_masks" / "train" / f"{n}.nii.gz" for n in ("02fe96388e", "059fb16067")]

pytestmark = pytest.mark.slow


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def write_back(inverted: MetaTensor, path: Path) -> nib.Nifti1Image:
    nib.save(nib.Nifti1Image(inverted[0].numpy().astype(np.uint8), inverted.affine.numpy()), path)
    return nib.load(path)


def test_head_ct_round_trip(tmp_path: Path) -> None:
    if not HEAD_CT.is_file():
        pytest.skip(f"{HEAD_CT} not present")
    original = nib.load(HEAD_CT)
    hu = np.asanyarray(original.dataobj)
    assert nib.aff2axcodes(original.affine) == ("L", "P", "S")
    pipeline = build_transforms(stage="predict")
    out = pipeline({"image": str(HEAD_CT)})

    # read: voxels and header geometry unchanged
    np.testing.assert_allclose(out["image"].meta["original_affine"], original.affine, atol=1e-5)
    # preprocessed: 1.5 mm RAS, still tilted by the same 18.5 degrees
    affine = out["image"].affine.numpy()
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.5, 1.5, 1.5], rtol=1e-5)
    cosines = affine[:3, :3] / 1.5
    tilt = np.degrees(np.arccos(abs(cosines[2, 2])))
    assert tilt == pytest.approx(np.degrees(np.arccos(original.affine[2, 2] / 5.0)), abs=0.05)
    assert tilt == pytest.approx(18.5, abs=0.5)

    # inverted and written: the original grid, and bone lands where it was
    out["pred"] = MetaTensor((out["image"] >= 1.0).float(), meta=dict(out["image"].meta))  # >= 80 HU
    inverted = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=True)(out)["pred"]
    saved = write_back(inverted, tmp_path / "bone.nii.gz")
    assert saved.shape == original.shape == (512, 512, 29)
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-4)
    np.testing.assert_allclose(saved.header.get_zooms(), original.header.get_zooms(), rtol=1e-5)
    assert nib.aff2axcodes(saved.affine) == ("L", "P", "S")
    assert dice(np.asanyarray(saved.dataobj) > 0, hu >= 80) > 0.9


@pytest.fixture(scope="module")
def mask_cases(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Semi-synthetic cases in the users' format: a `.pkl` image (70 HU bleed, 30 HU elsewhere) carrying
    the real mask's affine, and the real mask."""
    present = [m for m in MASKS if m.is_file()]
    if not present:
        pytest.skip("hemorrhage masks not present")
    folder = tmp_path_factory.mktemp("real_masks")
    cases = []
    for mask_path in present:
        mask = nib.load(mask_path)
        hu = np.where(np.asanyarray(mask.dataobj) > 0, 70, 30).astype(np.int16)
        image = folder / f"{mask_path.name.split('.')[0]}.pkl"
        image.write_bytes(pickle.dumps({"image": hu, "affine": mask.affine}))
        cases.append({"image": str(image), "label": str(mask_path), "ich": 1, "case_id": image.stem})
    return cases


@pytest.fixture(scope="module")
def predict_pipeline():
    return build_transforms(stage="predict")


@pytest.fixture(scope="module")
def preprocessed(mask_cases: list[dict], predict_pipeline) -> list[dict]:
    return [predict_pipeline(case) for case in mask_cases]


def test_masks_round_trip(mask_cases: list[dict], preprocessed: list[dict], predict_pipeline, tmp_path) -> None:
    for case, out in zip(mask_cases, preprocessed):
        original = nib.load(case["label"])
        truth = np.asanyarray(original.dataobj) > 0
        np.testing.assert_allclose(out["label"].affine.numpy(), out["image"].affine.numpy())
        voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
        resampled_ml = float(out["label"].sum()) * 1.5**3 / 1000
        assert resampled_ml == pytest.approx(truth.sum() * voxel_ml, rel=0.15)  # nearest keeps the volume
        invert = Invertd(keys="label", transform=predict_pipeline, orig_keys="label", nearest_interp=True)
        inverted = invert(out)["label"]
        saved = write_back(inverted, tmp_path / f"{case['case_id']}.nii.gz")
        assert saved.shape == original.shape
        np.testing.assert_allclose(saved.affine, original.affine, atol=1e-4)
        np.testing.assert_allclose(saved.header.get_zooms(), original.header.get_zooms(), rtol=1e-5)
        assert dice(np.asanyarray(saved.dataobj) > 0, truth) > 0.8


def test_training_and_validation_crops_hold_the_real_lesion(mask_cases: list[dict], preprocessed) -> None:
    case = mask_cases[0]
    whole = preprocessed[0]["label"].sum()
    val = build_transforms(stage="val")(case)
    _, crop = crop_around_label(val["image"], val["label"], (128, 128, 128), air=0.0)
    assert crop.shape == (1, 128, 128, 128)
    assert crop.sum() == whole  # the crop is centred on the lesion, which fits in 192 mm
    train = build_transforms(stage="train", fg_oversample=1.0, aug_prob=1.0, affine_prob=1.0)
    train.set_random_state(0)
    sample = train(case)
    image, label = sample["image"][0].numpy(), sample["label"][0].numpy() > 0.5
    assert sample["image"].shape == (1, 128, 128, 128) and label.any()
    inside, outside = np.median(image[label]), np.median(image[~label & (image > 0.2)])
    assert inside > outside + 0.3  # 70 HU bleed vs 30 HU brain after windowing and augmentation
