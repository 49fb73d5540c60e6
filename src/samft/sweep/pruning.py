"""The job side of pruning: report validation Dice to the trial the sweeper created, ask whether to stop."""

from __future__ import annotations

import math
from typing import Any

import optuna

from samft.choices import PRUNERS


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """median: stop a trial whose value is below the median of earlier trials at the same epoch;
    hyperband: successive halving brackets; none: never prune."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; use one of {', '.join(PRUNERS)}")


class TrialReporter:
    """Epoch callback for the Trainer: `reporter(epoch, metrics) -> True` means the trial is pruned."""

    def __init__(self, *, storage: str, study_name: str, number: int, pruner: str, metric: str = "val/dice"):
        # Optuna has no public "trial of this study by number"; its public storage API finds the trial's id
        # (the Study object keeps its storage and study id only in private attributes).
        opened = optuna.storages.get_storage(storage)
        trial_id = opened.get_trial_id_from_study_id_trial_number(opened.get_study_id_from_name(study_name), number)
        self.study = optuna.load_study(study_name=study_name, storage=opened, pruner=make_pruner(pruner))
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.metric = metric

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        self.trial.report(float(value), step=epoch)
        return self.trial.should_prune()
