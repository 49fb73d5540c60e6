"""GPU-path findings checked on CPU through the same code: host syncs in the training loop, inference precision
and sliding-window batch size, TF32 (device as a parameter; torch.cuda faked where the code touches it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.standin import make_trainer, settings

SAMFT = Path(__import__("samft").__file__).parent
HOST_READS = ("item", "tolist", "__bool__", "__float__", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts the tensor-to-host reads (each one a sync on a GPU) that samft's own code makes while
    `counting["on"]` is true (MONAI's Dice loss reads its reduce axes from a CPU `arange`: no device sync)."""
    counting: dict[str, Any] = {"on": False, "n": 0, "where": []}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if counting["on"] and f"{SAMFT}" in sys._getframe(1).f_code.co_filename:
                counting["n"] += 1
                counting["where"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counting


@pytest.mark.parametrize("accum", [1, 4])
def test_the_loop_reads_the_loss_on_the_host_once_per_optimiser_step_not_per_micro_step(
    tmp_path: Path, host_reads: dict[str, Any], accum: int
) -> None:
    """The model is prompt-free (its click simulation is the model's own business); everything else the loop
    does between two optimiser steps stays on the device."""
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1, grad_accum_steps=accum, prompt_mode="auto",
                                                             ich_loss_weight=0.0), batch_size=1, n_train=8)
    train_window = trainer._train_window
    windows = []

    def counted_window(window):
        host_reads["on"] = True
        try:
            return train_window(window)
        finally:
            host_reads["on"] = False
            windows.append(len(window))

    trainer._train_window = counted_window
    summary = trainer.fit()
    assert windows == [accum] * (8 // accum) and summary["global_step"] == 8 // accum
    assert host_reads["n"] == len(windows), host_reads["where"]  # one read per window, whatever its micro-steps
