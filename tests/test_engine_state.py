"""The Trainer's training state in one place: what `state_dict` assembles (the checkpoint) `load_state_dict` reads
back, all of it, so saving and resuming cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.standin import make_trainer, settings

from samft.engine import LATEST, Trainer, load_checkpoint

# Keys a checkpoint carries for its readers only: the format tag (checked by load_checkpoint), copies of the early
# stopping state for people reading the file, and the run's config (the run rebuilds its own from .hydra/).
FOR_READERS = {"format", "metric_name", "best_metric", "best_epoch", "config"}
# Random states go back at the next epoch's start (not by load_state_dict at once); elapsed time keeps running.
NOT_ROUND_TRIPPED = {"rng", "ranks", "elapsed_s"}


class ReadKeys(dict):
    """A dict that records which of its keys were read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


SETTINGS = {"epochs": 2, "grad_accum_steps": 2, "precision": "fp16", "val_clicks": (1,)}  # fp16: a scaler state


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A Trainer stopped after epoch 1 of 2 (stop_after_epoch), its latest_model.pth in its run_dir."""
    trainer = make_trainer(tmp_path_factory.mktemp("trained"), train_settings=settings(stop_after_epoch=1, **SETTINGS))
    trainer.fit()
    return trainer


def test_load_state_dict_reads_every_key_that_state_dict_writes(trained: Trainer, tmp_path: Path) -> None:
    saved = ReadKeys(trained.state_dict())
    fresh = make_trainer(tmp_path, train_settings=settings(**SETTINGS))
    fresh.load_state_dict(saved, source="memory")
    assert saved.read == set(saved) - FOR_READERS


def test_a_state_loaded_into_a_fresh_trainer_is_the_state_it_gives_back(trained: Trainer, tmp_path: Path) -> None:
    state = trained.state_dict()
    on_disk = load_checkpoint(trained.run_dir / LATEST)
    assert list(on_disk) == list(state)  # the checkpoint is the state_dict, written as it is
    assert all(_equal(state[key], on_disk[key]) for key in state if key not in ("rng", "elapsed_s"))
    fresh = make_trainer(tmp_path, train_settings=settings(**SETTINGS))
    fresh.load_state_dict(on_disk, source=trained.run_dir / LATEST)
    again = fresh.state_dict()
    assert list(again) == list(state)
    differing = [key for key in state if key not in NOT_ROUND_TRIPPED and not _equal(state[key], again[key])]
    assert differing == []
    assert state["scaler"] and state["history"] and state["epoch"] == 1  # nothing trivially equal
    assert again["elapsed_s"] >= on_disk["elapsed_s"]
