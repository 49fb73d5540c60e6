"""Learning-rate schedules, early stopping and the pruning callback behave as configured."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.standin import make_trainer, settings

from samft.engine import BEST, ValidationResult, build_scheduler, load_checkpoint, updates_per_epoch


@pytest.fixture
def scripted_validation(monkeypatch):
    """Replace validation with a scripted sequence of val/dice values (one per validation)."""

    def script(values: list[float]) -> list[int]:
        calls: list[int] = []

        def fake_validate_crops(model, loader, **kwargs) -> ValidationResult:
            calls.append(1)
            return ValidationResult({"val/dice": values[len(calls) - 1]}, None)

        monkeypatch.setattr("samft.engine.loop.validate_crops", fake_validate_crops)
        return calls

    return script


def _lrs(summary: dict) -> list[float]:
    return [h["lr"] for h in summary["history"]]


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        n_train=4,
        scheduler="step",
        scheduler_kwargs={"step_size": 2, "gamma": 0.5},
        train_settings=settings(epochs=5, val_every=5),
    )
    assert _lrs(trainer.fit()) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_cosine_schedule_warms_up_then_decays_to_min_lr_per_update(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        n_train=4,
        scheduler="cosine",
        scheduler_kwargs={"warmup_epochs": 1, "min_lr": 0.01},
        train_settings=settings(epochs=4, val_every=4),
    )
    summary = trainer.fit()
    # 2 updates per epoch, 8 in all, 2 of warmup: lr at the start of each epoch (base 0.1, floor 0.01).
    cosine = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in (2, 4, 6)]
    assert _lrs(summary) == pytest.approx([0.1 / 3, *cosine])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_cosine_scales_each_parameter_group_to_the_same_floor() -> None:
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [weights[0]], "lr": 1.0}, {"params": [weights[1]], "lr": 0.1}], lr=1.0)
    schedule = build_scheduler("cosine", opt, epochs=2, steps_per_epoch=5, min_lr=0.01)
    assert schedule.interval == "step"
    for _ in range(10):
        opt.step()
        schedule.scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])


def test_plateau_schedule_steps_on_the_validation_metric(tmp_path: Path, scripted_validation) -> None:
    scripted_validation([0.5, 0.4, 0.4, 0.6, 0.5, 0.5])
    trainer = make_trainer(
        tmp_path,
        n_train=4,
        scheduler="plateau",
        scheduler_kwargs={"factor": 0.5, "plateau_patience": 1},
        train_settings=settings(epochs=6),
    )
    summary = trainer.fit()
    assert _lrs(summary) == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_early_stopping_uses_patience_and_min_delta(tmp_path: Path, scripted_validation) -> None:
    scripted_validation([0.5, 0.6, 0.605, 0.61, 0.9])
    trainer = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=5, patience=2, min_delta=0.02))
    summary = trainer.fit()
    assert summary["stop_reason"] == "early_stopping"
    assert summary["epochs_run"] == 4
    assert (summary["best_metric"], summary["best_epoch"]) == (0.6, 2)
    assert load_checkpoint(tmp_path / BEST)["epoch"] == 2


def test_validation_every_n_epochs_and_patience_counts_validations(tmp_path: Path, scripted_validation) -> None:
    calls = scripted_validation([0.5, 0.4, 0.3])
    trainer = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=5, val_every=2, patience=5))
    summary = trainer.fit()
    assert len(calls) == 3  # epochs 2, 4 and the last one
    assert [h.get("val/dice") for h in summary["history"]] == [None, 0.5, None, 0.4, 0.3]
    assert summary["stop_reason"] == "completed"


def test_epoch_callback_true_prunes_the_run(tmp_path: Path, scripted_validation) -> None:
    scripted_validation([0.1, 0.2, 0.3])
    seen = []

    def prune_at_2(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append((epoch, metrics["val/dice"]))
        return epoch == 2

    summary = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=3), epoch_callback=prune_at_2).fit()
    assert summary["stop_reason"] == "pruned" and summary["epochs_run"] == 2
    assert seen == [(1, 0.1), (2, 0.2)]
    assert load_checkpoint(tmp_path / "latest_model.pth")["epoch"] == 2


def test_updates_per_epoch_counts_a_partial_window_and_the_cap() -> None:
    assert updates_per_epoch(10, grad_accum_steps=4) == 3
    assert updates_per_epoch(10, grad_accum_steps=4, max_steps_per_epoch=2) == 2


def test_unknown_scheduler_is_refused() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="plateau, cosine, poly, step"):
        build_scheduler("linear", opt, epochs=1, steps_per_epoch=1)
