"""hparams_search.pruner_warmup_epochs and pruner_startup_trials: what the pruners do with them (real Optuna
studies in sqlite, real trials, the job-side TrialReporter), their checks, and their way from the composed
sweep config through the sweeper's job overrides and the job's config to the reporter samft.runner builds."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers.patience import patience
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from samft.config import validate
from samft.errors import UserError
from samft.runner import _pruning_callback
from samft.sweep.pruning import TrialReporter, make_pruner

CONF = Path(__file__).resolve().parents[1] / "conf"
GOOD, BAD = 0.5, 0.0


def _study(tmp_path: Path, *, completed: int, validations: list[int]) -> tuple[str, optuna.Study]:
    """A sqlite study with `completed` COMPLETE trials that reported GOOD at each epoch of `validations`."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for _ in range(completed):
        trial = study.ask()
        for epoch in validations:
            trial.report(GOOD, step=epoch)
        study.tell(trial, GOOD)
    return url, study


def _first_pruned(reporter: TrialReporter, validations: list[int]) -> int | None:
    """The epoch at which `reporter` says stop for a trial scoring BAD at every validation (None: never)."""
    return next((epoch for epoch in validations if reporter(epoch, {"val/dice": BAD})), None)


@pytest.mark.parametrize("warmup", [0, 3, 5])
def test_the_median_pruner_spares_the_warmup_epochs_and_prunes_at_the_next_validation(tmp_path: Path,
                                                                                      warmup: int) -> None:
    """Validation every epoch: a trial far below the median is not pruned at epochs 1..W, and is at epoch W + 1."""
    epochs = list(range(1, 9))
    url, study = _study(tmp_path, completed=2, validations=epochs)
    reporter = TrialReporter(storage=url, study_name="s", number=study.ask().number, pruner="median",
                             warmup_epochs=warmup, startup_trials=2)
    assert _first_pruned(reporter, epochs) == warmup + 1


def test_with_validation_every_4_epochs_a_warmup_of_8_epochs_spares_the_first_two_validations(
        tmp_path: Path) -> None:
    """experiments/sweep_demo.md's schedule (validations at epochs 4, 8, ..., 20): the best trial was still on the
    empty-mask plateau at epoch 4 and left it after epoch 8."""
    validations = [4, 8, 12, 16, 20]
    url, study = _study(tmp_path, completed=2, validations=validations)
    spared = TrialReporter(storage=url, study_name="s", number=study.ask().number, pruner="median",
                           warmup_epochs=8, epochs=20)
    assert _first_pruned(spared, validations) == 12
    default = TrialReporter(storage=url, study_name="s", number=study.ask().number, pruner="median")
    assert _first_pruned(default, validations) == 4  # 0, as before: pruned at the first validation


def test_the_median_pruner_waits_for_the_startup_trials_to_complete(tmp_path: Path) -> None:
    epochs = [1, 2, 3]
    url, study = _study(tmp_path, completed=2, validations=epochs)
    waiting = TrialReporter(storage=url, study_name="s", number=study.ask().number, pruner="median",
                            startup_trials=3)
    assert _first_pruned(waiting, epochs) is None  # two completed trials, three needed
    third = study.ask()
    for epoch in epochs:
        third.report(GOOD, step=epoch)
    study.tell(third, GOOD)
    after = TrialReporter(storage=url, study_name="s", number=study.ask().number, pruner="median",
                          startup_trials=3)
    assert _first_pruned(after, epochs) == 1


def _hyperband_stops(tmp_path: Path, *, warmup: int, epochs: int) -> dict[int, int | None]:
    """Three good trials then three bad ones, each through its own TrialReporter (as each sweep job does),
    reporting every epoch: {bad trial number: the epoch it was pruned at, or None}."""
    tmp_path.mkdir(exist_ok=True)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    stopped = {}
    for number in range(6):
        trial = study.ask()
        value = GOOD + 0.01 * number if number < 3 else BAD
        reporter = TrialReporter(storage=url, study_name="s", number=trial.number, pruner="hyperband",
                                 warmup_epochs=warmup, epochs=epochs)
        stop = next((e for e in range(1, epochs + 1) if reporter(e, {"val/dice": value})), None)
        study.tell(trial, value) if stop is None else study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        if number >= 3:
            stopped[number] = stop
        else:
            assert stop is None, f"good trial {number} pruned at epoch {stop}"
    return stopped


def test_hyperband_takes_the_warmup_as_its_first_rung(tmp_path: Path) -> None:
    """min_resource = W + 1. Two epochs make one bracket either way (floor(log3(2 / min_resource)) + 1; more
    brackets would spread the trials by Python's per-process string hash): its first rung is epoch W + 1."""
    assert set(_hyperband_stops(tmp_path / "w1", warmup=1, epochs=2).values()) == {2}
    assert set(_hyperband_stops(tmp_path / "w0", warmup=0, epochs=2).values()) == {1}


def test_a_hyperband_warmup_as_long_as_the_run_prunes_nothing(tmp_path: Path) -> None:
    assert set(_hyperband_stops(tmp_path, warmup=4, epochs=4).values()) == {None}


@pytest.mark.parametrize(("epochs", "pruned_at"), [(8, 4), (None, None)])
def test_hyperbands_max_resource_is_the_runs_epochs_so_an_early_stopped_first_trial_switches_nothing_off(
        tmp_path: Path, epochs: int | None, pruned_at: int | None) -> None:
    """Warm-up 3, 8 epochs. Trial 0 stopped early at epoch 2; trial 1 (good) and trial 2 (bad) run on. With Optuna's
    auto max_resource (None), trial 1's pruner finds no bracket, records no rung value, and trial 2 has no one to
    lose to; with max_resource = 8 trial 2 is stopped at its first rung, epoch 4."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")

    def run(value: float, last_epoch: int) -> int | None:
        trial = study.ask()
        reporter = TrialReporter(storage=url, study_name="s", number=trial.number, pruner="hyperband",
                                 warmup_epochs=3, epochs=epochs)
        stop = next((e for e in range(1, last_epoch + 1) if reporter(e, {"val/dice": value})), None)
        study.tell(trial, value) if stop is None else study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return stop

    assert run(GOOD, 2) is None and run(GOOD, 8) is None
    assert run(BAD, 8) == pruned_at


@pytest.mark.parametrize(("key", "value"), [("warmup_epochs", -1), ("warmup_epochs", 2.5), ("warmup_epochs", "8"),
                                            ("warmup_epochs", True), ("startup_trials", -1),
                                            ("startup_trials", "two")])
def test_a_bad_warmup_or_startup_count_is_one_line_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(UserError, match=f"^config key 'hparams_search.pruner_{key}' is .*; it must be a whole "
                                        "number >= 0$"):
        make_pruner("median", **{key: value})


def test_an_unknown_pruner_is_one_line_naming_the_key() -> None:
    with pytest.raises(UserError, match="^config key 'hparams_search.pruner' is 'mean'; allowed values: none, "):
        make_pruner("mean")


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_the_warmup_travels_from_hparams_search_through_the_sweeper_to_the_runners_reporter(tmp_path: Path) -> None:
    """hparams_search.pruner_* -> hydra.sweeper (conf/optuna_common.yaml) -> the sweeper's `trial.*` job
    overrides -> the job's validated config -> samft.runner's TrialReporter, whose decisions show the settings."""
    sweep_args = ["hparams_search=unet_optuna", "hparams_search.pruner_warmup_epochs=8",
                  "hparams_search.pruner_startup_trials=3", "epochs=20", "val_every=4"]
    sweeper = instantiate(_compose(sweep_args).hydra.sweeper).sweeper
    validations = [4, 8, 12, 16, 20]
    url, study = _study(tmp_path, completed=3, validations=validations)
    job_args = [*sweep_args, f"trial.number={study.ask().number}", *sweeper.job_overrides("s", url)]
    job = validate(_compose(job_args))
    assert (job.trial.pruner, job.trial.pruner_warmup_epochs, job.trial.pruner_startup_trials) == ("median", 8, 3)
    assert _first_pruned(_pruning_callback(job), validations) == 12
    # a study with two completed trials: below pruner_startup_trials=3, nothing is pruned
    (tmp_path / "two").mkdir()
    url, study = _study(tmp_path / "two", completed=2, validations=validations)
    job = validate(_compose([*sweep_args, f"trial.number={study.ask().number}", *sweeper.job_overrides("s", url)]))
    assert _first_pruned(_pruning_callback(job), validations) is None


def test_a_bad_warmup_stops_the_sweep_with_one_line_before_its_folder_exists(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "samft.train", "-m", "hparams_search=unet_optuna",
         "hparams_search.pruner_warmup_epochs=-8", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=patience(120), cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: config key 'hparams_search.pruner_warmup_epochs' is -8; it must be a "
                                   "whole number >= 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("warmup", "warned"), [(20, True), (19, False)])
def test_a_warmup_covering_every_epoch_is_warned_about(caplog: pytest.LogCaptureFixture, warmup: int,
                                                       warned: bool) -> None:
    cfg = _compose(["hparams_search=unet_optuna", f"hparams_search.pruner_warmup_epochs={warmup}", "epochs=20"])
    sweeper = instantiate(cfg.hydra.sweeper).sweeper
    sweeper.config = cfg  # what Hydra's setup() gives the sweeper
    with caplog.at_level(logging.WARNING, logger="samft.sweep.sweeper"):
        sweeper._warn_if_warmup_covers_the_run()
    assert ("pruner_warmup_epochs=20 covers all 20 epochs: no trial will be pruned" in caplog.text) == warned
