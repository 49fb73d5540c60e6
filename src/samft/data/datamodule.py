"""Records -> (cached) MONAI datasets -> reproducible DataLoaders.

The deterministic prefix of the pipeline (read, orient, resample, normalise, and for validation the crop)
is cached: ``cache="memory"`` keeps it in RAM (``CacheDataset``), ``cache="disk"`` in ``cache_dir``
(``PersistentDataset``; one sub-folder per preprocessing setting, entries keyed by the record and its
files' size and modification time), ``cache="none"`` recomputes it every epoch.

Training randomness does not depend on workers or order: the random transforms of sample ``i`` in epoch
``e`` are seeded from ``(seed, e, i)`` and the shuffle from ``seed + e``. The epoch advances by one each
time the train loader is iterated; when resuming call ``train_loader.sampler.set_epoch(epoch)`` first.

Under torch.distributed (``distributed=True``) each rank trains on a fixed shard of the training set (reshuffled
within the shard every epoch) and preprocesses and caches only that shard; validation scans are cached on a
rank's first read of them, so each rank keeps only the scans it validates (RAM and preprocessing no longer grow
with the number of processes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.utils.enums import MetaKeys, SpaceKeys, TraceKeys
from torch.utils.data import DistributedSampler, Sampler, Subset

from samft.choices import CACHES
from samft.data.transforms import Preprocessing, crop_around_label
from samft.devices import available_cpus
from samft.errors import UserError

# The stored sample format of the disk cache: 3 since scans are resampled in float32 (transforms.build_transforms);
# 2 kept labels as uint8 (transforms.CompactLabeld) after a float64 resampling; 1 (no key in the hash) held float32
# labels.
CACHE_FORMAT = 3


def evenly_spaced(total: int, limit: int | None) -> list[int]:
    """`limit` indices of `total` evenly spaced over the list, first and last included (all when `limit` is None or
    at least `total`): the validation scans `val_scans` selects."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, limit).round()})


def default_num_workers() -> int:
    """Loader workers from the CPUs this process may use: one fewer than the CPUs, at most 4."""
    return max(0, min(4, available_cpus() - 1))


def build_datasets(
    *,
    train_records: Sequence[dict],
    val_records: Sequence[dict],
    preprocessing: Preprocessing,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    cache_workers: int = 1,
    progress: bool = False,
    train_shard: Sequence[int] | None = None,
) -> tuple[Dataset, Dataset]:
    """MONAI datasets of the train and val records with the stage pipelines (``cache`` as in the module doc;
    ``cache_workers`` threads fill the cache up front, with a progress bar if ``progress``).

    ``train_shard`` (a DDP rank's training indices): only those train records are preprocessed up front and
    cached, and the val records are cached when first read, not up front (see the module doc)."""
    train = _dataset(train_records, preprocessing, stage="train", cache=cache, cache_dir=cache_dir,
                     workers=cache_workers, progress=progress, owned=train_shard)
    val = _dataset(val_records, preprocessing, stage="val", cache=cache, cache_dir=cache_dir, workers=cache_workers,
                   progress=progress, owned=None if train_shard is None else ())
    return train, val


@dataclass(frozen=True)
class DataLoaders:
    """``train``: random patches; ``val``: lesion-centred crops of the validation scans (the cheap extra
    metric); ``val_scans``: the whole preprocessed validation scans (``val`` stage), one sample per case."""

    train: DataLoader
    val: DataLoader
    val_scans: Dataset


def build_dataloaders(
    *,
    train_records: Sequence[dict],
    val_records: Sequence[dict],
    preprocessing: Preprocessing,
    batch_size: int,
    num_workers: int | None = None,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    pin_memory: bool = False,
    seed: int = 0,
    distributed: bool = False,
    progress: bool = False,
    val_limit: int | None = None,
) -> DataLoaders:
    """Loaders whose batches are dicts: ``image`` float32 MetaTensor B x 1 x R0 x R1 x R2, ``label``
    B x 1 x R0 x R1 x R2 in {0, 1} (train: uint8 as cached, float32 after the affine augmentation; val: float32),
    ``ich`` float32 B, ``case_id`` list[str], plus meta.

    The validation crops are those of ``evenly_spaced(len(val_records), val_limit)`` (the scans whole-scan
    validation reads). ``num_workers=None`` uses ``default_num_workers()``; workers persist across epochs. With
    ``distributed=True`` (process group initialised) each rank trains on its fixed shard of the training set and
    preprocesses only that; the validation scans a rank reads are cached on first read.
    """
    workers = default_num_workers() if num_workers is None else num_workers
    sampler = EpochSampler(len(train_records), seed=seed, distributed=distributed)
    train_ds, val_ds = build_datasets(
        train_records=train_records, val_records=val_records, preprocessing=preprocessing, cache=cache,
        cache_dir=cache_dir, cache_workers=available_cpus(), progress=progress,
        train_shard=sampler.shard if distributed else None,
    )
    common: dict[str, Any] = {
        "batch_size": batch_size, "num_workers": workers, "pin_memory": pin_memory,
        "persistent_workers": workers > 0, "generator": torch.Generator().manual_seed(seed),
    }
    train_loader = DataLoader(SeededSamples(train_ds, seed=seed), sampler=sampler, **common)
    crops = Subset(LesionCrops(val_ds, roi_size=preprocessing.roi, air=preprocessing.air),
                   evenly_spaced(len(val_records), val_limit))
    val_loader = DataLoader(crops, shuffle=False, **{**common, "num_workers": 0, "persistent_workers": False})
    return DataLoaders(train=train_loader, val=val_loader, val_scans=val_ds)


class LesionCrops(torch.utils.data.Dataset):
    """The lesion-centred ``roi_size`` crop (``crop_around_label``) of each whole preprocessed scan."""

    def __init__(self, scans: Dataset, *, roi_size: Sequence[int], air: float) -> None:
        self.scans, self.roi_size, self.air = scans, tuple(roi_size), air

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.scans[index])
        sample["image"], sample["label"] = crop_around_label(
            sample["image"], sample["label"], self.roi_size, air=self.air
        )
        return sample


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` pairs: a permutation seeded with ``seed + epoch``. Each pass advances the epoch
    by one; ``set_epoch`` sets the epoch of the next pass.

    distributed: rank r of W owns the fixed shard ``shard`` (every W-th index, from r, of a permutation seeded
    with ``seed``, padded by wrapping so that all shards are equally long, as DistributedSampler pads), and each
    epoch permutes it with ``seed + epoch``: the ranks' shards stay disjoint (but for the padding) and cover the
    set, and a rank reads, hence preprocesses and caches, only its own.
    """

    def __init__(self, size: int, *, seed: int, distributed: bool = False) -> None:
        self.seed = seed
        self._epoch = 0
        self._shuffle: DistributedSampler | None = None
        if not distributed:
            self._shuffle = DistributedSampler(range(size), shuffle=True, seed=seed, num_replicas=1, rank=0)
            self.shard = list(range(size))
            return
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        per_rank = -(-size // world)
        padded = (order * -(-per_rank * world // max(size, 1)))[: per_rank * world]
        self.shard = padded[rank::world]

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.shard)

    def __iter__(self):
        epoch, self._epoch = self._epoch, self._epoch + 1
        if self._shuffle is not None:
            self._shuffle.set_epoch(epoch)
            return iter([(index, epoch) for index in self._shuffle])
        within = torch.randperm(len(self.shard), generator=torch.Generator().manual_seed(self.seed + epoch))
        return iter([(self.shard[i], epoch) for i in within.tolist()])


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a MONAI dataset; a key ``(index, epoch)`` seeds its random transforms from
    ``(seed, epoch, index)`` before reading sample ``index`` (a plain int key reads it unseeded)."""

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index = key
        if isinstance(key, tuple):
            index, epoch = key
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            self.dataset.transform.set_random_state(seed=int(state))
        try:
            return self.dataset[index]
        except RuntimeError as err:  # MONAI wraps a failing transform; surface the user's problem as is
            cause = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


def _dataset(
    records: Sequence[dict], preprocessing: Preprocessing, *, stage: str, cache: str,
    cache_dir: str | Path | None, workers: int, progress: bool, owned: Sequence[int] | None = None,
) -> Dataset:
    """The stage's dataset; ``owned`` (a DDP rank's share) limits the up-front preprocessing to those indices."""
    transform = preprocessing.transforms(stage)
    data = list(records)
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        # copy_cache=False: the random part of the train pipeline starts with a crop and never writes into its
        # input, so a sample needs no copy of the whole cached volume (a quarter of the loader's work per batch)
        if owned is not None:
            return _ShardCacheDataset(data, transform, owned=owned, num_workers=workers, progress=progress)
        return CacheDataset(data, transform, num_workers=workers, progress=progress, copy_cache=False)
    if cache != "disk":
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if cache_dir is None:
        raise UserError("data.cache=disk needs data.cache_dir (a folder for the preprocessed volumes)")
    folder = Path(cache_dir).expanduser() / f"{stage}-{_settings_hash(preprocessing)}"
    folder.mkdir(parents=True, exist_ok=True)
    dataset = _SafePersistentDataset(data, transform, cache_dir=folder, hash_func=_record_hash, track_meta=True)
    _fill_disk_cache(dataset, workers=workers, progress=progress, stage=stage, owned=owned)
    return dataset


class _ShardCacheDataset(CacheDataset):
    """A memory cache holding a DDP rank's share: the ``owned`` records are preprocessed up front (in threads);
    any other record is preprocessed on its first read and kept (validation scans, read in the main process)."""

    def __init__(self, data: Sequence[dict], transform: Any, *, owned: Sequence[int], num_workers: int,
                 progress: bool) -> None:
        self._owned = sorted(set(owned))
        super().__init__(data, transform, num_workers=num_workers, progress=progress, copy_cache=False)

    def set_data(self, data: Sequence) -> None:
        self.data = data
        self.cache_num = len(data)  # every index has a slot; None until it is computed
        slots: list[Any] = [None] * len(data)
        for index, item in zip(self._owned, self._fill_cache(self._owned)):
            slots[index] = item
        self._cache = slots

    def cached_indices(self) -> list[int]:
        """The indices whose preprocessed sample this process holds."""
        return [i for i, item in enumerate(self._cache) if item is not None]


def _fill_disk_cache(
    dataset: PersistentDataset, *, workers: int, progress: bool, stage: str, owned: Sequence[int] | None = None
) -> None:
    """Preprocess every case not yet on disk (only the ``owned`` ones when given), up front (nnU-Net's
    preprocessing pass), so that the first epoch is not bound by reading and resampling."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    # only the missing entries: reading existing ones from several threads would race on torch's process-wide
    # safe-globals list (a refused read counts as a corrupt file and is recomputed)
    wanted = range(len(dataset.data)) if owned is None else sorted(set(owned))
    missing = [i for i in wanted if not _cache_file(dataset, dataset.data[i]).is_file()]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = pool.map(dataset.__getitem__, missing)
        for _ in tqdm(done, total=len(missing), desc=f"preprocess {stage}", disable=not progress or not missing):
            pass


def _cache_file(dataset: PersistentDataset, record: dict) -> Path:
    """Where `PersistentDataset` keeps a record's preprocessed sample (its cache folder, the record's hash)."""
    return Path(dataset.cache_dir) / f"{dataset.hash_func(record).decode('utf-8')}.pt"


class _SafePersistentDataset(PersistentDataset):
    """``PersistentDataset`` that reads its cache with ``weights_only=True`` and allows only the types the
    cached samples hold (MetaTensor, its meta keys, numpy arrays)."""

    _NUMPY = (np.ndarray, np.dtype, np.zeros(1).__reduce__()[0])
    _DTYPES = tuple(type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int16, np.int32, np.int64, np.float32,
                                                 np.float64))
    _ALLOWED = (MetaTensor, MetaKeys, SpaceKeys, TraceKeys, *_NUMPY, *_DTYPES)

    def _cachecheck(self, item_transformed: dict) -> Any:
        with torch.serialization.safe_globals(list(self._ALLOWED)):
            sample = super()._cachecheck(item_transformed)
        # A cache read turns every tensor into a MetaTensor; `ich` must stay the plain tensor a fresh sample
        # has, or a batch mixing cached and fresh samples (a partly filled cache) fails to collate.
        return {k: v.as_tensor() if k == "ich" and isinstance(v, MetaTensor) else v for k, v in sample.items()}


def _settings_hash(preprocessing: Preprocessing) -> str:
    """Hash of what the cached prefix depends on (not the random crop or augmentation settings), and of the format
    of its samples (CACHE_FORMAT), so that a cache written in another format is never read."""
    settings = {k: v for k, v in asdict(preprocessing).items() if k not in ("fg_oversample", "aug_prob", "affine_prob")}
    settings["cache_format"] = CACHE_FORMAT
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _record_hash(record: dict) -> bytes:
    """The record plus the size and modification time of its files, so edited files are re-preprocessed."""
    stamps = []
    for key in ("image", "label"):
        path = record.get(key)
        if isinstance(path, str) and os.path.exists(path):
            stat = os.stat(path)
            stamps.append((key, stat.st_size, stat.st_mtime_ns))
    return pickle_hashing({**record, "_files": stamps})
