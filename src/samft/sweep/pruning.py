"""The job side of pruning: report validation Dice to the trial the sweeper created, ask whether to stop."""

from __future__ import annotations

import math
from typing import Any

import optuna

from samft.choices import PRUNERS, RANGES, describe, within
from samft.errors import UserError

# The sweep keys a user types (conf/optuna_common.yaml) -> the trial keys the sweeper passes them to each job
# as; their ranges are written once, under the trial keys, in samft.choices.RANGES.
PRUNER_KEYS = {
    "hparams_search.pruner_warmup_epochs": "trial.pruner_warmup_epochs",
    "hparams_search.pruner_startup_trials": "trial.pruner_startup_trials",
}


def check_pruner_settings(*, name: str, warmup_epochs: Any, startup_trials: Any) -> None:
    """Raise UserError (one line naming the `hparams_search` key) for an unknown pruner name or a warm-up or
    start-up count that is not a whole number in its range."""
    if name not in PRUNERS:
        raise UserError(f"config key 'hparams_search.pruner' is {name!r}; allowed values: {', '.join(PRUNERS)}")
    for key, value in zip(PRUNER_KEYS, (warmup_epochs, startup_trials)):
        bound = RANGES[PRUNER_KEYS[key]]
        if isinstance(value, bool) or not isinstance(value, int) or not within(value, bound):
            raise UserError(f"config key '{key}' is {value!r}; it must be a whole number {describe(bound)}")


def make_pruner(name: str, *, warmup_epochs: int = 0, startup_trials: int = 2,
                epochs: int | None = None) -> optuna.pruners.BasePruner:
    """The pruner `hparams_search.pruner` names. Its steps are epochs (from 1; a trial reports at each validation).

    median: stop a trial whose best value is below the median of the completed trials' values at the same epoch;
    hyperband: successive halving brackets (Optuna's HyperbandPruner); none: never prune.
    warmup_epochs: no validation in a trial's first `warmup_epochs` epochs prunes it (median: Optuna's
    `n_warmup_steps = warmup_epochs + 1`; hyperband: `min_resource = warmup_epochs + 1`, its first rung; later
    brackets and rungs compare later still). startup_trials (median only, Optuna's `n_startup_trials`): no pruning
    until this many trials have completed. epochs: a trial's epochs, hyperband's `max_resource` (None: Optuna's
    estimate from the first completed trial)."""
    check_pruner_settings(name=name, warmup_epochs=warmup_epochs, startup_trials=startup_trials)
    # Epochs count from 1 and Optuna spares the steps below n_warmup_steps / min_resource: + 1 spares epochs
    # 1..warmup_epochs, and 0 keeps pruning from the first validation on.
    first_prunable = warmup_epochs + 1
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=first_prunable)
    if name == "hyperband":
        # Hyperband has floor(log3(max_resource / min_resource)) + 1 brackets, and without any it never prunes.
        # Optuna's "auto" max_resource is the last step of the trials completed when a job first asks, + 1: after
        # a first trial that early-stopped within the warm-up, that job's trial would be left without brackets
        # (and would record no rung values for later trials to compete with).
        max_resource: int | str = "auto" if epochs is None else epochs
        return optuna.pruners.HyperbandPruner(min_resource=first_prunable, max_resource=max_resource)
    return optuna.pruners.NopPruner()


class TrialReporter:
    """Epoch callback for the Trainer: `reporter(epoch, metrics) -> True` means the trial is pruned.

    `pruner`, `warmup_epochs`, `startup_trials` and the run's `epochs` are as `make_pruner` takes them."""

    def __init__(self, *, storage: str, study_name: str, number: int, pruner: str, warmup_epochs: int = 0,
                 startup_trials: int = 2, epochs: int | None = None, metric: str = "val/dice"):
        # Optuna has no public "trial of this study by number"; its public storage API finds the trial's id
        # (the Study object keeps its storage and study id only in private attributes).
        opened = optuna.storages.get_storage(storage)
        trial_id = opened.get_trial_id_from_study_id_trial_number(opened.get_study_id_from_name(study_name), number)
        self.pruner = make_pruner(pruner, warmup_epochs=warmup_epochs, startup_trials=startup_trials, epochs=epochs)
        self.study = optuna.load_study(study_name=study_name, storage=opened, pruner=self.pruner)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.metric = metric

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        self.trial.report(float(value), step=epoch)
        return self.trial.should_prune()
