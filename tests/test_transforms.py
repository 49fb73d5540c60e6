"""The shared MONAI pipeline and the loaders: shapes, alignment under every random transform, small
lesions kept, validation crops, invertible prediction preprocessing, caching and reproducibility."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Invertd,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from scipy import ndimage

from samft.data import transforms as T
from samft.data.datamodule import EpochSampler, build_dataloaders, default_num_workers
from samft.data.transforms import Preprocessing, build_transforms, intensity_range
from samft.engine.validation import ScanValidation
from samft.errors import UserError

SPACING = (2.0, 2.0, 2.0)
ROI = 32


def oblique_affine(spacing: tuple[float, float, float], tilt_deg: float = 15.0) -> np.ndarray:
    """LPS-stored axes with a gantry tilt about left-right, like a scanner's NIfTI."""
    t = np.deg2rad(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = tilt @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    return affine


def blobs(shape: tuple[int, int, int], spacing: tuple[float, float, float], spheres) -> np.ndarray:
    """Union of balls ((centre voxel), radius mm)."""
    idx = np.indices(shape).astype(np.float32)
    mm = idx * np.asarray(spacing, dtype=np.float32)[:, None, None, None]
    mask = np.zeros(shape, dtype=bool)
    for centre, radius in spheres:
        c = np.asarray(centre, dtype=np.float32) * np.asarray(spacing, dtype=np.float32)
        mask |= np.sum((mm - c[:, None, None, None]) ** 2, axis=0) <= radius**2
    return mask


def write_case(
    folder: Path, name: str, mask: np.ndarray | None, *, spacing=(1.0, 1.2, 4.0), image=None, ich=None
) -> dict:
    """A `.pkl` HU image and a NIfTI mask. The default image is 1000 HU in the mask and -920 HU elsewhere:
    symmetric about the window centre (40 HU), so interpolated edges cross 0.5 where the mask's edge is."""
    affine = oblique_affine(spacing)
    if image is None:
        image = np.where(mask, 1000, -920).astype(np.int16)
    with open(folder / f"{name}.pkl", "wb") as f:
        pickle.dump({"image": image, "affine": affine}, f)
    label = None
    if mask is not None:
        label = str(folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), label)
    has_lesion = int(mask is not None and mask.any())
    return {"image": str(folder / f"{name}.pkl"), "label": label, "ich": has_lesion if ich is None else ich,
            "patient_id": name, "case_id": name, "origin": f"test {name}"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("cases")
    shape, spacing = (48, 40, 14), (1.0, 1.2, 4.0)
    asymmetric = blobs(shape, spacing, [((14, 12, 5), 7.0), ((34, 26, 9), 4.0)])  # one big, one small ball
    head = blobs(shape, spacing, [((24, 20, 7), 18.0)])
    return {
        "lesions": write_case(folder, "lesions", asymmetric, spacing=spacing),
        "negative": write_case(folder, "negative", None, spacing=spacing, image=np.where(head, 30, -1024)),
        "tiny": write_case(folder, "tiny", blobs((80, 80, 20), (1.0, 1.0, 4.0), [((60, 15, 4), 1.0)]),
                           spacing=(1.0, 1.0, 4.0)),
    }


def prepared(record: dict, *, stage: str = "train", **kwargs) -> dict:
    out = build_transforms(stage=stage, **{"spacing": SPACING, "roi_size": ROI, **kwargs})(record)
    return out[0] if isinstance(out, list) else out


def assert_aligned(sample: dict, *, context: str) -> None:
    """Bright voxels (image > 0.5) and the label agree everywhere except, where the image was interpolated
    bilinearly, on the label's one-voxel boundary; clicks drawn from the label land on bright image."""
    image, label = sample["image"][0].numpy(), sample["label"][0].numpy() > 0.5
    assert label.any(), context
    bright = image > 0.5
    disagree = bright ^ label
    boundary = ndimage.binary_dilation(label) & ~ndimage.binary_erosion(label)
    assert not np.any(disagree & ~boundary), f"{context}: image and label misaligned"
    assert (bright & label).sum() >= 0.6 * label.sum(), context  # edges between slices tie at 0.5
    rng = np.random.default_rng(0)
    points = np.argwhere(label)
    for point in points[rng.choice(len(points), size=min(20, len(points)), replace=False)]:
        lo, hi = np.maximum(point - 1, 0), point + 2
        assert image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].max() > 0.5, f"{context}: click {point} off target"


def test_each_random_transform_keeps_image_label_and_clicks_aligned(cases: dict) -> None:
    pipeline = build_transforms(stage="train", spacing=SPACING, roi_size=ROI, aug_prob=1.0, affine_prob=1.0,
                                fg_oversample=1.0)
    first_random = next(i for i, t in enumerate(pipeline.transforms) if isinstance(t, Randomizable))
    crop, augmentations = pipeline.transforms[first_random], pipeline.transforms[first_random + 1:]
    assert isinstance(crop, T.ForegroundOversampledCropd)
    kinds = [type(t) for t in augmentations]
    assert kinds.count(RandFlipd) == 3 and {T.RandAffine32d, RandScaleIntensityd, RandShiftIntensityd} <= set(kinds)
    assert all(isinstance(t, (RandFlipd, RandAffined, RandScaleIntensityd, RandShiftIntensityd)) for t in augmentations)
    prefix = pipeline.transforms[:first_random]
    sample = cases["lesions"]
    for t in prefix:
        sample = t(sample)
    assert_aligned(sample, context="deterministic prefix")
    for seed in range(3):
        crop.set_random_state(seed)
        cropped = crop(sample)
        assert_aligned(cropped, context=f"crop seed {seed}")
        for t in augmentations:
            t.set_random_state(seed)
            moved = t(dict(cropped))
            assert not torch.equal(moved["image"], cropped["image"]), f"{type(t).__name__} did nothing"
            assert_aligned(moved, context=f"{type(t).__name__} seed {seed}")


def test_whole_train_pipeline_keeps_alignment(cases: dict) -> None:
    pipeline = build_transforms(stage="train", spacing=SPACING, roi_size=ROI, aug_prob=0.7, affine_prob=0.7,
                                fg_oversample=1.0)
    for seed in range(4):
        pipeline.set_random_state(seed)
        sample = pipeline(cases["lesions"])
        assert sample["image"].shape == sample["label"].shape == (1, ROI, ROI, ROI)
        assert sample["image"].dtype == sample["label"].dtype == torch.float32
        assert sample["ich"].dtype == torch.float32 and float(sample["ich"]) == 1.0
        assert_aligned(sample, context=f"train seed {seed}")


def test_small_lesion_is_in_every_foreground_crop(cases: dict) -> None:
    pipeline = build_transforms(stage="train", spacing=SPACING, roi_size=16, aug_prob=0.0, fg_oversample=1.0)
    for seed in range(6):
        pipeline.set_random_state(seed)
        assert pipeline(cases["tiny"])["label"].sum() > 0


def test_a_third_of_the_crops_is_forced_onto_a_lesion_and_the_rest_is_uniform(cases: dict) -> None:
    pipeline = build_transforms(stage="train", spacing=SPACING, roi_size=8, aug_prob=0.0, fg_oversample=0.33)
    at = next(i for i, t in enumerate(pipeline.transforms) if isinstance(t, T.ForegroundOversampledCropd))
    prefix = cases["tiny"]
    for t in pipeline.transforms[:at]:
        prefix = t(prefix)
    volume = prefix["image"].shape[1:]
    crop = pipeline.transforms[at]
    draws, on_lesion, starts = 1500, 0, []
    for seed in range(draws):
        crop.set_random_state(seed)
        crop(prefix)
        centre = crop._start + 4
        on_lesion += bool(prefix["label"][0][tuple(int(c) for c in np.minimum(centre, np.array(volume) - 1))] > 0)
        starts.append(crop._start.copy())
    starts = np.array(starts)
    # the lesion fills a tiny share of the volume: a uniform draw lands on it about never, so the lesion-centred
    # share is the forced share (binomial std 0.012 at 1500 draws)
    share = on_lesion / draws
    assert 0.28 <= share <= 0.38, share
    room = np.array(volume) - 8
    for axis in range(3):  # uniform crops reach every position, corners included
        assert starts[:, axis].min() == 0 and starts[:, axis].max() == room[axis]


def test_missing_mask_gives_empty_label_and_uniform_crops_over_the_whole_volume(cases: dict) -> None:
    pipeline = build_transforms(stage="train", spacing=SPACING, roi_size=16, aug_prob=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        images = []
        for seed in range(12):
            pipeline.set_random_state(seed)
            sample = pipeline(cases["negative"])
            assert sample["label"].shape == (1, 16, 16, 16) and sample["label"].sum() == 0
            images.append(float(sample["image"].sum()))
    assert len(set(images)) > 6  # crops at many places, air around the head included


def test_val_stage_is_the_predict_stage_with_the_label(cases: dict) -> None:
    full = prepared(cases["lesions"], stage="predict")
    val = prepared(cases["lesions"], stage="val")
    assert torch.equal(val["image"].as_tensor(), full["image"].as_tensor())
    assert val["label"].shape == val["image"].shape and val["label"].sum() > 0


def test_crop_around_label_is_centred_on_the_lesions_or_the_volume(cases: dict) -> None:
    full = prepared(cases["lesions"], stage="val")
    image, label = full["image"], full["label"]
    roi = 16
    small_image, small_label = T.crop_around_label(image, label, (roi,) * 3, air=0.0)
    array = label[0].numpy()
    found = np.argwhere(array > 0)
    start = np.clip((found.min(0) + found.max(0)) // 2 - roi // 2, 0, np.array(array.shape) - roi)
    window = tuple(slice(s, s + roi) for s in start)
    np.testing.assert_array_equal(small_label[0].numpy(), array[window])
    np.testing.assert_array_equal(small_image[0].numpy(), image[0].numpy()[window])
    negative = prepared(cases["negative"], stage="val")
    _, empty = T.crop_around_label(negative["image"], negative["label"], (roi,) * 3, air=0.0)
    assert empty.sum() == 0 and empty.shape == (1, roi, roi, roi)


def test_all_air_volume_without_lesion_still_gives_a_crop(tmp_path: Path) -> None:
    record = write_case(tmp_path, "air", None, image=np.full((20, 20, 6), -1024, np.int16))
    sample = prepared(record, roi_size=16, aug_prob=0.0)
    assert sample["image"].shape == (1, 16, 16, 16) and float(sample["image"].max()) == 0.0


def test_volume_smaller_than_roi_is_padded_with_air(cases: dict) -> None:
    out = prepared(cases["negative"], stage="val", intensity="window")
    image, label = T.crop_around_label(out["image"], out["label"], (64,) * 3, air=0.0)
    assert image.shape == label.shape == (1, 64, 64, 64)
    assert float(image[0, 0, 0, 0]) == 0.0  # air after windowing
    big = build_transforms(stage="train", spacing=SPACING, roi_size=64, aug_prob=0.0)(cases["negative"])
    assert big["image"].shape == (1, 64, 64, 64)


def test_resampling_gives_target_spacing_in_ras(cases: dict) -> None:
    out = prepared(cases["lesions"], stage="predict")
    affine = out["image"].affine.numpy()
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), SPACING, rtol=1e-5)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    original = oblique_affine((1.0, 1.2, 4.0))
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    original_dirs = original[:3, :3] / np.linalg.norm(original[:3, :3], axis=0)
    np.testing.assert_allclose(np.abs(directions), np.abs(original_dirs), atol=1e-6)  # still oblique
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}


def test_predict_preprocessing_inverts_to_the_original_grid(cases: dict) -> None:
    pipeline = build_transforms(stage="predict", spacing=SPACING, roi_size=ROI)
    record = cases["lesions"]
    out = pipeline({"image": record["image"]})
    assert "label" not in out
    out["pred"] = MetaTensor((out["image"] > 0.5).float(), meta=dict(out["image"].meta))
    inverted = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=True)(out)["pred"]
    original = nib.load(record["label"])
    assert tuple(inverted.shape[1:]) == original.shape
    np.testing.assert_allclose(inverted.affine.numpy(), original.affine, atol=1e-4)
    truth = np.asanyarray(original.dataobj) > 0
    predicted = inverted[0].numpy() > 0.5
    assert 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum()) > 0.85


def test_intensity_modes() -> None:
    assert intensity_range() == (0.0, 80.0, 0.0, 1.0)
    assert intensity_range(window_center=80, window_width=200) == (-20.0, 180.0, 0.0, 1.0)
    stats = {"percentile_00_5": 50.0, "percentile_99_5": 90.0, "mean": 70.0, "std": 10.0}
    assert intensity_range(intensity="nnunet", norm_stats=stats) == (50.0, 90.0, -2.0, 2.0)
    with pytest.raises(UserError, match="data.intensity=window"):
        intensity_range(intensity="nnunet", norm_stats=None)


def test_nnunet_normalisation_clips_and_zscores(cases: dict) -> None:
    stats = {"percentile_00_5": 50.0, "percentile_99_5": 90.0, "mean": 70.0, "std": 10.0}
    out = prepared(cases["lesions"], stage="val", intensity="nnunet", norm_stats=stats)
    values = out["image"].numpy()
    assert values.min() == pytest.approx(-2.0) and values.max() == pytest.approx(2.0)


def test_mask_on_another_grid_is_a_user_error(cases: dict, tmp_path: Path) -> None:
    record = dict(cases["lesions"])
    shifted = nib.load(record["label"])
    affine = shifted.affine.copy()
    affine[0, 3] += 5.0
    record["label"] = str(tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(shifted.dataobj), affine), record["label"])
    with pytest.raises(UserError, match="shifted.nii.gz: mask affine differs"):
        T.LoadCased()(record)
    record["label"] = str(tmp_path / "small.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), shifted.affine), record["label"])
    with pytest.raises(UserError, match="small.nii.gz: mask shape"):
        T.LoadCased()(record)


def test_bare_pickle_array_takes_the_mask_geometry(tmp_path: Path) -> None:
    mask = np.zeros((10, 12, 6), np.uint8)
    mask[3:6, 4:8, 2:4] = 1
    affine = oblique_affine((0.5, 0.5, 5.0))
    with open(tmp_path / "a.pkl", "wb") as f:
        pickle.dump(mask.astype(np.int16) * 70, f)
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "a.nii.gz")
    out = T.LoadCased()({"image": str(tmp_path / "a.pkl"), "label": str(tmp_path / "a.nii.gz")})
    np.testing.assert_allclose(out["image"].affine.numpy(), affine, atol=1e-5)
    assert out["image"].meta.keys() == out["label"].meta.keys()


# --- loaders -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(cases: dict) -> tuple[list[dict], list[dict]]:
    train = [cases["lesions"], cases["negative"], cases["tiny"]]
    return train, [cases["lesions"], cases["negative"]]


def epochs_of(loader, n: int) -> list[list[float]]:
    return [[round(float(b["image"].sum()), 3) for b in loader] for _ in range(n)]


@pytest.mark.parametrize(("cache", "workers"), [("none", 0), ("memory", 0), ("disk", 1)])
def test_loaders_batch_contract_and_reproducibility(records, cache: str, workers: int, tmp_path: Path) -> None:
    settings = Preprocessing(spacing=SPACING, roi_size=16, aug_prob=0.5)
    reference = build_dataloaders(
        train_records=records[0], val_records=records[1], preprocessing=settings, batch_size=2, num_workers=0,
        cache="none", seed=3,
    ).train
    loaders = build_dataloaders(
        train_records=records[0], val_records=records[1], preprocessing=settings, batch_size=2,
        num_workers=workers, cache=cache, cache_dir=tmp_path, seed=3,
    )
    train, val = loaders.train, loaders.val
    batch = next(iter(val))
    assert isinstance(batch["image"], MetaTensor) and batch["image"].shape == (2, 1, 16, 16, 16)
    assert batch["label"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.float32
    assert batch["ich"].dtype == torch.float32 and batch["ich"].tolist() == [1.0, 0.0]
    assert batch["case_id"] == ["lesions", "negative"]
    assert batch["image"].affine.shape == (2, 4, 4)
    expected = epochs_of(reference, 3)
    assert epochs_of(train, 3) == expected  # same samples and augmentation whatever the cache or workers
    assert expected[0] != expected[1]  # a new epoch draws new crops and augmentations
    train.sampler.set_epoch(1)  # resuming at epoch 1 replays it
    assert epochs_of(train, 1) == expected[1:2]


def test_validation_crops_are_of_the_scans_whole_scan_validation_reads(records) -> None:
    """`val_scans` bounds both validations: the crop loader takes the scans `ScanValidation.indices()` takes."""
    val = [{**records[1][i % 2], "case_id": f"scan{i}"} for i in range(5)]
    settings = Preprocessing(spacing=SPACING, roi_size=16)
    for limit, expected in ((3, [0, 2, 4]), (None, [0, 1, 2, 3, 4]), (9, [0, 1, 2, 3, 4])):
        loaders = build_dataloaders(train_records=records[0], val_records=val, preprocessing=settings, batch_size=2,
                                    num_workers=0, cache="memory", seed=0, val_limit=limit)
        validation = ScanValidation(scans=loaders.val_scans, transform=None, records=val, roi_size=(16,) * 3,
                                    overlap=0.0, air=0.0, prompt_mode="auto", limit=limit)
        assert validation.indices() == expected
        assert [case for batch in loaders.val for case in batch["case_id"]] == [f"scan{i}" for i in expected]


def test_disk_cache_is_reused_and_keyed_by_settings(records, tmp_path: Path, monkeypatch) -> None:
    reads = []
    load = T.LoadCased.__call__
    monkeypatch.setattr(T.LoadCased, "__call__", lambda self, data: reads.append(data["case_id"]) or load(self, data))
    settings = Preprocessing(spacing=SPACING, roi_size=16)

    def run(preprocessing: Preprocessing) -> None:
        loaders = build_dataloaders(
            train_records=records[0], val_records=records[1], preprocessing=preprocessing, batch_size=1,
            num_workers=0, cache="disk", cache_dir=tmp_path, seed=0,
        )
        epochs_of(loaders.train, 2)
        epochs_of(loaders.val, 2)

    run(settings)
    assert len(reads) == 5  # each case once per split, then from the cache
    run(settings)
    assert len(reads) == 5
    run(Preprocessing(spacing=(3.0, 3.0, 3.0), roi_size=16))
    assert len(reads) == 10
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["train", "train", "val", "val"]


def test_a_partly_filled_disk_cache_collates_cached_and_fresh_samples(records, tmp_path: Path) -> None:
    def loaders(train_records: list[dict]):
        return build_dataloaders(train_records=train_records, val_records=records[1],
                                 preprocessing=Preprocessing(spacing=SPACING, roi_size=16), batch_size=3,
                                 num_workers=0, cache="disk", cache_dir=tmp_path, seed=0)

    epochs_of(loaders(records[0][:1]).train, 1)  # caches the first case only
    batch = next(iter(loaders(records[0]).train))  # one cached and two fresh cases in one batch
    assert batch["ich"].shape == (3,) and type(batch["ich"]) is torch.Tensor
    assert isinstance(batch["image"], MetaTensor) and batch["image"].shape == (3, 1, 16, 16, 16)


def test_loader_surfaces_the_users_problem(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("never printed",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload()))
    record = {"image": str(tmp_path / "evil.pkl"), "label": None, "ich": 0, "patient_id": "p", "case_id": "evil",
              "origin": "x"}
    train = build_dataloaders(
        train_records=[record], val_records=[record], preprocessing=Preprocessing(roi_size=16), batch_size=1,
        num_workers=0, cache="none",
    ).train
    with pytest.raises(UserError, match="evil.pkl: refused to unpickle the global 'builtins.print'"):
        next(iter(train))


def test_disk_cache_needs_a_folder(records) -> None:
    with pytest.raises(UserError, match="data.cache_dir"):
        build_dataloaders(train_records=records[0], val_records=records[1], preprocessing=Preprocessing(),
                          batch_size=1, num_workers=0, cache="disk")


def test_epoch_sampler_shards_and_advances() -> None:
    sampler = EpochSampler(7, seed=1)
    first, second = list(sampler), list(sampler)
    assert sorted(i for i, _ in first) == list(range(7)) and {e for _, e in first} == {0}
    assert {e for _, e in second} == {1} and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert 0 <= default_num_workers() <= 4


def test_epoch_sampler_with_distributed_true_gives_each_rank_its_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """distributed=True takes the rank and world size of the process group (2 ranks here, faked): disjoint
    shards that cover the set, a new permutation each epoch, the same one on every rank for an epoch."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda *a, rank=rank, **k: rank)
        sampler = EpochSampler(8, seed=1, distributed=True)
        shards.append([list(sampler), list(sampler)])
    for epoch in range(2):
        first, second = ([i for i, _ in shards[rank][epoch]] for rank in range(2))
        assert len(first) == len(second) == 4 and sorted(first + second) == list(range(8))
        assert {e for rank in range(2) for _, e in shards[rank][epoch]} == {epoch}
    assert shards[0][0] != [(i, 1) for i, _ in shards[0][1]]  # reshuffled for epoch 1
