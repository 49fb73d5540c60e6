"""Interrupted + resumed == uninterrupted: same weights (bit for bit) and same history, on CPU."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.standin import assert_params_close, make_trainer, params, settings

from samft.engine import LATEST, load_checkpoint
from samft.engine.interrupts import GracefulInterrupt

EPOCHS = 4


def _deterministic(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History without wall-clock and memory readings."""
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "memory/"))} for h in history]


def _trainer(run_dir: Path, scheduler: str, stop_after_epoch: int | None = None, **kwargs: Any):
    scheduler_kwargs = {"cosine": {"warmup_epochs": 1, "min_lr": 1e-4}, "plateau": {"plateau_patience": 0}}
    return make_trainer(
        run_dir,
        optimizer="adamw",  # optimiser state (moments, step counts) must survive the resume too
        scheduler=scheduler,
        scheduler_kwargs=scheduler_kwargs[scheduler],
        train_settings=settings(epochs=EPOCHS, grad_accum_steps=2, max_grad_norm=1.0,
                                stop_after_epoch=stop_after_epoch),
        **kwargs,
    )


@pytest.fixture(scope="module", params=["cosine", "plateau"])
def uninterrupted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    trainer = _trainer(tmp_path_factory.mktemp("full"), request.param)
    summary = trainer.fit()
    assert summary["stop_reason"] == "completed" and summary["epochs_run"] == EPOCHS
    return {"scheduler": request.param, "params": params(trainer.model), "summary": summary}


def _resume_and_compare(run_dir: Path, reference: dict[str, Any]) -> dict[str, Any]:
    resumed = _trainer(run_dir, reference["scheduler"])
    summary = resumed.fit(resume_from=run_dir / LATEST)
    assert summary["stop_reason"] == "completed"
    assert summary["global_step"] == reference["summary"]["global_step"]
    assert _deterministic(summary["history"]) == _deterministic(reference["summary"]["history"])
    assert_params_close(params(resumed.model), reference["params"], rtol=0, atol=0)
    return summary


def test_ctrl_c_after_an_epoch_then_resume_matches_uninterrupted(tmp_path: Path, uninterrupted) -> None:
    def interrupt_after_epoch_2(epoch: int, metrics: dict[str, float]) -> bool:
        if epoch == 2:
            raise KeyboardInterrupt
        return False

    first = _trainer(tmp_path, uninterrupted["scheduler"], epoch_callback=interrupt_after_epoch_2).fit()
    assert first["stop_reason"] == "interrupted"
    assert first["epochs_run"] == 2
    state = load_checkpoint(tmp_path / LATEST)
    assert state["epoch"] == 2 and state["position"] is None
    assert state["config"] == {"seed": 0, "optim": {"lr": 0.1}}
    resumed = _resume_and_compare(tmp_path, uninterrupted)
    assert resumed["wall_time_s"] > state["elapsed_s"] > 0


def test_stop_after_epoch_keeps_the_schedule_and_resume_matches_uninterrupted(tmp_path: Path, uninterrupted) -> None:
    first = _trainer(tmp_path, uninterrupted["scheduler"], stop_after_epoch=2).fit()
    assert first["stop_reason"] == "stopped_after_epoch" and first["epochs_run"] == 2
    assert _deterministic(first["history"]) == _deterministic(uninterrupted["summary"]["history"][:2])
    again = _trainer(tmp_path, uninterrupted["scheduler"], stop_after_epoch=2).fit(resume_from=tmp_path / LATEST)
    assert again["stop_reason"] == "stopped_after_epoch" and again["epochs_run"] == 2  # nothing more to do
    _resume_and_compare(tmp_path, uninterrupted)


def test_sigint_mid_epoch_saves_at_a_step_boundary_and_resume_matches(tmp_path: Path, uninterrupted) -> None:
    """The first Ctrl-C (SIGINT) finishes the running optimiser step and saves the position in the epoch."""
    trainer = _trainer(tmp_path, uninterrupted["scheduler"])
    calls = {"n": 0}
    segment = trainer.model.segment

    def sigint_in_epoch_3(image: torch.Tensor, **kwargs: Any):
        if trainer.model.training:
            calls["n"] += 1
            if calls["n"] == 2 * 4 + 1:  # 4 micro-batches per epoch: the 1st micro-batch of epoch 3
                signal.raise_signal(signal.SIGINT)
        return segment(image, **kwargs)

    trainer.model.segment = sigint_in_epoch_3
    first = trainer.fit()
    assert first["stop_reason"] == "interrupted"
    assert first["epochs_run"] == 2
    state = load_checkpoint(tmp_path / LATEST)
    assert state["position"]["batches_done"] == 2  # the running window (micro-batches 1-2) was completed
    assert state["global_step"] == 2 * 2 + 1
    _resume_and_compare(tmp_path, uninterrupted)


def test_first_ctrl_c_requests_a_stop_and_the_second_aborts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with GracefulInterrupt() as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
