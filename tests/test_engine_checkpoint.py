"""Atomic checkpoint writes, weights_only loading, RNG capture, and a kill during a Trainer's save."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.standin import make_trainer, settings

from samft.engine import LATEST, load_checkpoint, save_checkpoint
from samft.engine.checkpoint import FORMAT, capture_rng, copy_checkpoint, restore_rng
from samft.errors import UserError


def _state(value: float) -> dict:
    return {"format": FORMAT, "weights": torch.full((64, 64), value), "epoch": int(value)}


def _partial_writer(real_save):
    def save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("killed while writing (injected)")

    return save


def test_a_kill_during_torch_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / LATEST
    save_checkpoint(_state(1.0), path)
    monkeypatch.setattr(torch, "save", _partial_writer(torch.save))
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(_state(2.0), path)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == [LATEST]  # no temporary file left behind


def test_a_failed_rename_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / LATEST
    save_checkpoint(_state(1.0), path)

    def failing_replace(src, dst):
        raise OSError("power cut before rename (injected)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.full((64, 64), 1.0))
    assert sorted(os.listdir(tmp_path)) == [LATEST]


def test_a_kill_during_the_trainers_second_save_keeps_epoch_1(tmp_path: Path, monkeypatch) -> None:
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=3))
    real_save, calls = torch.save, []

    def save_once_then_die(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            return _partial_writer(real_save)(obj, handle)
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_once_then_die)
    with pytest.raises(OSError, match="injected"):
        trainer.fit()
    state = load_checkpoint(tmp_path / LATEST)
    assert state["epoch"] == 1 and state["position"] is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_copy_checkpoint_is_an_identical_file(tmp_path: Path) -> None:
    save_checkpoint(_state(3.0), tmp_path / "a.pth")
    copy_checkpoint(tmp_path / "a.pth", tmp_path / "b.pth")
    save_checkpoint(_state(4.0), tmp_path / "a.pth")  # replacing the source must not change the copy
    assert load_checkpoint(tmp_path / "b.pth")["epoch"] == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"not a zip", "cannot be read"), ("foreign", "not a samft training checkpoint")],
)
def test_unreadable_checkpoints_raise_a_user_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "x.pth"
    if content == "foreign":
        torch.save({"state_dict": torch.zeros(2)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    clicks = torch.Generator().manual_seed(7)
    random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=clicks)
    save_checkpoint({"format": FORMAT, "rng": capture_rng(clicks)}, tmp_path / "rng.pth")

    def draw() -> list[float]:
        return [random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=clicks))]

    expected = draw()
    draw()
    restore_rng(load_checkpoint(tmp_path / "rng.pth")["rng"], clicks)
    assert draw() == expected


def test_trainer_checkpoint_holds_the_full_state(tmp_path: Path) -> None:
    make_trainer(tmp_path, optimizer="adamw", train_settings=settings(epochs=1)).fit()
    state = torch.load(tmp_path / LATEST, weights_only=True)
    expected = {"model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_metric", "best_epoch"}
    expected |= {"history", "early_stopping", "rng", "logger_run_id", "config", "events", "position"}
    assert expected <= state.keys()
    assert state["optimizer"]["state"]  # AdamW moments are saved
    assert {"python", "numpy", "torch", "cuda", "clicks"} == state["rng"].keys()
    assert (tmp_path / "best_model.pth").is_file()
