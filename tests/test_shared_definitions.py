"""One helper per job: prediction builds its preprocessing where training does, and a run's logger is closed once
by its one owner, the Trainer, also when the run fails."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers.hardening import unet_checkpoint
from helpers.standin import make_trainer, settings

import samft.inference
from samft.builders import preprocessing
from samft.engine.checkpoint import load_checkpoint


def test_predictor_builds_its_preprocessing_with_the_training_definition(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = unet_checkpoint(tmp_path / "run")
    calls = []

    def spy(data: Any, norm_stats: Mapping[str, float] | None) -> Any:
        calls.append(dict(data))
        return preprocessing(data, norm_stats)

    monkeypatch.setattr(samft.inference, "preprocessing", spy)
    predictor = samft.inference.Predictor(ckpt, device=__import__("torch").device("cpu"))
    data = load_checkpoint(ckpt)["config"]["data"]
    assert calls == [data]
    assert predictor.preprocessing == preprocessing(data, None)


class CountingLogger:
    """A tracker that counts its calls; `fail_on` names the call that raises."""

    name = "counting"
    run_id: str | None = None

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: dict[str, int] = {}
        self.fail_on = fail_on

    def _count(self, call: str) -> None:
        self.calls[call] = self.calls.get(call, 0) + 1
        if call == self.fail_on:
            raise RuntimeError(f"{call} failed")

    def start(self, *, run_id: str | None = None) -> None:
        self._count("start")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._count("log_metrics")

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        self._count("log_images")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._count("log_summary")

    def close(self) -> None:
        self._count("close")


@pytest.mark.parametrize("fail_on", [None, "start", "log_metrics"])
def test_the_trainer_closes_its_logger_exactly_once(tmp_path: Path, fail_on: str | None) -> None:
    logger = CountingLogger(fail_on)
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1, val_every=1), logger=logger)
    if fail_on is None:
        trainer.fit()
    else:
        with pytest.raises(RuntimeError, match=f"{fail_on} failed"):
            trainer.fit()
    assert logger.calls["close"] == 1 and logger.calls["start"] == 1

