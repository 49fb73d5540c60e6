"""What a run reports: each epoch's record to the tracker, the log and the pictures; summary.json at the end."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from samft import distributed
from samft.engine.checkpoint import EpochPosition
from samft.engine.determinism import guarantee
from samft.engine.loggers import RunLogger
from samft.engine.metrics import ValidationResult
from samft.engine.monitor import peak_memory_mb
from samft.engine.plots import plot_curves, save_overlay
from samft.engine.settings import TrainSettings
from samft.engine.stopping import EarlyStopping

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
CURVES = "training_curves.png"


def epoch_record(position: EpochPosition, *, epoch: int, global_step: int, world_size: int) -> dict[str, Any]:
    """The history row of a finished epoch's training: learning rates, mean loss over the samples of the applied
    steps, throughput and memory (summed over ranks; every rank must call this under torch.distributed)."""
    loss_sum, samples, seen = distributed.sum_over_ranks(position.loss_sum, position.samples, position.seen)
    record: dict[str, Any] = {
        "epoch": epoch,
        "lr": position.lrs[0],
        **{f"lr/group{i}": lr for i, lr in enumerate(position.lrs[1:], start=1)},
        "train/loss": loss_sum / samples if samples else None,
        "train/steps": global_step,
        **position.stats,
    }
    if "time/samples_per_s" in position.stats and world_size > 1:
        # the job's rate, the same on every rank: all ranks' samples over the slowest rank's epoch (each time
        # taken after its queued kernels finished, see EpochMeter), not rank 0's own rate
        slowest = max(distributed.all_gather(position.stats["time/epoch_s"]))
        record["time/samples_per_s"] = seen / slowest if slowest > 0 else 0.0
    return record


def publish_epoch(
    record: dict[str, Any],
    result: ValidationResult | None,
    *,
    history: list[dict[str, Any]],
    settings: TrainSettings,
    logger: RunLogger,
    run_dir: Path,
    is_main: bool,
) -> None:
    """An epoch's numbers to the tracker and the log; every `log_freq` epochs (rank 0) the curves of `history` and,
    with `log_images`, the validation example `result.example` (image, label, prediction: D x H x W) as a PNG."""
    epoch = record["epoch"]
    numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
    logger.log_metrics(numbers, step=epoch)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k not in ("epoch", "train/steps"))
    log.info("epoch %d/%d: %s", epoch, settings.epochs, shown)
    if epoch % settings.log_freq or not is_main:
        return
    plot_curves(history, run_dir / CURVES)
    if settings.log_images and result is not None and result.example is not None:
        path = run_dir / "images" / f"val_epoch{epoch:04d}.png"
        path.parent.mkdir(exist_ok=True)
        save_overlay(*result.example, path, title=f"epoch {epoch}, first positive validation case")
        logger.log_images({"val/overlay": path}, step=epoch)


def run_summary(
    *,
    stop_reason: str,
    settings: TrainSettings,
    stopping: EarlyStopping,
    epochs_run: int,
    global_step: int,
    wall_time_s: float,
    device: torch.device,
    events: dict[str, int],
    history: list[dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The contents of summary.json (`extra` first: the caller's provenance), strict JSON (non-finite -> None)."""
    summary = {
        **extra,
        "metric_name": settings.monitor,
        "best_metric": stopping.best,
        "best_epoch": stopping.best_epoch,
        "epochs_run": epochs_run,
        "global_step": global_step,
        "stop_reason": stop_reason,
        "wall_time_s": wall_time_s,
        "peak_memory_mb": peak_memory_mb(device, history),
        "determinism": guarantee(device, settings.precision),
        "events": dict(events),
        "history": history,
    }
    return json_safe(summary)


def write_summary(summary: dict[str, Any], run_dir: Path, *, history: list[dict[str, Any]]) -> None:
    """summary.json written atomically, the final training curves of `history`, and the run's last log line."""
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    os.replace(tmp, run_dir / SUMMARY)
    if history:
        plot_curves(history, run_dir / CURVES)
    log.info(
        "run finished (%s): best %s=%s at epoch %s after %d epochs; events %s",
        summary["stop_reason"],
        summary["metric_name"],
        summary["best_metric"],
        summary["best_epoch"],
        summary["epochs_run"],
        summary["events"],
    )


def json_safe(value: Any) -> Any:
    """Non-finite floats become None so summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
