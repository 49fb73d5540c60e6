"""Under DDP each rank preprocesses and caches only what it reads: its fixed training shard up front, the
validation scans it validates on first read (process group faked: rank and world size; the loaders are the real
ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from test_transforms import write_case

import samft.data.transforms as T
from samft.data.datamodule import build_dataloaders
from samft.data.transforms import Preprocessing

WORLD = 2


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    folder = tmp_path_factory.mktemp("cases")
    cases = []
    for i in range(9):
        mask = np.zeros((12, 12, 6), dtype=bool)
        if i % 2 == 0:
            mask[4:8, 4:8, 2:4] = True
        cases.append(write_case(folder, f"case{i}", mask))
    return cases[:6], cases[6:]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """case_id of every record read and preprocessed (the first, deterministic transform)."""
    seen: list[str] = []
    load = T.LoadCased.__call__
    monkeypatch.setattr(T.LoadCased, "__call__", lambda self, data: seen.append(data["case_id"]) or load(self, data))
    return seen


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: WORLD)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_each_rank_preprocesses_only_its_training_shard_and_the_shards_cover_the_set(
    records, reads: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: str
) -> None:
    train, val = records
    shards = []
    for rank in range(WORLD):
        as_rank(monkeypatch, rank)
        reads.clear()
        loaders = build_dataloaders(train_records=train, val_records=val, preprocessing=Preprocessing(roi_size=8),
                                    batch_size=1, num_workers=0, cache=cache, cache_dir=tmp_path / f"r{rank}",
                                    seed=3, distributed=True)
        built = sorted(reads)
        epochs = [[b["case_id"][0] for b in loaders.train] for _ in range(4)]
        assert all(sorted(epoch) == built for epoch in epochs)  # reads exactly the shard it preprocessed
        assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled within the shard each epoch
        if cache == "memory":
            assert sorted(reads) == built  # the epochs came from the cache
        shards.append(built)
    assert len(shards[0]) == len(shards[1]) == len(train) // WORLD
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(r["case_id"] for r in train)


def test_validation_scans_are_cached_by_the_rank_that_reads_them(
    records, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, val = records
    as_rank(monkeypatch, 1)
    loaders = build_dataloaders(train_records=train, val_records=val, preprocessing=Preprocessing(roi_size=8),
                                batch_size=1, num_workers=0, cache="memory", seed=3, distributed=True)
    reads.clear()
    own = list(range(len(val)))[1::WORLD]  # what rank 1 validates (ScanValidation: every WORLD-th scan from rank)
    for _ in range(2):  # two validations
        for index in own:
            loaders.val_scans[index]
    assert reads == [val[i]["case_id"] for i in own]  # preprocessed once, on first read; the others never
    assert loaders.val_scans.cached_indices() == own


def test_one_process_keeps_caching_everything_up_front(records, reads: list[str]) -> None:
    train, val = records
    build_dataloaders(train_records=train, val_records=val, preprocessing=Preprocessing(roi_size=8), batch_size=1,
                      num_workers=0, cache="memory", seed=3)
    assert sorted(reads) == sorted(r["case_id"] for r in train + val)
