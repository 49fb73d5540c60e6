"""Where samft reaches into a library's private API (Hydra's config loader, hydra-optuna-sweeper's internals,
MONAI's resampler, logging's format string) it checks first, and without it falls back to the stock behaviour.
Each test takes the private piece away, as a release that moved it would, and checks the stock path still works;
the public replacements (a failed job's exception, a trial's state, the pruning reporter's trial) are checked
by their behaviour."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.utils import JobReturn, JobStatus

CONF = Path(__file__).resolve().parents[1] / "conf"


# ---------------------------------------------------------------------------------------------- hydra --help
def test_help_keeps_hydras_stock_listing_when_its_private_repository_builder_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from samft.hydra_help import reuse_config_repository

    build = ConfigLoaderImpl._parse_overrides_and_create_caching_repo
    listed = []

    def future_stock(self, group_name: str, results_filter: ObjectType | None = ObjectType.CONFIG,
                     config_name: str | None = None, overrides: list[str] | None = None) -> list[str]:
        """A Hydra release's own listing, after its private builder was renamed."""
        listed.append(group_name)
        return build(self, config_name, list(overrides or ()))[1].get_group_options(group_name, results_filter)

    monkeypatch.setattr(ConfigLoaderImpl, "get_group_options", future_stock)
    monkeypatch.delattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo")
    assert reuse_config_repository() is False
    assert ConfigLoaderImpl.get_group_options is future_stock
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("model", config_name="train")
    assert "sam_med3d_tiny" in options and listed == ["model"]


def test_help_patch_is_in_place_with_hydras_private_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from samft.hydra_help import reuse_config_repository

    monkeypatch.setattr(ConfigLoaderImpl, "get_group_options", ConfigLoaderImpl.get_group_options)  # undone after
    assert reuse_config_repository() is True
    assert getattr(ConfigLoaderImpl.get_group_options, "_samft_reuses_repository", False)


# ---------------------------------------------------------------------------------------------- the sweeper
def _sweeper_impl():
    from samft.sweep.sweeper import PruningSweeperImpl

    return PruningSweeperImpl(pruner="none", sampler=None, direction="maximize", storage=None, study_name="s",
                              n_trials=1, n_jobs=1, max_failure_rate=1.0, search_space=None,
                              custom_search_space=None, params=None)


@pytest.mark.parametrize("hook", ["_configure_trials", "_get_directions", "create_params_from_overrides"])
def test_the_sweeper_runs_the_stock_sweep_when_a_private_hook_is_gone(
    hook: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    from samft.sweep import sweeper

    stock = []
    monkeypatch.setattr(OptunaSweeperImpl, "sweep", lambda self, arguments: stock.append(arguments))
    if hook == "create_params_from_overrides":
        monkeypatch.setattr(sweeper, hook, None)
    else:
        monkeypatch.delattr(OptunaSweeperImpl, hook)
    with caplog.at_level(logging.WARNING, logger="samft.sweep.sweeper"):
        _sweeper_impl().sweep(["optim.lr=interval(1e-5,1e-3)"])
    assert stock == [["optim.lr=interval(1e-5,1e-3)"]]
    assert f"has no {hook}; running its stock sweep" in caplog.text


def test_the_sweeper_finds_its_private_hooks_in_the_pinned_release() -> None:
    from samft.sweep import sweeper

    impl = _sweeper_impl()
    assert all(callable(getattr(impl, name)) for name in sweeper._STOCK_HOOKS)
    assert callable(sweeper.create_params_from_overrides)


def _job(status: JobStatus, value: object) -> JobReturn:
    ret = JobReturn(overrides=["optim.lr=0.1"], status=status)
    ret.return_value = value
    return ret


def test_a_failed_jobs_exception_through_the_public_return_value(capsys: pytest.CaptureFixture[str]) -> None:
    from samft.sweep.liveness import REASON_ATTR
    from samft.sweep.sweeper import _job_error, _record

    study = optuna.create_study(direction="maximize")
    pruned, failed, done = study.ask(), study.ask(), study.ask()
    assert _record(study, pruned, _job(JobStatus.FAILED, optuna.TrialPruned()), stop_reason=None) == "pruned"
    assert _record(study, failed, _job(JobStatus.FAILED, RuntimeError("out of memory\ntrace")),
                   stop_reason=None) == "failed"
    assert _record(study, done, _job(JobStatus.COMPLETED, 0.7), stop_reason=None) == "completed"
    assert _job_error(_job(JobStatus.COMPLETED, 0.7)) is None
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["PRUNED", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs[REASON_ATTR] == "out of memory" and trials[2].value == 0.7
    assert "Error executing job" not in capsys.readouterr().err  # Hydra's own line, replaced by the sweep's log


def test_fail_reads_the_trials_state_through_the_public_study_api() -> None:
    from samft.sweep.sweeper import _fail

    study = optuna.create_study(direction="maximize")
    running, finished = study.ask(), study.ask()
    study.tell(finished, 0.5)
    _fail(study, running, "interrupted by Ctrl-C")
    _fail(study, finished, "interrupted by Ctrl-C")  # another worker finished it: left alone
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert study.get_trials()[1].value == 0.5


def test_the_pruning_reporter_finds_its_trial_through_the_public_storage_api(tmp_path: Path) -> None:
    from samft.sweep.pruning import TrialReporter

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    first, second = study.ask(), study.ask()
    reporter = TrialReporter(storage=storage, study_name="s", number=second.number, pruner="none")
    assert reporter(1, {"val/dice": 0.25}) is False and reporter(2, {"val/dice": float("nan")}) is False
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()  # a fresh read, as the sweeper's
    assert trials[first.number].intermediate_values == {} and trials[second.number].intermediate_values == {1: 0.25}


# ---------------------------------------------------------------------------------------------- MONAI, logging
def test_float32_resampling_falls_back_to_monais_stock_without_its_resampler_dtype() -> None:
    from monai.transforms import RandAffine, RandAffined

    from samft.data.transforms import RandAffine32d, resample_in_float32

    without = SimpleNamespace(resampler=SimpleNamespace())
    assert resample_in_float32(without) is False and vars(without.resampler) == {}
    assert resample_in_float32(SimpleNamespace()) is False
    stock = RandAffine(prob=1.0)
    assert resample_in_float32(stock) is True and stock.resampler.dtype == np.float32

    kwargs = {"keys": ["image"], "prob": 1.0, "rotate_range": (0.3, 0.3, 0.3), "mode": "bilinear"}
    ours, theirs = RandAffine32d(**kwargs), RandAffined(**kwargs)
    assert ours.rand_affine.resampler.dtype == np.float32 and theirs.rand_affine.resampler.dtype != np.float32
    image = torch.rand(1, 12, 12, 6)
    ours.set_random_state(3)
    theirs.set_random_state(3)
    torch.testing.assert_close(ours({"image": image})["image"].as_tensor(),
                               theirs({"image": image})["image"].as_tensor().float(), atol=1e-5, rtol=1e-5)


def test_spawned_workers_log_with_the_stock_format_when_a_formatter_hides_its_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samft.distributed import _apply_log_setup, _log_setup

    class Opaque(logging.Formatter):
        """A formatter class that keeps its format elsewhere."""

    plain, opaque = logging.FileHandler(tmp_path / "a.log"), logging.FileHandler(tmp_path / "b.log")
    plain.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    opaque.setFormatter(Opaque("%(name)s %(message)s"))
    del opaque.formatter._fmt
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [plain, opaque])
    setup = _log_setup()
    assert [h["format"] for h in setup["handlers"]] == ["[%(levelname)s] %(message)s", None]
    monkeypatch.setattr(root, "handlers", [])
    _apply_log_setup(setup)
    record = logging.LogRecord("samft", logging.WARNING, __file__, 1, "hello", None, None)
    assert [h.format(record) for h in root.handlers] == ["[WARNING] hello", "hello"]
    for handler in [plain, opaque, *root.handlers]:
        handler.close()
