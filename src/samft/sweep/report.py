"""After a sweep: the trial table (CSV and printed), the best run's folder, and the Optuna plots."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna
import pandas as pd

from samft.redact import redact
from samft.sweep.liveness import REASON_ATTR, WORKER_ATTR

log = logging.getLogger(__name__)


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, objective, each parameter, epochs run, run directory, the worker that
    ran it and why it failed; URL passwords masked."""
    rows = []
    for trial in study.trials:
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "objective": trial.value,
            **{f"param:{k}": v for k, v in trial.params.items()},
            "epochs_run": trial.user_attrs.get("epochs_run"),
            "run_dir": trial.user_attrs.get("run_dir"),
            "worker": _worker(trial.user_attrs.get(WORKER_ATTR)),
            "fail_reason": trial.user_attrs.get(REASON_ATTR),
        })
    return pd.DataFrame(redact(rows))


def _worker(worker: object) -> str | None:
    """host:pid of the sweep worker that ran the trial."""
    return f"{worker.get('host')}:{worker.get('pid')}" if isinstance(worker, dict) else None


def write_report(study: optuna.Study, sweep_dir: Path) -> None:
    table = trial_table(study)
    table.to_csv(sweep_dir / "trials.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        print("no trial completed")
        return
    best = study.best_trial
    print(f"best trial {best.number}: {best.value:.4f} {redact(best.params)}")
    print(f"best run directory: {best.user_attrs.get('run_dir')}")
    (sweep_dir / "best_run.txt").write_text(f"{best.user_attrs.get('run_dir')}\n")
    try:
        _plots(study, sweep_dir, n_completed=len(completed))
    except (ImportError, ValueError, RuntimeError) as err:  # the study and the table are safe; say what is missing
        log.warning("sweep plots not written: %s", err)


def _plots(study: optuna.Study, sweep_dir: Path, *, n_completed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna_plots.plot_optimization_history(study)
    plt.savefig(sweep_dir / "optimization_history.png", bbox_inches="tight")
    plt.close("all")
    if n_completed >= 2 and study.best_trial.params:
        _plot_importances(study, sweep_dir / "param_importances.png")


def _plot_importances(study: optuna.Study, path: Path) -> None:
    """Optuna's importances drawn with matplotlib: optuna 2.10's own plot and its default fANOVA evaluator
    break on current matplotlib and numpy, its random-forest (MDI) evaluator works."""
    import matplotlib.pyplot as plt

    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(names)))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance for the objective (mean decrease in impurity)")
    ax.set_title("hyperparameter importances")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
