"""Fault recovery: out-of-memory, non-finite losses and non-finite gradients are survived, counted, and bounded.

Faults are injected by `samft.engine.faults.inject_faults`, which replaces the model's `segment` on the instance
(the seam the Trainer calls).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers.standin import assert_params_close, make_trainer, params, settings

from samft.engine import LATEST, SUMMARY, load_checkpoint
from samft.engine.faults import inject_faults


def _oom(message: str = "CUDA out of memory (injected)") -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(message)


def test_nonfinite_loss_skips_the_step_and_is_counted(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1))
    inject_faults(trainer.model, lambda n, image: "nan" if n == 3 else None)
    summary = trainer.fit()
    assert summary["stop_reason"] == "completed"
    assert summary["events"]["nonfinite_loss"] == 1
    assert summary["events"]["skipped_steps"] == 1
    assert summary["global_step"] == 3  # 4 windows, one skipped
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert json.loads((tmp_path / SUMMARY).read_text())["events"]["nonfinite_loss"] == 1


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
@pytest.mark.parametrize("factor", [float("nan"), 3e38])  # 3e38: every value finite, their norm is not
def test_nonfinite_gradient_of_a_finite_loss_skips_the_step_and_is_counted(
    tmp_path: Path, factor: float, max_grad_norm: float | None
) -> None:
    """As torch 2.13's CPU bf16 Conv3d weight gradient does on a 2^3 grid: a finite loss, one garbage gradient."""
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1, max_grad_norm=max_grad_norm))
    weight = next(trainer.model.parameters())
    backwards = itertools.count(1)
    weight.register_hook(lambda grad: grad * factor if next(backwards) == 3 else grad)
    summary = trainer.fit()
    assert summary["events"]["nonfinite_grad"] == 1 and summary["events"]["nonfinite_loss"] == 0
    assert summary["events"]["skipped_steps"] == 1 and summary["global_step"] == 3  # 4 windows, one skipped
    assert all(torch.isfinite(p).all() and p.abs().max() < 1e3 for p in trainer.model.parameters())


def test_oom_with_skip_policy_drops_the_window_and_training_goes_on(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1, grad_accum_steps=2))

    def fault(n: int, image: torch.Tensor) -> None:
        if n == 2:
            raise _oom()

    inject_faults(trainer.model, fault)
    summary = trainer.fit()
    assert summary["stop_reason"] == "completed"
    assert summary["events"]["oom"] == 1 and summary["events"]["skipped_steps"] == 1
    assert summary["events"]["oom_split"] == 0
    assert summary["global_step"] == 1  # 2 windows of 2 micro-batches; the first lost its 2nd micro-batch
    assert all(p.grad is None for p in trainer.model.parameters())


def test_oom_with_halve_policy_makes_the_same_update_as_the_unsplit_batch(tmp_path: Path) -> None:
    kw = {"batch_size": 4, "n_train": 4}
    reference = make_trainer(tmp_path / "ref", train_settings=settings(epochs=1, train_clicks=1), **kw)
    reference.fit()
    trainer = make_trainer(
        tmp_path / "halve", train_settings=settings(epochs=1, train_clicks=1, oom_policy="halve"), **kw
    )
    sizes = []

    def fault(n: int, image: torch.Tensor) -> None:
        sizes.append(len(image))
        if len(image) == 4:
            raise _oom()  # every batch of 4 is too large, halves of 2 fit

    inject_faults(trainer.model, fault)
    summary = trainer.fit()
    assert sizes == [4, 2, 2]
    assert summary["events"]["oom"] == 1 and summary["events"]["oom_split"] == 1
    assert summary["events"]["skipped_steps"] == 0 and summary["global_step"] == 1
    assert_params_close(params(trainer.model), params(reference.model), rtol=1e-5, atol=1e-6)


def test_repeated_halving_down_to_single_samples(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, batch_size=4, n_train=4, train_settings=settings(epochs=1, train_clicks=1, oom_policy="halve")
    )

    def fault(n: int, image: torch.Tensor) -> None:
        if len(image) > 1:
            raise _oom()

    inject_faults(trainer.model, fault)
    summary = trainer.fit()
    assert summary["events"]["oom_split"] == 3  # 4 -> 2 + 2 -> (1 + 1) + (1 + 1)
    assert summary["global_step"] == 1


def test_too_many_consecutive_failures_stop_with_a_valid_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=3, max_consecutive_failures=3))
    before = params(trainer.model)
    inject_faults(trainer.model, lambda n, image: "nan" if n >= 2 else None)
    summary = trainer.fit()
    assert summary["stop_reason"] == "too_many_failures"
    assert summary["events"]["nonfinite_loss"] == 3
    assert summary["epochs_run"] == 0 and summary["global_step"] == 1
    state = load_checkpoint(tmp_path / LATEST)
    assert state["global_step"] == 1
    assert state["position"]["batches_done"] == 4
    assert_params_close(dict(state["model"]), params(trainer.model), rtol=0, atol=0)
    assert any(not torch.equal(before[k], state["model"][k]) for k in before)  # the one good step is kept


def test_fp16_overflow_is_skipped_by_the_grad_scaler_and_counted(tmp_path: Path) -> None:
    """fp16 autocast runs on CPU too: an absurd loss scale makes every gradient overflow."""
    trainer = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=1, precision="fp16"))
    assert trainer.step.scaler.is_enabled()
    trainer.step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    before = params(trainer.model)
    summary = trainer.fit()
    assert summary["events"]["fp16_overflow"] == 2  # both updates skipped, the scale halved twice
    assert trainer.step.scaler.get_scale() == 2.0**118
    assert_params_close(params(trainer.model), before, rtol=0, atol=0)
    assert load_checkpoint(tmp_path / LATEST)["scaler"]["scale"] == 2.0**118
