"""wandb in offline mode (no network): the run file records config, per-epoch metrics and the summary, and a
resumed run continues the same run id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb  # noqa: F401  (a declared dependency: a broken install fails, not skips)
from helpers.standin import make_trainer, settings
from helpers.wandb_records import history_rows, read_records, run_files

from samft.engine import LATEST, WandbLogger, load_checkpoint


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch) -> Path:
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


@pytest.mark.slow
def test_offline_run_records_config_metrics_and_summary_and_resume_keeps_the_id(offline_wandb: Path) -> None:
    run_dir = offline_wandb / "run"
    config = {"seed": 0, "optim": {"lr": 0.1}}

    def logger() -> WandbLogger:
        return WandbLogger(project="samft-test", tags=["ci"], mode="offline", run_dir=run_dir, config=config)

    stop_after_1 = lambda epoch, metrics: epoch == 1  # noqa: E731 - a pruned first run, resumed below
    first_logger = logger()
    make_trainer(run_dir, train_settings=settings(epochs=2), logger=first_logger, epoch_callback=stop_after_1).fit()
    run_id = first_logger.run_id
    assert run_id and load_checkpoint(run_dir / LATEST)["logger_run_id"] == run_id

    (run_file,) = run_files(run_dir, run_id)
    records = read_records(run_file)
    (run,) = [r.run for kind, r in records if kind == "run"]
    assert run.run_id == run_id and list(run.tags) == ["ci"]
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["optim"] == {"lr": 0.1} and logged_config["seed"] == 0
    (epoch_1,) = [row for row in history_rows(records) if row.get("epoch") == 1]
    # names as every tracker gets them (samft.engine.tracker_key): val/dice@1 -> val/dice_at_1
    assert {"train/loss", "val/dice", "val/dice_at_1", "lr"} <= epoch_1.keys() and epoch_1["_step"] == 1
    summary = {}
    for kind, record in records:
        if kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    assert summary["stop_reason"] == "pruned" and summary["metric_name"] == "val/dice"

    second_logger = logger()  # built without an id, as train.py does: the checkpoint supplies it
    make_trainer(run_dir, train_settings=settings(epochs=2), logger=second_logger).fit(resume_from=run_dir / LATEST)
    assert second_logger.run_id == run_id
    files = run_files(run_dir, run_id)
    assert len(files) == 2  # offline mode writes one folder per session, both under the same id
    assert [row["epoch"] for row in history_rows(read_records(files[1])) if "epoch" in row] == [2]
