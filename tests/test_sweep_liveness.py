"""Sweeps that survive their workers: trials of dead workers end FAIL, heartbeats keep live ones RUNNING, Ctrl-C
fails the interrupted trial and stops the sweep, a damaged or locked study database is one line, no alembic chatter.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers.patience import patience
from optuna.trial import TrialState

from samft.sweep.liveness import REASON_ATTR, WORKER_ATTR, worker_identity

APP = Path(__file__).resolve().parent / "sweep_app" / "app.py"
FAST = ("hydra.sweeper.pruner=none", "hydra.sweeper.sampler.seed=null")


def sweep(sweep_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweep.dir={sweep_dir}", *FAST, *overrides],
        capture_output=True, text=True, timeout=patience(300),
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir / 'optuna.db'}"


def dead_pid() -> int:
    """The pid of a process of ours that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_trials_of_dead_workers_end_failed_and_live_ones_stay_running(tmp_path: Path) -> None:
    url = storage_url(tmp_path)
    # the live trial's heartbeat, recorded here, must still be within the grace period when the sweep below has
    # started up and checks the study (a minute alone on the machine, longer beside another pytest worker)
    grace = round(patience(60))
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=grace)
    study = optuna.create_study(study_name="app", storage=storage, direction="maximize")
    other_host = {"host": "elsewhere", "pidns": "pid:[1]", "pid": 4242}
    # a worker on another machine whose last heartbeat is a day and ten seconds old (Optuna 2.10's own check
    # reads timedelta.seconds and would see ten seconds)
    stale = study.ask()
    stale.set_user_attr(WORKER_ATTR, other_host)
    storage.record_heartbeat(stale._trial_id)
    # a worker on this machine whose process is gone, killed before its first heartbeat was recorded
    orphan = study.ask()
    orphan.set_user_attr(WORKER_ATTR, {**worker_identity(), "pid": dead_pid()})
    # a live worker elsewhere: its heartbeat is fresh
    alive = study.ask()
    alive.set_user_attr(WORKER_ATTR, other_host)
    storage.record_heartbeat(alive._trial_id)
    # a trial of a worker that never stamps itself (the stock sweeper) and never beats: cannot be judged
    unknown = study.ask()
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 day', '-10 seconds') "
                   "WHERE trial_id = ?", (stale._trial_id,))

    sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweeper.heartbeat_interval=1",
          f"hydra.sweeper.grace_period={grace}")

    trials = optuna.load_study(study_name="app", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING,
                                         TrialState.COMPLETE]
    assert "no heartbeat from its worker for 864" in trials[stale.number].user_attrs[REASON_ATTR]
    assert "is gone" in trials[orphan.number].user_attrs[REASON_ATTR]
    assert REASON_ATTR not in trials[alive.number].user_attrs and REASON_ATTR not in trials[unknown.number].user_attrs
    new = trials[-1].user_attrs[WORKER_ATTR]
    assert new["host"] == socket.gethostname() and new["pid"] != worker_identity()["pid"]
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table.loc[0, "fail_reason"].startswith("no heartbeat") and table.loc[4, "worker"].endswith(f":{new['pid']}")


@pytest.mark.slow
def test_a_running_trial_keeps_beating_and_another_worker_leaves_it_alone(tmp_path: Path) -> None:
    url = storage_url(tmp_path)
    optuna.create_study(study_name="app", storage=url, direction="maximize")
    args = [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'slow'}", *FAST, "hydra.sweeper.n_trials=1",
            f"hydra.sweeper.storage={url}", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3",
            "sleep_s=9"]
    slow = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = optuna.storages.RDBStorage(url)
    deadline = time.monotonic() + patience(120)
    while not optuna.load_study(study_name="app", storage=storage).trials:
        assert time.monotonic() < deadline and slow.poll() is None, slow.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(5)  # longer than the grace period: only the heartbeat keeps the trial alive now
    # a second worker on another sweep folder checks the study for dead trials before its own trial
    sweep(tmp_path / "other", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={url}",
          "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
    assert slow.wait(timeout=patience(120)) == 0, slow.communicate()[0][-3000:]
    trials = optuna.load_study(study_name="app", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        [(beat,)] = db.execute("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = ?",
                               (trials[0]._trial_id,)).fetchall()
    started = trials[0].datetime_start.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    assert (datetime.datetime.fromisoformat(beat) - started).total_seconds() >= 5  # beats while the job runs


@pytest.mark.parametrize("how", ["interrupt_trial", "keyboard_interrupt_trial"])
def test_ctrl_c_fails_the_interrupted_trial_and_stops_the_sweep(tmp_path: Path, how: str) -> None:
    """The training loop answers the first Ctrl-C by saving and returning its best score so far; that truncated
    score must not count as a result. A Ctrl-C outside the loop (or a second one) raises KeyboardInterrupt."""
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=4", f"{how}=1", check=False)
    assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sweep stopped by Ctrl-C: trial 1 recorded as FAIL" in proc.stderr
    trials = optuna.load_study(study_name="app", storage=storage_url(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]  # trials 2 and 3 never started
    assert trials[1].user_attrs[REASON_ATTR] == "interrupted by Ctrl-C"
    assert list(pd.read_csv(tmp_path / "trials.csv")["state"]) == ["COMPLETE", "FAIL"]
    # the same command continues the study
    sweep(tmp_path, "hydra.sweeper.n_trials=1")
    assert [t.state for t in optuna.load_study(study_name="app", storage=storage_url(tmp_path)).trials] == [
        TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def test_a_damaged_study_database_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "optuna.db").write_bytes(b"not a database, just bytes\n" * 200)
    proc = sweep(tmp_path, check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(tmp_path / "optuna.db") in line and "file is not a database" in line and "move it away" in line


@pytest.mark.slow
def test_a_locked_study_database_is_one_line_naming_it(tmp_path: Path) -> None:
    optuna.create_study(study_name="app", storage=storage_url(tmp_path), direction="maximize")  # as a sweep leaves it
    holding = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(tmp_path / "optuna.db", isolation_level=None, check_same_thread=False)
        db.execute("BEGIN EXCLUSIVE")
        holding.set()
        release.wait(patience(120))  # past the sweep below, which must meet the lock
        db.execute("ROLLBACK")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        holding.wait(10)
        proc = sweep(tmp_path, check=False)
    finally:
        release.set()
        holder.join()
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert str(tmp_path / "optuna.db") in line and "database is locked" in line and "another process" in line


def test_a_sweep_opens_without_alembic_chatter(tmp_path: Path) -> None:
    """Optuna imports alembic, which logged seven "setup plugin" INFO lines at the top of every run."""
    proc = subprocess.run(
        [sys.executable, "-m", "samft.train", "-m", "hparams_search=ich_optuna", "hparams_search.n_trials=0",
         f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=patience(300), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sweeps" / "ich_optuna" / "optuna.db").is_file()  # a fresh study was set up
    assert "alembic" not in proc.stdout + proc.stderr and "setup plugin" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_ctrl_c_in_a_real_training_trial_fails_it_and_stops_the_sweep(tmp_path: Path) -> None:
    """samft.train's loop answers Ctrl-C by saving and returning the best Dice so far (here after epoch 1 of
    3): the sweep must record FAIL, not that truncated score, and start no further trial."""
    sweep_dir = tmp_path / "sweeps" / "ich_optuna"
    proc = subprocess.Popen(
        [sys.executable, "-m", "samft.train", "-m", "hparams_search=ich_optuna", "hparams_search.n_trials=3",
         "hparams_search.pruner=none", "experiment=smoke", "epochs=3", "max_steps_per_epoch=1", "val_scans=1",
         "hardware.num_workers=0", f"output_dir={tmp_path}", f"data.demo_dir={tmp_path / 'demo'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = sweep_dir / "trial_0" / "train.log"
    deadline = time.monotonic() + patience(400)
    while not (log.is_file() and "epoch 1/3" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=patience(300))
    assert proc.returncode == 130, stderr[-3000:]
    assert "sweep stopped by Ctrl-C: trial 0 recorded as FAIL" in stderr
    [trial] = optuna.load_study(study_name="ich_optuna", storage=storage_url(sweep_dir)).trials
    assert trial.state == TrialState.FAIL and trial.user_attrs[REASON_ATTR] == "interrupted by Ctrl-C"
    summary = json.loads((sweep_dir / "trial_0" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["best_metric"] is not None  # a truncated score
    assert (sweep_dir / "trial_0" / "latest_model.pth").is_file() and not (sweep_dir / "trial_1").exists()


@pytest.mark.parametrize(("storage", "expected"), [
    ("postgresql://samft:Marker-pw@127.0.0.1:1/optuna",
     "study storage postgresql://samft:***@127.0.0.1:1/optuna cannot be used: connection to server"),
    ("mysql://samft:Marker-pw@127.0.0.1:1/optuna", "No module named 'MySQLdb'; install the database driver"),
    ("not-a-url", "the study storage 'not-a-url' (hparams_search.storage) is not a database URL"),
])
def test_an_unusable_storage_is_one_line_without_its_password(tmp_path: Path, storage: str, expected: str) -> None:
    proc = sweep(tmp_path, f"hydra.sweeper.storage={storage}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert expected in line and "Marker-pw" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("typed", [
    "postgresql://samft:pw@db:5432/optuna",  # as typed
    r"postgresql\://samft\:pw@db\:5432/optuna",  # as the stock sweeper re-escapes a fixed value
    "'postgresql://samft:pw@db:5432/optuna'",  # quoted on the command line
])
def test_jobs_get_a_password_url_as_an_environment_reference(typed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from samft.sweep.sweeper import _hidden

    monkeypatch.delenv("SAMFT_OPTUNA_STORAGE", raising=False)
    reference = _hidden(typed)
    name = reference.removeprefix("${oc.env:").removesuffix("}")
    assert name.startswith("SAMFT_SECRET_") and os.environ[name] == "postgresql://samft:pw@db:5432/optuna"
    del os.environ[name]  # set by _hidden itself, not through monkeypatch
    monkeypatch.setenv("SAMFT_OPTUNA_STORAGE", "postgresql://samft:pw@db:5432/optuna")
    assert _hidden(typed) == "${oc.env:SAMFT_OPTUNA_STORAGE}"
    assert _hidden("sqlite:////abs/optuna.db") == "sqlite:////abs/optuna.db"  # nothing to hide
