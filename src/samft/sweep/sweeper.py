"""samft's Optuna sweep loop.

Over the stock hydra-optuna-sweeper 1.3 it adds: a default sqlite study in the sweep folder so that the
same command continues a crashed sweep; job folders named after the trial number (never overwritten);
a fresh sampler stream on resume (a seeded sampler would repeat the first sweep's parameters); failed and
non-finite trials recorded as FAIL while the sweep goes on; pruned trials recorded as PRUNED; Ctrl-C recorded
as FAIL for the interrupted trial, which ends the sweep; heartbeats, so trials of a killed worker end FAIL
instead of RUNNING for ever (samft.sweep.liveness); database failures as one line (samft.sweep.storage); no
credential in any file the jobs write; and the trial table and plots written at the end (samft.sweep.report).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import OmegaConf, read_write

from samft.redact import redact
from samft.sweep.liveness import (
    REASON_ATTR,
    WORKER_ATTR,
    Heartbeat,
    fail_dead_trials,
    trial_id,
    worker_identity,
)
from samft.sweep.pruning import make_pruner
from samft.sweep.report import write_report
from samft.sweep.storage import database_errors, open_storage

log = logging.getLogger(__name__)

STORAGE_ENV = "SAMFT_OPTUNA_STORAGE"
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
_OVERRIDE_ESCAPE = re.compile(r"\\([\\()\[\]{}:=, \t])")  # what Hydra escapes in an unquoted override value

try:  # private in hydra-optuna-sweeper 1.3 (see _STOCK_HOOKS)
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
except ImportError:
    create_params_from_overrides = None

# hydra-optuna-sweeper 1.3 has no public extension API. samft's loop reuses the stock search-space parsing and
# trial configuration through these private methods of OptunaSweeperImpl and the module's
# create_params_from_overrides; a release without one of them runs its own stock sweep instead (with a warning).
_STOCK_HOOKS = ("_process_searchspace_config", "_parse_sweeper_params_config", "_get_directions", "_configure_trials")


class PruningSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *, pruner: str, pruner_warmup_epochs: int = 0, pruner_startup_trials: int = 2,
                 heartbeat_interval: int = 30, grace_period: int = 120, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pruner_name = pruner
        self.pruner_warmup_epochs, self.pruner_startup_trials = pruner_warmup_epochs, pruner_startup_trials
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period

    def sweep(self, arguments: list[str]) -> None:
        missing = [name for name in _STOCK_HOOKS if not callable(getattr(self, name, None))]
        missing += [] if callable(create_params_from_overrides) else ["create_params_from_overrides"]
        if missing:
            log.warning("this hydra-optuna-sweeper has no %s; running its stock sweep, without samft's pruning, "
                        "heartbeats, resumable storage and failure handling", ", ".join(missing))
            return super().sweep(arguments)
        # checked (one line naming the hparams_search key) before the study or any trial exists
        pruner = make_pruner(self.pruner_name, warmup_epochs=self.pruner_warmup_epochs,
                             startup_trials=self.pruner_startup_trials)
        self._warn_if_warmup_covers_the_run()
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            distributions.pop(name, None)
        fixed = {name: _hidden(value) for name, value in fixed.items()}
        self._hide_hydra_override_secrets()
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        storage = open_storage(url, heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period)
        with database_errors(url):
            study = optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=self.sampler,
                direction=self._get_directions()[0], pruner=pruner, load_if_exists=True,
            )
            fail_dead_trials(study, storage, grace_period=self.grace_period)
            if study.trials:
                log.info("continuing study %s with %d earlier trials", study.study_name, len(study.trials))
                self.sampler.reseed_rng()
            with Heartbeat(storage, interval=self.heartbeat_interval) as heartbeat:
                interrupted = self._run_trials(study, storage, heartbeat, distributions, fixed, url)
            write_report(study, sweep_dir)
        if interrupted is not None:
            failed = (f"trial {', '.join(map(str, interrupted))} recorded as FAIL (its folder keeps latest_model.pth)"
                      if interrupted else "between trials")
            print(f"sweep stopped by Ctrl-C: {failed}; rerun the same command to continue the study with new "
                  "trials", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    def _run_trials(self, study: optuna.Study, storage: Any, heartbeat: Heartbeat,
                    distributions: dict[str, Any], fixed: dict[str, Any], url: str) -> list[int] | None:
        """Ask, launch and tell batches of `n_jobs` trials until this worker's `n_trials` are done. Returns None,
        or after Ctrl-C (the sweep then stops) the numbers of the trials it interrupted, recorded as FAIL."""
        identity = self.job_overrides(study.study_name, url)
        worker = worker_identity()
        remaining = self.n_trials
        pending: list[optuna.trial.Trial] = []  # asked and not yet told
        try:
            while remaining > 0:
                fail_dead_trials(study, storage, grace_period=self.grace_period)
                batch = min(self.n_jobs, remaining)
                beating = []  # the trials' storage ids
                for _ in range(batch):
                    trial = study.ask()
                    pending.append(trial)
                    beating.append(trial_id(storage, study, trial.number))
                    heartbeat.add(beating[-1])
                    trial.set_user_attr(WORKER_ATTR, worker)
                trials = list(pending)
                overrides = [
                    (*params, f"trial.number={trial.number}", *identity)
                    for trial, params in zip(trials, self._configure_trials(trials, distributions, fixed))
                ]
                try:
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                finally:
                    for beat in beating:
                        heartbeat.discard(beat)
                self.job_idx += len(returns)
                outcomes = []
                for trial, ret in zip(trials, returns):
                    outcomes.append(_tell(study, trial, ret))
                    pending.remove(trial)
                stopped = [trial.number for trial, outcome in zip(trials, outcomes) if outcome == "interrupted"]
                if stopped:
                    return stopped
                failures = sum(outcome == "failed" for outcome in outcomes)
                if failures / len(returns) > self.max_failure_rate:
                    raise RuntimeError(
                        f"{failures} of {len(returns)} trials failed, above max_failure_rate={self.max_failure_rate}"
                    )
                remaining -= batch
        except KeyboardInterrupt:  # a second Ctrl-C inside a job, one outside the training loop, or between trials
            for trial in pending:
                _fail(study, trial, "interrupted by Ctrl-C")
            return [trial.number for trial in pending]
        return None

    def job_overrides(self, study_name: str, url: str) -> tuple[str, ...]:
        """The `trial.*` overrides every job of this sweep gets besides its number: where its trial is and how
        to prune it (samft.runner builds its TrialReporter from them)."""
        return (f"trial.study_name={study_name}", f"trial.storage='{_storage_for_jobs(url)}'",
                f"trial.pruner={self.pruner_name}", f"trial.pruner_warmup_epochs={self.pruner_warmup_epochs}",
                f"trial.pruner_startup_trials={self.pruner_startup_trials}")

    def _warn_if_warmup_covers_the_run(self) -> None:
        epochs = OmegaConf.select(self.config, "epochs", default=None)
        if self.pruner_name != "none" and isinstance(epochs, int) and self.pruner_warmup_epochs >= epochs:
            log.warning("hparams_search.pruner_warmup_epochs=%d covers all %d epochs: no trial will be pruned",
                        self.pruner_warmup_epochs, epochs)

    def _hide_hydra_override_secrets(self) -> None:
        """A URL with a password typed as a hydra override (`hydra.sweeper.storage=postgresql://u:pw@...`) would
        land in every job's .hydra/hydra.yaml: the jobs get an environment reference to it instead."""
        hydra_overrides = self.config.hydra.overrides.hydra
        with read_write(hydra_overrides):
            for i, override in enumerate(hydra_overrides):
                key, sep, value = override.partition("=")
                if sep and redact(value) != value:
                    hydra_overrides[i] = f"{key}={_hidden(value)}"


def _hidden(value: Any) -> Any:
    """A string holding a URL password becomes `${oc.env:NAME}`, NAME an environment variable of this process
    (inherited by local and SLURM jobs) holding it, so that jobs resolve it but never write it. `value` may be
    escaped as in an override (`postgresql\\://u\\:pw@h`, how the stock sweeper passes fixed values)."""
    if not isinstance(value, str) or redact(value) == value:
        return value
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # typed quoted on the command line
        value = value[1:-1]
    else:
        value = _OVERRIDE_ESCAPE.sub(r"\1", value)
    if os.environ.get(STORAGE_ENV) == value:
        name = STORAGE_ENV
    else:
        name = "SAMFT_SECRET_" + hashlib.sha256(value.encode()).hexdigest()[:12].upper()
        os.environ[name] = value
    return "${oc.env:" + name + "}"


def _storage_for_jobs(storage: str) -> str:
    """What the jobs (and their saved overrides.yaml) get: an environment reference instead of a URL with
    credentials (SAMFT_OPTUNA_STORAGE when the URL came from it)."""
    return _hidden(storage)


def _fail(study: optuna.Study, trial: optuna.trial.Trial, reason: str) -> None:
    """Record `trial` as FAIL with `reason`, unless it is already finished (another worker may have failed it)."""
    try:
        if any(t.number == trial.number and t.state.is_finished() for t in study.get_trials(deepcopy=False)):
            return
        trial.set_user_attr(REASON_ATTR, reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except RuntimeError as err:
        log.warning("trial %d could not be recorded as failed: %s", trial.number, err)


def _tell(study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> str:
    """Record one job's outcome: "completed", "pruned", "failed", or "interrupted" (Ctrl-C ended the run early:
    recorded as FAIL, since its score is truncated)."""
    run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else None
    summary = _summary(run_dir)
    try:
        if run_dir is not None:
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("epochs_run", summary.get("epochs_run"))
        return _record(study, trial, ret, stop_reason=summary.get("stop_reason"))
    except RuntimeError as err:  # marked FAIL meanwhile by another worker that saw no heartbeat
        log.warning("trial %d finished after another worker had marked it failed: %s", trial.number, err)
        return "failed"


def _job_error(ret: JobReturn) -> Exception | None:
    """What a failed job raised, None for a completed one. The public `JobReturn.return_value` re-raises it after
    writing Hydra's "Error executing job with overrides" line to stderr; the sweep logs its own line instead."""
    if ret.status != JobStatus.FAILED:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ret.return_value  # noqa: B018 (the property raises the job's exception)
    except Exception as err:
        return err
    return None


def _record(study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn, *, stop_reason: str | None) -> str:
    error = _job_error(ret)
    if isinstance(error, optuna.TrialPruned):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d pruned", trial.number)
        return "pruned"
    if stop_reason == "interrupted":  # returned its best score so far, or failed for want of one
        log.warning("trial %d was interrupted by Ctrl-C; recorded as failed (its score is truncated)", trial.number)
        trial.set_user_attr(REASON_ATTR, "interrupted by Ctrl-C")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "interrupted"
    if ret.status == JobStatus.FAILED:
        log.warning("trial %d failed: %s", trial.number, redact(str(error)))
        trial.set_user_attr(REASON_ATTR, redact(str(error).strip().splitlines()[0] if str(error).strip() else
                                                type(error).__name__))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "failed"
    try:
        value = float(ret.return_value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        log.warning("trial %d returned %r; recorded as failed", trial.number, ret.return_value)
        trial.set_user_attr(REASON_ATTR, f"returned {ret.return_value!r}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "failed"
    study.tell(trial, value)
    return "completed"


def _summary(run_dir: Path | None) -> dict[str, Any]:
    """The job's summary.json (stop reason, epochs run), {} when it wrote none."""
    path = run_dir / "summary.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}

