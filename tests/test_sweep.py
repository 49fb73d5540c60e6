"""The samft_optuna sweeper: sqlite study, resume with new trials, failures, NaN, pruning, the report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

APP = Path(__file__).resolve().parent / "sweep_app" / "app.py"


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweep.dir={sweep_dir}", *overrides],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="app", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


# the first sweep of three tests, run once: 3 trials without pruning, trial 2 reporting 0.0 after every epoch
FIRST = ("bad_trial=2", "hydra.sweeper.pruner=none")


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The sweep folder of `FIRST` and its process; tests that run more sweeps continue a copy of the folder."""
    sweep_dir = tmp_path_factory.mktemp("first")
    return sweep_dir, sweep(sweep_dir, *FIRST)


def test_sweep_writes_a_sqlite_study_and_the_report(first_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp_path, proc = first_sweep
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    table = pd.read_csv(tmp_path / "trials.csv")
    assert list(table["number"]) == [0, 1, 2]
    assert list(table["objective"]) == pytest.approx([t.value for t in trials])
    assert list(table["param:x"]) == pytest.approx([t.params["x"] for t in trials])
    assert all(Path(d).name == f"trial_{n}" for n, d in zip(table["number"], table["run_dir"]))
    best = max(trials, key=lambda t: t.value)
    assert (tmp_path / "best_run.txt").read_text().strip().endswith(f"trial_{best.number}")
    assert "best trial" in proc.stdout
    assert (tmp_path / "optimization_history.png").stat().st_size > 0
    assert (tmp_path / "param_importances.png").stat().st_size > 0


def test_rerunning_continues_the_study_with_new_trials(first_sweep: tuple[Path, subprocess.CompletedProcess],
                                                      tmp_path: Path) -> None:
    shutil.copytree(first_sweep[0], tmp_path, dirs_exist_ok=True)
    first = {t.number: t.params["x"] for t in study(tmp_path).trials}
    assert list(first) == [0, 1, 2]
    # the same command again, as after a crash; the sampler seed is fixed in the config
    sweep(tmp_path, *FIRST)
    trials = study(tmp_path).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]
    second = [t.params["x"] for t in trials[3:]]
    assert not set(second) & set(first.values())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("trial_")) == [
        f"trial_{n}" for n in range(6)
    ]
    assert len(pd.read_csv(tmp_path / "trials.csv")) == 6


def test_failed_and_nan_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep(tmp_path, "fail_trial=0", "nan_trial=1", "hydra.sweeper.n_trials=4")
    states = [t.state for t in study(tmp_path).trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.COMPLETE]
    assert not any(s == optuna.trial.TrialState.RUNNING for s in states)


def test_a_trial_worse_than_the_median_is_pruned_after_the_warmup(tmp_path: Path) -> None:
    """The warm-up reaches each job through the sweeper's `trial.*` overrides (without it: pruned at epoch 1)."""
    sweep(tmp_path, "bad_trial=2", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner_warmup_epochs=2")
    trials = study(tmp_path).trials
    assert [t.state for t in trials[:2]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[2].state == optuna.trial.TrialState.PRUNED
    assert list(trials[2].intermediate_values) == [1, 2, 3]  # spared for 2 epochs, stopped after the 3rd of 4
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table.loc[2, "state"] == "PRUNED"
    assert list(table["epochs_run"]) == [4, 4, 3]  # from each run's summary.json: the pruned one ran 3 epochs


def test_pruner_none_never_prunes(first_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    assert "bad_trial=2" in FIRST  # a trial the median pruner stops (test_a_trial_worse_than_the_median_is_pruned_*)
    assert study(first_sweep[0]).trials[2].state == optuna.trial.TrialState.COMPLETE


def test_the_hyperband_pruner_stops_bad_trials_early_through_the_job_side_reporter(tmp_path: Path) -> None:
    """hparams_search.pruner=hyperband: the job's TrialReporter (as the Trainer's epoch callback) is told to stop
    trials far below the others before their last epoch, and never a good one."""
    from samft.sweep.pruning import TrialReporter

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="app", storage=storage, direction="maximize")
    stopped_at = {}
    for number in range(12):
        trial = study.ask()
        value = 0.0 if number >= 6 else 0.5 + 0.01 * number
        reporter = TrialReporter(storage=storage, study_name="app", number=trial.number, pruner="hyperband")
        stop = next((epoch for epoch in range(1, 5) if reporter(epoch, {"val/dice": value})), None)
        if stop is None:
            study.tell(trial, value)
        else:
            stopped_at[number] = stop
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    # which bad trials a bracket stops varies with the pruner's auto max_resource (run to run: 3 or all 6)
    assert stopped_at and set(stopped_at) <= set(range(6, 12)) and max(stopped_at.values()) < 4, stopped_at
