"""Which RUNNING trials still have a live worker.

A trial is RUNNING in the study from `study.ask()` until `study.tell()`. A worker that dies in between (SIGKILL,
a lost node, a second Ctrl-C that skipped our handler) would leave it RUNNING for ever, so every sweep worker:

- stamps each trial it asks with its identity (`samft_worker`: host, PID namespace, pid) and
- records a heartbeat for it in the study database every `interval` seconds (Optuna's heartbeat table, stamped
  with the database server's clock, so workers on machines with skewed clocks agree) until it tells the outcome.

A trial is dead when its worker ran on this machine (same host name and PID namespace) and that process is gone,
or when its last heartbeat is older than the grace period. `fail_dead_trials` marks those FAIL, with the reason
in the `fail_reason` user attribute; every worker calls it at start-up and before each batch of trials.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

log = logging.getLogger(__name__)

WORKER_ATTR = "samft_worker"
REASON_ATTR = "fail_reason"


def worker_identity() -> dict[str, Any]:
    """This process as stored on each trial it runs: {"host", "pidns", "pid"}."""
    return {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid()}


def _pid_namespace() -> str | None:
    """The PID namespace (e.g. 'pid:[4026531836]'): two containers may share a host name but not pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_gone(worker: Any) -> bool:
    """True only when `worker` ran on this machine and its process no longer exists (never a guess)."""
    if not isinstance(worker, dict):
        return False
    here = worker_identity()
    if worker.get("host") != here["host"] or worker.get("pidns") is None or worker.get("pidns") != here["pidns"]:
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int) or pid == here["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def trial_id(storage: RDBStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of trial `number` of `study` (what heartbeats and storage writes take), through Optuna's
    public storage API: Optuna 2.10 keeps `Study._study_id` and `Trial._trial_id` private."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def _heartbeat_ages(storage: RDBStorage, study_id: int) -> dict[int, float] | None:
    """Seconds since the last heartbeat of each RUNNING trial of the study that has one, by trial number, measured
    on the database server's clock. (Optuna 2.10's own check uses `timedelta.seconds`, which forgets whole
    days, so a trial dead for a day and a minute looks a minute old.) None when this Optuna has no such tables."""
    try:  # Optuna has no public read of heartbeat times; its private ORM models are the one way in 2.10
        from optuna.storages._rdb import models

        trials, beats = models.TrialModel, models.TrialHeartbeatModel
    except (ImportError, AttributeError):
        return None
    from sqlalchemy import func

    session = storage.scoped_session()
    try:
        now = session.execute(func.now()).scalar()
        rows = (
            session.query(trials.number, beats.heartbeat)
            .join(beats, beats.trial_id == trials.trial_id)
            .filter(trials.study_id == study_id, trials.state == TrialState.RUNNING)
            .all()
        )
        session.commit()
    finally:
        storage.scoped_session.remove()
    now = now.replace(tzinfo=None)  # PostgreSQL answers timezone-aware, the column is naive (as in Optuna)
    return {number: (now - beat.replace(tzinfo=None)).total_seconds() for number, beat in rows}


def fail_dead_trials(study: optuna.Study, storage: RDBStorage, *, grace_period: float) -> list[int]:
    """Mark FAIL every RUNNING trial of `study` whose worker is dead (see the module docstring); returns their
    numbers. A trial that another worker finishes or fails at the same moment is left to it."""
    study_id = storage.get_study_id_from_name(study.study_name)
    ages = _heartbeat_ages(storage, study_id)
    failed = []
    if ages is None:
        # Without Optuna's ORM models (a release that moved them) the stale check falls back to Optuna's public
        # one, with the storage's same grace period: it misses trials dead for whole days (see _heartbeat_ages)
        # and cannot give the trials it fails a fail_reason (a finished trial's attributes are read-only).
        ages = {}
        for stale in storage.fail_stale_trials(study_id):
            number = storage.get_trial(stale).number
            log.warning("trial %d marked FAIL: no heartbeat from its worker for over %g s (Optuna's check)",
                        number, grace_period)
            failed.append(number)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        age = ages.get(trial.number)
        if _process_gone(worker):
            reason = f"worker process {worker['pid']} on {worker['host']} is gone"
        elif age is not None and age > grace_period:
            reason = f"no heartbeat from its worker for {age:.0f} s (grace period {grace_period:g} s)"
        else:
            continue
        try:
            tid = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(tid, REASON_ATTR, reason)
            if not storage.set_trial_state(tid, TrialState.FAIL):
                continue
        except RuntimeError:  # finished meanwhile by its own worker or failed by another one
            continue
        log.warning("trial %d marked FAIL: %s", trial.number, reason)
        failed.append(trial.number)
    return failed


class Heartbeat:
    """Context manager: a daemon thread that records a heartbeat every `interval` seconds for each trial id in
    `self.trials` (add a trial right after asking it, discard it once told). A failed write is logged once and
    retried at the next beat; the trials stay RUNNING meanwhile."""

    def __init__(self, storage: RDBStorage, *, interval: float) -> None:
        self.storage, self.interval = storage, interval
        self.trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="samft-heartbeat", daemon=True)
        self._warned = False

    def add(self, trial_id: int) -> None:
        """Start beating for `trial_id` (its first beat is recorded now)."""
        with self._lock:
            self.trials.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.trials.discard(trial_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                trials = sorted(self.trials)
            for trial_id in trials:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # the database may be briefly unreachable; keep beating
                    if not self._warned:
                        log.warning("heartbeat for trial id %d not recorded: %s", trial_id, str(err).splitlines()[0])
                        self._warned = True
