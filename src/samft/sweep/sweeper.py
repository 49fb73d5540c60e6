"""samft's Optuna sweep loop.

Over the stock hydra-optuna-sweeper 1.3 it adds: a default sqlite study in the sweep folder so that the
same command continues a crashed sweep; job folders named after the trial number (never overwritten);
a fresh sampler stream on resume (a seeded sampler would repeat the first sweep's parameters); failed and
non-finite trials recorded as FAIL while the sweep goes on; pruned trials recorded as PRUNED; and the
trial table and plots written at the end (samft.sweep.report).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides

from samft.sweep.pruning import make_pruner
from samft.sweep.report import write_report

log = logging.getLogger(__name__)

STORAGE_ENV = "SAMFT_OPTUNA_STORAGE"


class PruningSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *, pruner: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pruner_name = pruner

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            distributions.pop(name, None)
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, sampler=self.sampler,
            direction=self._get_directions()[0], pruner=make_pruner(self.pruner_name), load_if_exists=True,
        )
        if study.trials:
            log.info("continuing study %s with %d earlier trials", study.study_name, len(study.trials))
            self.sampler.reseed_rng()
        identity = (f"trial.study_name={study.study_name}", f"trial.storage='{_storage_for_jobs(storage)}'",
                    f"trial.pruner={self.pruner_name}")
        remaining = self.n_trials
        while remaining > 0:
            batch = min(self.n_jobs, remaining)
            trials = [study.ask() for _ in range(batch)]
            overrides = [
                (*params, f"trial.number={trial.number}", *identity)
                for trial, params in zip(trials, self._configure_trials(trials, distributions, fixed))
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failures = sum(_tell(study, trial, ret) for trial, ret in zip(trials, returns))
            if failures / len(returns) > self.max_failure_rate:
                raise RuntimeError(
                    f"{failures} of {len(returns)} trials failed, above max_failure_rate={self.max_failure_rate}"
                )
            remaining -= batch
        write_report(study, sweep_dir)


def _storage_for_jobs(storage: str) -> str:
    """What the jobs (and their saved overrides.yaml) get: the env-var reference instead of a URL with
    credentials, when the URL came from SAMFT_OPTUNA_STORAGE."""
    if os.environ.get(STORAGE_ENV) == storage:
        return "${oc.env:" + STORAGE_ENV + "}"
    return storage


def _tell(study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> bool:
    """Record one job's outcome; returns True when the trial failed."""
    run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else None
    if run_dir is not None:
        trial.set_user_attr("run_dir", str(run_dir))
        summary = run_dir / "summary.json"
        if summary.exists():
            trial.set_user_attr("epochs_run", json.loads(summary.read_text()).get("epochs_run"))
    if ret.status == JobStatus.FAILED:
        error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d pruned", trial.number)
            return False
        log.warning("trial %d failed: %s", trial.number, error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return True
    try:
        value = float(ret.return_value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        log.warning("trial %d returned %r; recorded as failed", trial.number, ret.return_value)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return True
    study.tell(trial, value)
    return False
