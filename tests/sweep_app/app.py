"""A Hydra app that stands in for samft.train in sweeper tests: it reports per-epoch values to its Optuna
trial exactly as samft.runner does, and fails, returns NaN, reports bad values, runs for a while or ends as a
Ctrl-C'd training run does (summary.json with stop_reason "interrupted", best score so far returned) on request."""

import json
import math
import time
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from samft.cli import run_entry
from samft.sweep.pruning import TrialReporter


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def task(cfg: DictConfig) -> float:
    number = cfg.trial.number
    if number == cfg.fail_trial:
        raise RuntimeError(f"trial {number} fails on purpose")
    if number == cfg.nan_trial:
        return math.nan
    time.sleep(cfg.sleep_s)
    if number == cfg.keyboard_interrupt_trial:  # Ctrl-C outside the training loop (or a second one)
        raise KeyboardInterrupt
    if number == cfg.interrupt_trial:
        summary = {"stop_reason": "interrupted", "epochs_run": 1, "best_metric": cfg.x}
        (Path(HydraConfig.get().runtime.output_dir) / "summary.json").write_text(json.dumps(summary))
        return cfg.x
    reporter = TrialReporter(storage=cfg.trial.storage, study_name=cfg.trial.study_name, number=number,
                             pruner=cfg.trial.pruner, warmup_epochs=cfg.trial.pruner_warmup_epochs,
                             startup_trials=cfg.trial.pruner_startup_trials, epochs=cfg.epochs)
    value = 0.0 if number == cfg.bad_trial else cfg.x
    summary_file = Path(HydraConfig.get().runtime.output_dir) / "summary.json"
    for epoch in range(1, cfg.epochs + 1):
        if reporter(epoch, {"val/dice": value}):  # as the Trainer: summary.json first, then the runner raises
            summary_file.write_text(json.dumps({"stop_reason": "pruned", "epochs_run": epoch, "best_metric": value}))
            raise optuna.TrialPruned()
    summary_file.write_text(json.dumps({"stop_reason": "completed", "epochs_run": cfg.epochs, "best_metric": value}))
    return value


if __name__ == "__main__":
    run_entry(task)  # as samft.train: user errors (a damaged study database, ...) as one line, exit code 2
