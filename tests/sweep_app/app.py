"""A Hydra app that stands in for samft.train in sweeper tests: it reports per-epoch values to its Optuna
trial exactly as samft.runner does, and fails, returns NaN or reports bad values on request."""

import math

import hydra
import optuna
from omegaconf import DictConfig

from samft.sweep.pruning import TrialReporter


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def task(cfg: DictConfig) -> float:
    number = cfg.trial.number
    if number == cfg.fail_trial:
        raise RuntimeError(f"trial {number} fails on purpose")
    if number == cfg.nan_trial:
        return math.nan
    reporter = TrialReporter(storage=cfg.trial.storage, study_name=cfg.trial.study_name, number=number,
                             pruner=cfg.trial.pruner)
    value = 0.0 if number == cfg.bad_trial else cfg.x
    for epoch in range(1, cfg.epochs + 1):
        if reporter(epoch, {"val/dice": value}):
            raise optuna.TrialPruned()
    return value


if __name__ == "__main__":
    task()
