"""Experiment trackers read back through their own libraries: TensorBoard's EventAccumulator, MlflowClient and
pandas. Runs go through the real Trainer on the stand-in model; a resumed run continues the same tracker run and
never logs an epoch twice; metric names are mapped by `tracker_key` in every tracker; no URL password is logged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers.patience import patience
from helpers.standin import make_trainer, settings
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from samft.builders import build_logger
from samft.config import refuse_list_selection, validate
from samft.engine import (
    LATEST,
    CSVLogger,
    MLflowLogger,
    MultiLogger,
    TensorBoardLogger,
    load_checkpoint,
    tracker_key,
)
from samft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2"
CONFIG = {
    "seed": 0,
    "optim": {"lr": 0.1, "betas": [0.9, 0.999]},
    "trial": {"storage": f"postgresql://samft:{SECRET}@db.hospital.local/optuna", "number": None},
}


def two_sessions(run_dir: Path, make_logger, **first_settings: Any) -> tuple[dict, dict]:
    """Epoch 1 in a first fit (stop_after_epoch), epoch 2 in a resumed fit, each with a freshly built logger (as
    train.py builds it, without an id: the checkpoint supplies it). Returns both summaries."""
    first = make_trainer(run_dir, train_settings=settings(epochs=2, stop_after_epoch=1, **first_settings),
                         logger=make_logger()).fit()
    second = make_trainer(run_dir, train_settings=settings(epochs=2, **first_settings),
                          logger=make_logger()).fit(resume_from=run_dir / LATEST)
    return first, second


def fit_keeping_epoch_1(run_dir: Path, make_logger) -> dict:
    """A full 2-epoch fit that also keeps the checkpoint after epoch 1, then a resume from that copy, which logs
    epoch 2 a second time (as after a crash between logging an epoch and the next checkpoint)."""
    kept = run_dir.parent / "after_epoch_1.pth"

    def keep(epoch: int, metrics: dict) -> bool:
        if epoch == 1:
            shutil.copy(run_dir / LATEST, kept)
        return False

    make_trainer(run_dir, train_settings=settings(epochs=2), logger=make_logger(), epoch_callback=keep).fit()
    return make_trainer(run_dir, train_settings=settings(epochs=2), logger=make_logger()).fit(resume_from=kept)


def history_column(summary: dict, key: str) -> list[float]:
    return [row[key] for row in summary["history"]]


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name,expected",
    [
        ("val/dice@1", "val/dice_at_1"),
        ("val/dice_auto", "val/dice_auto"),
        ("lr/group1", "lr/group1"),
        ("time/samples_per_s", "time/samples_per_s"),
        ("a:b c", "a_b c"),
        ("/x//y/", "x/y"),
        ("x/../y", "x/y"),
        ("ü@2", "__at_2"),
    ],
)
def test_tracker_key_maps_refused_characters_and_keeps_the_rest(name: str, expected: str) -> None:
    assert tracker_key(name) == expected


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_one_row_per_epoch_read_by_pandas_and_resume_appends(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first, second = two_sessions(run_dir, lambda: CSVLogger(path=run_dir / "metrics.csv"))
    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["epoch"].tolist() == [1, 2]
    assert {"train/loss", "val/dice", "val/dice_at_1", "val/dice_at_2", "lr"} <= set(table.columns)
    assert not any("@" in column for column in table.columns)
    assert table["val/dice_at_1"].tolist() == pytest.approx(history_column(second, "val/dice@1"))
    assert table["train/loss"].tolist() == pytest.approx(history_column(second, "train/loss"))
    assert table["train/steps"].tolist() == history_column(second, "train/steps")


def test_csv_relogged_epoch_replaces_its_row(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = fit_keeping_epoch_1(run_dir, lambda: CSVLogger(path=run_dir / "metrics.csv"))
    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["epoch"].tolist() == [1, 2]
    assert table["train/loss"].tolist() == pytest.approx(history_column(summary, "train/loss"))


def test_csv_new_run_in_the_same_folder_starts_a_new_table(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    old = CSVLogger(path=path)
    old.start()
    for epoch in (1, 2, 3):
        old.log_metrics({"train/loss": 9.0, "val/dice@1": 0.1}, step=epoch)
    new = CSVLogger(path=path)
    new.start()
    new.log_metrics({"train/loss": 1.0, "lr": 0.5}, step=1)  # a column the old table lacked
    table = pd.read_csv(path)
    assert table["epoch"].tolist() == [1] and table["train/loss"].tolist() == [1.0]
    assert table["lr"].tolist() == [0.5] and "val/dice_at_1" not in table.columns


# ---------------------------------------------------------------------------------------------- TensorBoard
def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _text(accumulator, tag: str) -> list[str]:
    return [event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(f"{tag}/text_summary")]


def test_tensorboard_scalars_config_and_summary_read_by_event_accumulator(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first, second = two_sessions(run_dir, lambda: TensorBoardLogger(log_dir=run_dir / "tensorboard", config=CONFIG))
    events = _events(run_dir / "tensorboard")
    assert {"train/loss", "val/dice", "val/dice_at_1", "lr"} <= set(events.Tags()["scalars"])
    assert not any("@" in tag for tag in events.Tags()["scalars"])
    dice = events.Scalars("val/dice_at_1")
    assert [e.step for e in dice] == [1, 2]
    assert [e.value for e in dice] == pytest.approx(history_column(second, "val/dice@1"))
    (config,) = _text(events, "config")
    assert '"lr": 0.1' in config and "samft:***@db.hospital.local" in config and SECRET not in config
    summaries = _text(events, "summary")
    assert len(summaries) == 2 and '"stop_reason": "completed"' in summaries[-1]


def test_tensorboard_relogged_epoch_is_purged_not_duplicated(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = fit_keeping_epoch_1(run_dir, lambda: TensorBoardLogger(log_dir=run_dir / "tensorboard"))
    losses = _events(run_dir / "tensorboard").Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx(history_column(summary, "train/loss"))


# ---------------------------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """One sqlite store for this module's MLflow tests (creating its tables takes seconds); each test uses its
    own experiment."""
    from mlflow.tracking import MlflowClient

    store = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").search_experiments()
    return store


@pytest.fixture
def mlflow_uri(mlflow_store: Path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return f"sqlite:///{mlflow_store / 'mlflow.db'}"


def _mlflow_logger(uri: str, run_dir: Path, experiment: str) -> MLflowLogger:
    return MLflowLogger(tracking_uri=uri, experiment=experiment, run_dir=run_dir, config=CONFIG,
                        artifacts=("training_curves.png",), tags=["ci"])


def test_mlflow_params_metrics_artifacts_and_resume_into_the_same_run(
    tmp_path: Path, mlflow_store: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    first, second = two_sessions(run_dir, lambda: _mlflow_logger(mlflow_uri, run_dir, "resume"))
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("resume")
    (run,) = client.search_runs([experiment.experiment_id])
    assert load_checkpoint(run_dir / LATEST)["logger_run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run" and run.data.tags["ci"] == "true"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["optim.betas"] == "[0.9, 0.999]"
    assert run.data.params["trial.storage"] == "postgresql://samft:***@db.hospital.local/optuna"
    dice = client.get_metric_history(run.info.run_id, "val/dice_at_1")
    assert sorted(m.step for m in dice) == [1, 2]  # epoch 1 from the first fit, epoch 2 from the resumed one
    assert [m.value for m in sorted(dice, key=lambda m: m.step)] == pytest.approx(history_column(second, "val/dice@1"))
    assert run.data.metrics["best_metric"] == pytest.approx(second["best_metric"])
    assert run.data.tags["samft.stop_reason"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "training_curves.png"} <= artifacts
    summary_file = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert json.loads(summary_file.read_text())["epochs_run"] == 2
    # artifacts beside the database, never in the working directory
    assert Path(experiment.artifact_location.removeprefix("file://")) == mlflow_store / "mlartifacts"


def test_mlflow_run_missing_from_the_store_starts_a_new_run(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    logger = _mlflow_logger(mlflow_uri, tmp_path / "run", "missing")
    logger.start(run_id="0123456789abcdef0123456789abcdef")
    logger.log_metrics({"val/dice@1": 0.5}, step=1)
    logger.close()
    assert logger.run_id != "0123456789abcdef0123456789abcdef"
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(logger.run_id)
    assert run.data.metrics == {"val/dice_at_1": 0.5} and run.info.status == "FAILED"  # ended without a summary


def test_mlflow_folder_store(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store = tmp_path / "mlruns"
    logger = MLflowLogger(tracking_uri=str(store), experiment="samft", run_dir=tmp_path / "run", config=CONFIG)
    logger.start()
    logger.log_metrics({"train/loss": 2.0}, step=1)
    logger.close()
    assert MlflowClient(tracking_uri=str(store)).get_run(logger.run_id).data.metrics == {"train/loss": 2.0}


# ---------------------------------------------------------------------------------------------- several at once
def compose_logger(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"output_dir={output_dir}"])
    return validate(cfg)


def test_many_builds_every_tracker_and_resumes_each(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    typed = compose_logger(["logger=many", "logger.loggers=[csv,tensorboard,mlflow]", "logger.project=many",
                            f"logger.tracking_uri={mlflow_uri}"], tmp_path)
    run_dir = tmp_path / "run"
    config = {**CONFIG, **OmegaConf.to_container(typed, resolve=True)}

    def make_logger() -> MultiLogger:
        logger = build_logger(typed.logger, run_dir=run_dir, config=config)
        assert isinstance(logger, MultiLogger)
        return logger

    first, second = two_sessions(run_dir, make_logger, log_images=True, log_freq=1)
    saved = json.loads(load_checkpoint(run_dir / LATEST)["logger_run_id"])
    assert set(saved) == {"mlflow"}
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("many").experiment_id])
    assert run.info.run_id == saved["mlflow"]
    mlflow_keys = set(run.data.metrics) - {"best_metric"}
    csv_keys = set(pd.read_csv(run_dir / "metrics.csv").columns)
    events = _events(run_dir / "tensorboard")
    assert mlflow_keys == set(events.Tags()["scalars"]) == csv_keys  # one name per metric in every tracker
    assert "val/dice_at_1" in csv_keys
    assert [e.step for e in events.Images("val/overlay")] == [1, 2]
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert images == {"images/val_epoch0001.png", "images/val_epoch0002.png"}


def test_default_mlflow_store_is_in_output_dir(tmp_path: Path) -> None:
    typed = compose_logger(["logger=mlflow"], tmp_path)
    logger = build_logger(typed.logger, run_dir=tmp_path / "train" / "r1",
                          config=OmegaConf.to_container(typed, resolve=True))
    assert isinstance(logger, MLflowLogger)
    assert logger.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}" and logger.run_name == "r1"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["logger=many", "logger.loggers=[csv,bogus]"], "logger.loggers"),
        (["logger=many", "logger.loggers=[]"], "logger.loggers"),
        (["logger=many", "logger.loggers=[csv,csv]"], "logger.loggers"),
        (["logger=csv", "+logger.loggers=[mlflow]"], "only with logger=many"),
    ],
)
def test_bad_logger_settings_fail_with_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message) as info:
        compose_logger(overrides, tmp_path)
    assert "\n" not in str(info.value)


def test_hydra_list_selection_is_refused_with_the_fix() -> None:
    with pytest.raises(UserError, match=r"logger=many logger.loggers=\[csv,mlflow\]"):
        refuse_list_selection(["optim.lr=1e-3", "logger=[csv, mlflow]"])
    with pytest.raises(UserError, match="config group 'model' takes one option"):
        refuse_list_selection(["model=[unet,sam_med3d_tiny]"])
    refuse_list_selection(["logger=csv", "model.val_clicks=[1,3]", "data.spacing=[1,1,1]"])


def test_entry_point_refuses_list_selection_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "samft.train", "logger=[csv,mlflow]", f"output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=patience(120),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "logger=many logger.loggers=[csv,mlflow]" in result.stderr


@pytest.mark.slow
def test_smoke_run_with_csv_tensorboard_and_mlflow(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "samft.train", "experiment=smoke", "max_steps_per_epoch=1", "val_scans=1",
         "logger=many", "logger.loggers=[csv,tensorboard,mlflow]", f"output_dir={tmp_path}",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=patience(600),
        # its own demo data (XDG_CACHE_HOME), not the user's cache that another worker's run may be writing
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
             "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any((tmp_path / "cache" / "samft").glob("demo-*"))
    from mlflow.tracking import MlflowClient

    summary = json.loads((run_dir / "summary.json").read_text())
    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["epoch"].tolist() == list(range(1, summary["epochs_run"] + 1))
    assert _events(run_dir / "tensorboard").Scalars("train/loss")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("samft").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["output_dir"] == str(tmp_path)
    assert {"summary.json", "training_curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
