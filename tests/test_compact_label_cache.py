"""The cached part of the train and val pipelines keeps the 0/1 label as uint8 (a quarter of float32's bytes); the
training crop hands it on so (the step casts it), the validation crop as float32: the batches a seeded loader
yields are bitwise what they were with float32 labels once the label is cast, the memory and disk caches shrink,
the disk cache's settings hash names the new format, and drawing samples never writes into the memory cache."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from dataclasses import asdict, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samft.data import transforms as T
from samft.data.datamodule import _settings_hash, build_dataloaders
from samft.data.transforms import Preprocessing

SETTINGS = Preprocessing(spacing=(2.0, 2.0, 2.0), roi_size=16, aug_prob=0.5, affine_prob=0.5, fg_oversample=0.5)


def _case(folder: Path, name: str, *, lesion: bool) -> dict:
    shape = (40, 36, 12)
    mask = np.zeros(shape, np.uint8)
    if lesion:
        mask[12:22, 10:19, 4:8] = 1
    image = np.where(mask > 0, 1000, -920).astype(np.int16)
    affine = np.diag([1.0, 1.2, 4.0, 1.0])
    with open(folder / f"{name}.pkl", "wb") as f:
        pickle.dump({"image": image, "affine": affine}, f)
    nib.save(nib.Nifti1Image(mask, affine), folder / f"{name}.nii.gz")
    return {"image": str(folder / f"{name}.pkl"), "label": str(folder / f"{name}.nii.gz"), "ich": int(lesion),
            "patient_id": name, "case_id": name, "origin": "test"}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    folder = tmp_path_factory.mktemp("compact")
    cases = [_case(folder, f"c{i}", lesion=i % 3 != 2) for i in range(5)]
    return cases[:3], cases[3:]


def _float32_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline as it was: the label stays float32 in the cache."""
    monkeypatch.setattr(T.CompactLabeld, "__call__", lambda self, data: dict(data))


def _loaders(records, cache: str, folder: Path, settings: Preprocessing = SETTINGS):
    return build_dataloaders(train_records=records[0], val_records=records[1], preprocessing=settings, batch_size=2,
                             num_workers=0, cache=cache, cache_dir=folder, seed=5)


def _batches(loaders) -> list[dict]:
    return [*(b for _ in range(2) for b in loaders.train), *loaders.val]


def _assert_same(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            x, y = (a[key].float(), b[key]) if key == "label" else (a[key], b[key])
            if isinstance(x, torch.Tensor):
                assert type(x) is type(y) and x.dtype == y.dtype and torch.equal(x, y), key
                if isinstance(x, MetaTensor):
                    assert torch.equal(x.affine, y.affine), key
            else:
                assert x == y, key


@pytest.mark.parametrize(("cache", "affine_prob"), [("memory", 0.0), ("memory", 0.5), ("disk", 0.0)])
def test_seeded_batches_are_bitwise_those_of_float32_labels(
    records, cache: str, affine_prob: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replace(SETTINGS, affine_prob=affine_prob)
    ours = _batches(_loaders(records, cache, tmp_path / "ours", settings))
    with monkeypatch.context() as patch:
        _float32_labels(patch)
        theirs = _batches(_loaders(records, cache, tmp_path / "theirs", settings))
    train, val = ours[:-1], ours[-1:]  # the two validation cases make one batch
    # the training crop keeps the cached uint8 (the affine resamples it to float32), the validation crop casts
    assert {b["label"].dtype for b in train} == {torch.float32 if affine_prob else torch.uint8}
    assert {b["label"].dtype for b in val} == {torch.float32} and any(b["label"].sum() > 0 for b in ours)
    _assert_same(ours, theirs)


def test_drawing_training_samples_never_writes_into_the_memory_cache(records, tmp_path: Path) -> None:
    """The memory cache hands its volumes to the random transforms uncopied (`copy_cache=False`): three epochs of
    crops, flips, intensity changes and affines leave every cached tensor, its metadata and its applied
    operations as they were."""
    settings = replace(SETTINGS, aug_prob=1.0, affine_prob=0.5)
    loaders = _loaders(records, "memory", tmp_path, settings)
    cache = loaders.train.dataset.dataset._cache  # SeededSamples over the CacheDataset

    def snapshot() -> list[dict]:
        return [{key: (value.as_tensor().clone(), dict(value.meta), [dict(op) for op in value.applied_operations])
                 if isinstance(value, MetaTensor) else copy.deepcopy(value) for key, value in item.items()}
                for item in cache]

    before = snapshot()
    batches = [batch for _ in range(3) for batch in loaders.train]
    assert any(b["image"].shape[-1] == 16 for b in batches)
    after = snapshot()
    for old, new in zip(before, after, strict=True):
        assert old.keys() == new.keys()
        for key in old:
            if isinstance(old[key], tuple):
                (a, meta_a, ops_a), (b, meta_b, ops_b) = old[key], new[key]
                assert torch.equal(a, b) and len(ops_a) == len(ops_b), key
                assert meta_a.keys() == meta_b.keys(), key
            elif isinstance(old[key], np.ndarray):
                assert np.array_equal(old[key], new[key]), key
            elif isinstance(old[key], torch.Tensor):
                assert torch.equal(old[key], new[key]), key
            else:
                assert old[key] == new[key], key


def test_the_memory_cache_holds_uint8_labels_in_five_eighths_of_the_bytes(
    records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cached(loaders) -> list[dict]:
        train = loaders.train.dataset.dataset  # SeededSamples over the CacheDataset
        return [*train._cache, *(loaders.val_scans[i] for i in range(len(loaders.val_scans)))]

    def nbytes(samples: list[dict]) -> int:
        return sum(s[k].numel() * s[k].element_size() for s in samples for k in ("image", "label"))

    ours = cached(_loaders(records, "memory", tmp_path))
    with monkeypatch.context() as patch:
        _float32_labels(patch)
        theirs = cached(_loaders(records, "memory", tmp_path))
    assert {s["label"].dtype for s in ours} == {torch.uint8} and {s["image"].dtype for s in ours} == {torch.float32}
    assert {s["label"].dtype for s in theirs} == {torch.float32}
    assert all(torch.equal(a["label"].float(), b["label"]) for a, b in zip(ours, theirs))
    assert nbytes(ours) / nbytes(theirs) == pytest.approx(5 / 8)


def test_the_disk_cache_shrinks_and_is_keyed_by_its_format(
    records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*.pt"))

    _batches(_loaders(records, "disk", tmp_path / "ours"))
    with monkeypatch.context() as patch:
        _float32_labels(patch)
        _batches(_loaders(records, "disk", tmp_path / "theirs"))
    assert size(tmp_path / "ours") < 0.7 * size(tmp_path / "theirs")
    sample = torch.load(next((tmp_path / "ours").glob("train-*/*.pt")), weights_only=False)
    assert sample["label"].dtype == torch.uint8
    # the folder of a float32-label cache (the hash before the format key) is never read by this version
    old = {k: v for k, v in asdict(SETTINGS).items() if k not in ("fg_oversample", "aug_prob", "affine_prob")}
    old_hash = hashlib.sha1(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert _settings_hash(SETTINGS) != old_hash
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {f"train-{_settings_hash(SETTINGS)}",
                                                                 f"val-{_settings_hash(SETTINGS)}"}


def test_a_label_that_uint8_cannot_hold_stays_float32() -> None:
    compact = T.CompactLabeld(keys="label")
    for values in ([0.0, 0.5], [0.0, 256.0], [-1.0, 1.0], [0.0, float("nan")]):
        label = MetaTensor(torch.tensor(values).reshape(1, 2, 1, 1))
        assert compact({"label": label})["label"].dtype == torch.float32
    kept = compact({"label": MetaTensor(torch.tensor([0.0, 1.0, 255.0]).reshape(1, 3, 1, 1))})["label"]
    assert kept.dtype == torch.uint8 and isinstance(kept, MetaTensor) and kept.tolist() == [[[[0]], [[1]], [[255]]]]
    assert T.as_float32(kept).dtype == torch.float32 and T.as_float32(kept).tolist() == [[[[0.0]], [[1.0]], [[255.0]]]]
