"""Parallel sweep workers on a real PostgreSQL server: one study, three `python -m samft.train -m` workers at once,
one killed with SIGKILL in the middle of a trial, a restarted worker, and no password in any file.

The server is started by the session fixture below (tests/postgres_server.py); the test is skipped only where no
PostgreSQL binary exists, and fails instead when SAMFT_REQUIRE_POSTGRES=1 (set by .ci/run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import postgres_server
import pytest
import torch
from helpers.patience import patience
from postgres_server import Server, find_bin, running_server

from samft.data.demo import ensure_demo_dataset
from samft.sweep.liveness import REASON_ATTR, WORKER_ATTR

STUDY = "ich_optuna"
APP = Path(__file__).resolve().parent / "sweep_app" / "app.py"
# the cheapest real trial: the smoke experiment, one epoch of one step
TINY = ("experiment=smoke", "epochs=1", "max_steps_per_epoch=1", "hparams_search.pruner=none",
        "hardware.num_workers=0")
ENV_STORAGE = "hparams_search.storage=${oc.env:SAMFT_OPTUNA_STORAGE}"


@pytest.fixture(scope="session")
def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl; skips the test without them (fails it when SAMFT_REQUIRE_POSTGRES=1)."""
    bin_dir = find_bin()
    if bin_dir is None:
        reason = ("no PostgreSQL server binaries (initdb, pg_ctl) on PATH, in /usr/lib/postgresql/*/bin or in "
                  "SAMFT_PG_BIN; install PostgreSQL (Debian: apt-get install postgresql) to run this test")
        if os.environ.get("SAMFT_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return bin_dir


@pytest.fixture(scope="session")
def postgres(postgres_bin: Path) -> Iterator[Server]:
    """A PostgreSQL server for the session (as an unprivileged user when the tests run as root)."""
    with running_server(postgres_bin) as server:
        yield server


def test_the_server_moves_to_another_port_when_its_first_choice_is_taken(postgres_bin: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A free port is not reserved: a second pytest worker can bind it before the server does (here a socket
    listening on it), which costs a retry on a new port, not a failed test."""
    import psycopg2

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        choose = postgres_server._free_port
        monkeypatch.setattr(postgres_server, "_free_port", lambda: next(ports, None) or choose())
        with running_server(postgres_bin) as server:
            assert server.port != taken.getsockname()[1]
            psycopg2.connect(server.url()).close()


def start_worker(root: Path, name: str, *, n_trials: int, storage_override: str, env: dict) -> subprocess.Popen:
    """`python -m samft.train -m hparams_search=ich_optuna ...` writing into root/name, its console in
    root/name.console (so the password check covers what it prints as well)."""
    console = open(root / f"{name}.console", "a")  # noqa: SIM115 (closed with the process by the OS)
    return subprocess.Popen(
        [sys.executable, "-m", "samft.train", "-m", "hparams_search=ich_optuna", *TINY,
         f"hparams_search.n_trials={n_trials}", storage_override, f"output_dir={root / name}",
         f"data.demo_dir={root / 'demo'}"],
        stdout=console, stderr=subprocess.STDOUT, cwd=root, env=env,
    )


def wait_for(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_three_workers_share_a_study_and_a_killed_workers_trial_ends_failed(postgres: Server,
                                                                            tmp_path: Path) -> None:
    url = postgres.create_database("sweep_workers")
    ensure_demo_dataset(root=tmp_path / "demo", n_patients=4, seed=0)  # once, not raced by three workers
    env = {**os.environ, "SAMFT_OPTUNA_STORAGE": url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a fresh database: the three workers set up its tables and the study at the same moment
    workers = {
        "a": start_worker(tmp_path, "a", n_trials=2, storage_override=ENV_STORAGE, env=env),
        # the URL typed on the command line instead of the environment: still never written by a job
        "b": start_worker(tmp_path, "b", n_trials=1, storage_override=f"hparams_search.storage={url}", env=env),
        "c": start_worker(tmp_path, "c", n_trials=2, storage_override=ENV_STORAGE, env=env),
    }
    pids = {name: proc.pid for name, proc in workers.items()}
    sweep_c = tmp_path / "c" / "sweeps" / STUDY
    wait_for(lambda: any(sweep_c.glob("trial_*/train.log")) or workers["c"].poll() is not None, timeout=patience(240),
             what="worker c to start its first trial")
    assert workers["c"].poll() is None, (tmp_path / "c.console").read_text()[-3000:]
    [killed_dir] = list(sweep_c.glob("trial_*"))
    assert not (killed_dir / "summary.json").exists()  # mid-trial
    workers["c"].send_signal(signal.SIGKILL)
    workers["c"].wait()
    # restarted at once (as a supervisor would), while the other two are still sweeping
    restarted = start_worker(tmp_path, "c", n_trials=1, storage_override=ENV_STORAGE, env=env)
    for name, proc in (("a", workers["a"]), ("b", workers["b"]), ("c", restarted)):
        assert proc.wait(timeout=patience(400)) == 0, (tmp_path / f"{name}.console").read_text()[-3000:]

    trials = optuna.load_study(study_name=STUDY, storage=url).trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))) == list(range(5))  # unique, no gaps
    by_worker: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs[WORKER_ATTR]["pid"], []).append(trial)
    assert {pid: len(ts) for pid, ts in by_worker.items()} == {pids["a"]: 2, pids["b"]: 1, pids["c"]: 1,
                                                                restarted.pid: 1}
    [killed] = by_worker[pids["c"]]
    assert killed_dir.name == f"trial_{killed.number}"
    assert killed.state == optuna.trial.TrialState.FAIL
    assert f"worker process {pids['c']}" in killed.user_attrs[REASON_ATTR]
    others = [t for t in trials if t is not killed]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in others), [(t.number, t.state) for t in others]
    # the restarted worker continued the study: its trial came after the killed one, in the same sweep folder
    [resumed] = by_worker[restarted.pid]
    assert resumed.number > killed.number and (sweep_c / f"trial_{resumed.number}" / "summary.json").is_file()
    assert "continuing study ich_optuna with" in (tmp_path / "c.console").read_text()
    for name, expected in (("a", 2), ("b", 1)):
        assert len(list((tmp_path / name / "sweeps" / STUDY).glob("trial_*"))) == expected

    # the URL reached the runs, masked: config.json, the checkpoints' config, the trial table
    masked = url.replace(postgres.password, "***")
    for name in ("a", "b"):
        run_dir = tmp_path / name / "sweeps" / STUDY / f"trial_{by_worker[pids[name]][0].number}"
        assert json.loads((run_dir / "config.json").read_text())["trial"]["storage"] == masked
        config = torch.load(run_dir / "best_model.pth", map_location="cpu", weights_only=True)["config"]
        assert config["trial"]["storage"] == masked
    assert_no_file_contains(tmp_path, postgres.password)


def test_a_url_typed_as_a_hydra_override_is_not_written(postgres: Server, tmp_path: Path) -> None:
    """`hydra.sweeper.storage=postgresql://user:password@...` on the command line: the jobs' .hydra/hydra.yaml
    would hold it; they get an environment reference instead."""
    url = postgres.create_database("typed_url")
    proc = subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.sweeper.storage={url}",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=median"],
        capture_output=True, text=True, timeout=patience(300), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="app", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [list(t.intermediate_values) for t in trials] == [[1, 2, 3, 4]] * 2  # the jobs reached the database
    assert "${oc.env:SAMFT_SECRET_" in (tmp_path / "sweep" / "trial_0" / ".hydra" / "hydra.yaml").read_text()
    assert postgres.password not in proc.stdout + proc.stderr
    assert_no_file_contains(tmp_path, postgres.password, at_least=6)


def assert_no_file_contains(root: Path, secret: str, *, at_least: int = 50) -> None:
    """Every byte of every file below `root` (checkpoints, .hydra/, logs, consoles, trial tables) is checked."""
    checked = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret.encode() not in path.read_bytes(), f"the password is written in {path}"
            checked += 1
    assert checked >= at_least
