"""The sweep's liveness check reaches Optuna's storage through its public API (study and trial ids by name and
number); the one private piece left, Optuna's ORM models for reading heartbeat times, is guarded: without it the
check falls back to Optuna's public stale-trial check and still fails the trials of dead workers."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from samft.sweep.liveness import REASON_ATTR, WORKER_ATTR, fail_dead_trials, trial_id, worker_identity

ELSEWHERE = {"host": "elsewhere", "pidns": "pid:[1]", "pid": 4242}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fresh(folder: Path) -> list[optuna.trial.FrozenTrial]:
    """Study "s"'s trials read afresh (a study's own cache keeps the trials this process asked RUNNING)."""
    return optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'optuna.db'}").trials


def _study_with_workers(tmp_path: Path, *, stale_by: str) -> tuple[optuna.Study, optuna.storages.RDBStorage, dict]:
    """A study (second in its database, so trial ids differ from numbers) with four RUNNING trials: one whose
    heartbeat is `stale_by` old (an sqlite datetime modifier), one of a dead local process, one alive, one never
    stamped."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=60)
    other = optuna.create_study(study_name="other", storage=storage)
    other.ask(), other.ask()
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trials = {name: study.ask() for name in ("stale", "orphan", "alive", "unknown")}
    trials["stale"].set_user_attr(WORKER_ATTR, ELSEWHERE)
    trials["orphan"].set_user_attr(WORKER_ATTR, {**worker_identity(), "pid": dead_pid()})
    trials["alive"].set_user_attr(WORKER_ATTR, ELSEWHERE)
    for name in ("stale", "alive"):
        storage.record_heartbeat(trial_id(storage, study, trials[name].number))
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        db.execute(f"UPDATE trial_heartbeats SET heartbeat = datetime('now', {stale_by}) WHERE trial_id = ?",
                   (trial_id(storage, study, trials["stale"].number),))
    return study, storage, trials


def test_trial_ids_come_from_the_public_storage_api(tmp_path: Path) -> None:
    study, storage, trials = _study_with_workers(tmp_path, stale_by="'-10 minutes'")
    ids = [trial_id(storage, study, t.number) for t in trials.values()]
    assert ids == [t._trial_id for t in trials.values()] == [3, 4, 5, 6]  # Optuna's own private ids


def test_a_day_old_heartbeat_fails_its_trial_with_the_reason(tmp_path: Path) -> None:
    study, storage, trials = _study_with_workers(tmp_path, stale_by="'-1 day', '-10 seconds'")
    failed = fail_dead_trials(study, storage, grace_period=60)
    assert sorted(failed) == [trials["stale"].number, trials["orphan"].number]
    states = {name: fresh(tmp_path)[t.number] for name, t in trials.items()}
    assert [s.state for s in states.values()] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING,
                                                  TrialState.RUNNING]
    assert states["stale"].user_attrs[REASON_ATTR].startswith("no heartbeat from its worker for 864")
    assert "is gone" in states["orphan"].user_attrs[REASON_ATTR]


def test_without_optunas_orm_models_the_stale_check_falls_back_to_optunas_public_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import optuna.storages._rdb as rdb

    study, storage, trials = _study_with_workers(tmp_path, stale_by="'-10 minutes'")
    monkeypatch.delattr(rdb, "models")  # as a release that moved its private models would
    monkeypatch.setitem(sys.modules, "optuna.storages._rdb.models", None)
    with caplog.at_level(logging.WARNING, logger="samft.sweep.liveness"):
        failed = fail_dead_trials(study, storage, grace_period=60)
    assert sorted(failed) == sorted([trials["stale"].number, trials["orphan"].number])
    states = {name: fresh(tmp_path)[t.number] for name, t in trials.items()}
    assert [s.state for s in states.values()] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING,
                                                  TrialState.RUNNING]
    assert REASON_ATTR not in states["stale"].user_attrs  # Optuna's check cannot leave a reason
    assert "is gone" in states["orphan"].user_attrs[REASON_ATTR]
    assert f"trial {trials['stale'].number} marked FAIL: no heartbeat" in caplog.text
