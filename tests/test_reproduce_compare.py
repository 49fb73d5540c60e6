"""`samft.reproduce`: every kind of difference is listed and exits 1, and a default changed in conf/ after a run
cannot change its re-run (the saved config wins)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from samft import reproduce

SUMMARY: dict[str, Any] = {
    "best_metric": 0.5, "best_epoch": 1, "epochs_run": 2, "stop_reason": "completed",
    "history": [{"epoch": 1, "train/loss": 1.0, "val/dice": 0.5, "time/epoch_s": 3.0, "memory/rss_mb": 10.0},
                {"epoch": 2, "train/loss": 0.9, "val/dice": float("nan"), "time/epoch_s": 3.0}],
    "git": {"commit": "abc", "dirty": False}, "packages": {"torch": "2.5.0", "monai": "1.4.0"},
}


def _changed(path: tuple, value: Any) -> dict[str, Any]:
    new = copy.deepcopy(SUMMARY)
    target = new
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return new


@pytest.mark.parametrize(("path", "value", "line"), [
    (("best_metric",), 0.6, "best_metric: 0.5 -> 0.6"),
    (("best_epoch",), 2, "best_epoch: 1 -> 2"),
    (("epochs_run",), 1, "epochs_run: 2 -> 1"),
    (("stop_reason",), "early_stopping", "stop_reason: 'completed' -> 'early_stopping'"),
    (("history", 0, "train/loss"), 1.0000001, "epoch 1 train/loss: 1.0 -> 1.0000001"),
    (("history", 1, "val/dice"), 0.1, "epoch 2 val/dice: nan -> 0.1"),
    (("git", "commit"), "def", "git commit: 'abc' -> 'def'"),
    (("git", "dirty"), True, "git dirty: False -> True"),
    (("packages", "torch"), "2.6.0", "package torch: 2.5.0 -> 2.6.0"),
])
def test_each_kind_of_difference_is_listed_and_exits_1(path: tuple, value: Any, line: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    new = _changed(path, value)
    assert reproduce.compare(SUMMARY, new) == [line]
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: (tmp_path, reproduce.compare(SUMMARY, new)))
    assert reproduce.main([str(tmp_path)]) == 1
    assert f"  {line}" in capsys.readouterr().out


def test_timings_memory_and_nan_equal_to_nan_are_no_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    new = _changed(("history", 0, "time/epoch_s"), 9.0)
    new["history"][0]["memory/rss_mb"] = 99.0
    assert reproduce.compare(SUMMARY, new) == []
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: (tmp_path, []))
    assert reproduce.main([str(tmp_path)]) == 0
    assert "identical metrics" in capsys.readouterr().out


def test_a_default_changed_in_conf_does_not_change_the_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    with initialize_config_dir(config_dir=str(reproduce.CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", "optim.lr=0.0123"])
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["experiment=smoke", "optim.lr=0.0123"]), run_dir / ".hydra" / "overrides.yaml")
    conf = tmp_path / "conf"
    shutil.copytree(reproduce.CONF_DIR, conf)
    train_yaml = conf / "train.yaml"
    assert f"\nseed: {cfg.seed}\n" in train_yaml.read_text()
    train_yaml.write_text(train_yaml.read_text().replace(f"\nseed: {cfg.seed}\n", f"\nseed: {cfg.seed + 1}\n"))
    monkeypatch.setattr(reproduce, "CONF_DIR", conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("train", overrides=["experiment=smoke"]).seed == cfg.seed + 1  # the default did change
    rerun = reproduce.saved_config(run_dir)
    assert rerun.seed == cfg.seed and rerun.optim.lr == pytest.approx(0.0123)
    assert rerun.resume == "never" and rerun.trial.number is None
