"""wandb in offline mode (no network): the run file records config, per-epoch metrics and the summary, and a
resumed run continues the same run id."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import wandb  # noqa: F401  (a declared dependency: a broken install fails, not skips)
from helpers.standin import make_trainer, settings

from samft.engine import LATEST, WandbLogger, load_checkpoint


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch) -> Path:
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _records(path: Path, *, timeout_s: float = 30.0) -> list[tuple[str, Any]]:
    """The records of a finished run; wandb's service process may still be flushing the file after finish()."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _decode(path)
        if any(kind == "exit" for kind, _ in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _decode(path: Path) -> list[tuple[str, Any]]:
    """Decode a .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks holding protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append((record.WhichOneof("record_type"), record))
    return out


def _run_file(run_dir: Path, run_id: str) -> list[Path]:
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def _history(records: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind, record in records:
        if kind == "history":
            rows.append(
                {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            )
    return rows


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

    (run_file,) = _run_file(run_dir, run_id)
    records = _records(run_file)
    (run,) = [r.run for kind, r in records if kind == "run"]
    assert run.run_id == run_id and list(run.tags) == ["ci"]
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["optim"] == {"lr": 0.1} and logged_config["seed"] == 0
    (epoch_1,) = [row for row in _history(records) if row.get("epoch") == 1]
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
    files = _run_file(run_dir, run_id)
    assert len(files) == 2  # offline mode writes one folder per session, both under the same id
    assert [row["epoch"] for row in _history(_records(files[1])) if "epoch" in row] == [2]
