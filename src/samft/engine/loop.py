"""The training loop: epochs of gradient-accumulation windows, validation, checkpoints, early stopping."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from samft import distributed
from samft.engine.batches import batch_size, plain_tensor, split_batch
from samft.engine.checkpoint import (
    BEST,
    FORMAT,
    LATEST,
    capture_rng,
    copy_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    unwrap,
)
from samft.engine.determinism import VALIDATION_STREAM, derive_seed, guarantee, seed_loader
from samft.engine.faults import EVENT_KINDS, PEER_FAILURE, Failure, free_memory
from samft.engine.interrupts import GracefulInterrupt
from samft.engine.loggers import NoneLogger, RunLogger
from samft.engine.losses import SegmentationLoss
from samft.engine.metrics import CaseScores, ValidationResult, validate_crops
from samft.engine.monitor import EpochMeter, Progress, peak_memory_mb
from samft.engine.optim import Schedule
from samft.engine.plots import plot_curves, save_overlay
from samft.engine.precision import autocast, grad_scaler
from samft.engine.settings import TrainSettings
from samft.engine.stopping import EarlyStopping
from samft.engine.validation import ScanValidation
from samft.errors import UserError

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
CURVES = "training_curves.png"
EpochCallback = Callable[[int, dict[str, float]], bool]


@dataclass
class EpochPosition:
    """Where the current epoch stands; saved in a checkpoint written mid-epoch so a resume replays it exactly."""

    lrs: list[float]
    rng_at_start: dict[str, Any]
    batches_done: int = 0
    windows_done: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    seen: int = 0
    stats: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Fits a model exposing `segment(image, *, target, num_clicks, generator, prompt_free) -> SegmentOutput`.

    Writes `latest_model.pth` (every epoch), `best_model.pth` (on improvement of `settings.monitor`),
    `summary.json` and `training_curves.png` into `run_dir`. A DDP-wrapped model is called through the wrapper
    (its `forward` must be `segment`) and synchronises gradients only on the last micro-step of a window.
    `epoch_callback(epoch, val_metrics)` runs after each validation and checkpoint; True stops the run
    ("pruned"). With `scan_validation` the monitored `val/dice` is whole-scan Dice (the path of `samft.predict`)
    and the metrics of `val_loader`'s crops are renamed `val/crop_*`; without it they are the validation.

    Ctrl-C: the first one finishes the running optimiser step and saves `latest_model.pth` with the position in
    the epoch (a resume replays the epoch's data order and continues exactly); a second one aborts at once and
    keeps the last epoch's checkpoint. The click generator lives on `settings.device`, seeded with
    `settings.seed`; validation clicks come from a generator seeded per validation batch (run seed, batch
    number), so they are the same every epoch and for any number of processes.

    Under torch.distributed (process group up, model wrapped in DDP, train loader sharded) every rank runs
    this loop in step: rank 0 alone writes checkpoints, summary, pictures, the tracker and the log, and runs
    `epoch_callback` (its answer is broadcast); each rank validates every world_size-th batch of `val_loader`
    and the per-case scores are gathered before averaging; a Ctrl-C on any rank and a failed micro-step on any
    rank stop or skip on all of them (no halving of batches: `oom_policy=halve` acts as skip); a checkpoint holds
    every rank's random state and place in the epoch, so all ranks resume from the one file exactly.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        train_loader: DataLoader,
        val_loader: DataLoader,
        settings: TrainSettings,
        run_dir: Path,
        logger: RunLogger | None = None,
        resolved_config: Mapping[str, Any] | None = None,
        extra_summary: Mapping[str, Any] | None = None,
        epoch_callback: EpochCallback | None = None,
        scan_validation: ScanValidation | None = None,
    ) -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.schedule = schedule
        self.train_loader = train_loader
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.val_loader = distributed.shard_batches(val_loader) if self.world_size > 1 else val_loader
        self.run_dir = Path(run_dir)
        self.logger = (logger or NoneLogger()) if self.is_main else NoneLogger()
        self.config = _plain_data(resolved_config or {}, "resolved_config")
        self.extra_summary = dict(extra_summary or {})
        self.epoch_callback = epoch_callback
        self.scan_validation = scan_validation
        self.loss_fn = SegmentationLoss(
            ich_weight=settings.ich_loss_weight, lesion_pos_weight=settings.lesion_pos_weight,
            batch_dice=settings.batch_dice,
        ).to(self.device)
        self.autocast = partial(autocast, settings.precision, self.device)
        self.scaler = grad_scaler(settings.precision, self.device)
        self.clicks = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.stopping = EarlyStopping(patience=settings.patience, min_delta=settings.min_delta)
        self.history: list[dict[str, Any]] = []
        self.events = dict.fromkeys(EVENT_KINDS, 0)
        self.epoch = 0
        self.global_step = 0
        self.consecutive_failures = 0
        self.progress_in_epoch: EpochPosition | None = None
        self._resume: tuple[EpochPosition | None, dict[str, Any]] | None = None
        self._logger_run_id: str | None = None
        self._elapsed_before = 0.0
        self._started = time.monotonic()

    # ---------------------------------------------------------------- run
    def fit(self, *, resume_from: Path | None = None) -> dict[str, Any]:
        """Train until `settings.epochs`, early stopping, pruning, Ctrl-C or too many failed steps.

        Returns the summary (also written to run_dir/summary.json). The logger is started here and closed here,
        also when this raises: its one owner for the run (the caller builds it and does not close it).
        """
        self._started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self._restore(Path(resume_from))
        try:
            self.logger.start(run_id=self._logger_run_id)
            stop_reason = self._run_interruptible()
            summary = self._write_summary(stop_reason)
            self.logger.log_summary(summary)
        finally:
            self.logger.close()
        return summary

    def _run_interruptible(self) -> str:
        enabled = self.settings.progress and self.is_main
        progress = Progress(epochs=self.settings.epochs, done=self.epoch, enabled=enabled)
        try:
            with GracefulInterrupt() as interrupt:
                return self._run(interrupt, progress)
        except KeyboardInterrupt:
            kept = f"{LATEST} keeps the state after epoch {self.epoch}" if self.epoch else "no checkpoint yet"
            log.warning("aborted by a second Ctrl-C: %s", kept)
            return "interrupted"
        finally:
            progress.close()

    def _run(self, interrupt: GracefulInterrupt, progress: Progress) -> str:
        while self.epoch < self.settings.epochs:
            if self._interrupted(interrupt):
                return "interrupted"
            if self.stopping.should_stop:  # resumed from a run that had already stopped early
                return "early_stopping"
            if self.settings.stop_after_epoch is not None and self.epoch >= self.settings.stop_after_epoch:
                log.info("stopped after epoch %d (stop_after_epoch); resume=auto continues the run", self.epoch)
                return "stopped_after_epoch"
            epoch = self.epoch + 1
            stopped = self._train_epoch(epoch, interrupt, progress)
            if stopped is not None:
                self._save()
                log.warning(
                    "stopped in epoch %d (%s); %s holds the state after %d optimiser steps",
                    epoch,
                    stopped,
                    LATEST,
                    self.global_step,
                )
                return stopped
            stopped = self._end_epoch(epoch, progress)
            if stopped is not None:
                return stopped
        return "completed"

    # ---------------------------------------------------------------- one epoch of training
    def _train_epoch(self, epoch: int, interrupt: GracefulInterrupt, progress: Progress) -> str | None:
        """Optimiser updates over the epoch's windows; returns a stop reason when the epoch cannot finish."""
        # RNG states are restored here, not when the checkpoint is read, so nothing in between (e.g. the
        # logger's start) can shift the random stream of the resumed run.
        position, rng_now = self._resume or (None, None)
        self._resume = None
        if rng_now is not None:
            restore_rng(position.rng_at_start if position else rng_now, self.clicks)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        state = position or EpochPosition(lrs, capture_rng(self.clicks))
        self.progress_in_epoch = state
        if not seed_loader(self.train_loader, seed=self.settings.seed, epoch=epoch) and epoch == 1:
            log.info("train loader has no torch.Generator: its order follows the global torch RNG")
        self.model.train()
        batches = iter(self.train_loader)
        if position is not None:
            log.info("resuming epoch %d after %d batches: replaying their loading", epoch, state.batches_done)
            for _ in islice(batches, state.batches_done):
                pass
            restore_rng(rng_now, self.clicks)
        k, limit = self.settings.grad_accum_steps, self.settings.max_steps_per_epoch or math.inf
        meter = EpochMeter(self.device)
        meter.start()
        progress.start_epoch(epoch, min(len(self.train_loader), limit * k), done=state.batches_done)
        stop = self._interrupted(interrupt)
        while state.windows_done < limit and not stop:
            window = list(islice(batches, k))
            if not window:
                break
            loss = self._train_window(window)
            size = sum(batch_size(b) for b in window)
            state.batches_done += len(window)
            state.windows_done += 1
            state.seen += size
            if loss is None:
                self.events["skipped_steps"] += 1
                self.consecutive_failures += 1
                if self.consecutive_failures >= self.settings.max_consecutive_failures:
                    log.error(
                        "%d consecutive optimiser steps failed (events so far: %s); stopping. Lower optim.lr, "
                        "use hardware.precision=fp32/bf16 or a smaller data.batch_size",
                        self.consecutive_failures,
                        self.events,
                    )
                    return "too_many_failures"
            else:
                self.consecutive_failures = 0
                self.global_step += 1
                state.loss_sum += loss * size
                state.samples += size
            progress.advance(len(window), loss=f"{loss:.4f}" if loss is not None else "skipped")
            stop = self._interrupted(interrupt)
        if stop and state.windows_done < limit and state.batches_done < len(self.train_loader):
            return "interrupted"
        state.stats = meter.stop(state.seen)
        return None

    def _interrupted(self, interrupt: GracefulInterrupt) -> bool:
        """Whether a Ctrl-C reached any rank (all ranks call this at the same points and agree)."""
        return distributed.any_rank(interrupt.requested) if self.world_size > 1 else interrupt.requested

    def _train_window(self, window: list[dict[str, Any]]) -> float | None:
        """One optimiser update from the micro-batches of an accumulation window; None if the window failed.

        Each micro-batch loss (a mean over its samples) is weighted by its share of the window's samples, so the
        update equals one over the whole window as a single batch, also for unequal or split micro-batches.

        The window's loss stays on the device until its end: reading it (a host sync that stalls a GPU's queue) once
        per optimiser step, where the progress bar and the epoch's loss need it, decides a non-finite window too.
        """
        total = sum(batch_size(b) for b in window)
        pending = [(batch, batch_size(batch) / total) for batch in window]
        # float64, summed in order: the same number as a sum of Python floats
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        while pending:
            batch, weight = pending.pop(0)
            result = self._micro_step(batch, weight, sync=not pending)
            if isinstance(result, Failure):
                free_memory(self.device)
                if isinstance(self.model, DistributedDataParallel):
                    # A forward that raised left DDP's "broadcast buffers before the next forward" flag as the
                    # previous forward set it, on the failing rank only: unless all agree, that rank's broadcast
                    # meets the others' all-reduce (a hang on NCCL). True is what a completed window leaves.
                    self.model.require_forward_param_sync = True
                if result.kind != PEER_FAILURE:
                    self.events[result.kind] += 1
                if result.splittable and self.settings.oom_policy == "halve" and batch_size(batch) > 1:
                    halves = split_batch(batch)
                    pending[:0] = [(half, weight * batch_size(half) / batch_size(batch)) for half in halves]
                    self.events["oom_split"] += 1
                    log.warning(
                        "step %d: out of memory on %d samples; retrying as two halves",
                        self.global_step,
                        batch_size(batch),
                    )
                    continue
                log.warning("step %d: %s; skipping this optimiser step", self.global_step, result.kind)
                self.optimizer.zero_grad(set_to_none=True)
                return None
            window_loss += result.double()
        loss = window_loss.item()
        if not math.isfinite(loss):  # one process: its backward ran on the non-finite loss; nothing is applied
            self.events["nonfinite_loss"] += 1
            log.warning("step %d: nonfinite_loss; skipping this optimiser step", self.global_step)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.unscale_(self.optimizer)
        if self.settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:
            self.events["fp16_overflow"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule.interval == "step":
            self.schedule.scheduler.step()
        return loss

    def _micro_step(self, batch: dict[str, Any], weight: float, *, sync: bool) -> torch.Tensor | Failure:
        """Forward and backward of one micro-batch; returns its weighted loss (a detached scalar on the device) or
        what went wrong. One process checks the loss for NaN/Inf once per window (`_train_window`), not here.

        With several ranks, all agree before each backward whether every forward succeeded, so a failure on one
        rank skips the window on all (none is left waiting in the gradient all-reduce of the last micro-step).
        A failed backward is announced at the others' next agreement; one in the synchronising backward cannot be
        taken back and ends the run.
        """
        image = plain_tensor(batch["image"]).to(self.device, non_blocking=True)
        label = plain_tensor(batch["label"]).to(self.device, non_blocking=True)
        ich = plain_tensor(batch["ich"]).to(self.device, non_blocking=True)
        no_sync = (
            self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not sync else nullcontext()
        )
        with no_sync:
            failure = None
            try:
                with self.autocast():
                    output = _segment(
                        self.model, image, target=label, num_clicks=self.settings.train_rounds, generator=self.clicks,
                        prompt_free=self.settings.prompt_free,
                    )
                    loss = self.loss_fn(output, label, ich) * weight
            except torch.OutOfMemoryError:
                failure = Failure("oom", splittable=self.world_size == 1)
            else:
                # several ranks agree below before each backward (a host sync anyway), so a non-finite loss is
                # caught here and never all-reduced
                if self.world_size > 1 and not math.isfinite(loss.item()):
                    failure = Failure("nonfinite_loss")
            if self.world_size > 1 and distributed.any_rank(failure is not None) and failure is None:
                failure = Failure(PEER_FAILURE)
            if failure is not None:
                return failure
            try:
                self.scaler.scale(loss).backward()
            except torch.OutOfMemoryError:
                if self.world_size > 1:
                    if sync:
                        raise
                    distributed.any_rank(True)
                return Failure("oom")
        return loss.detach()

    # ---------------------------------------------------------------- end of an epoch
    def _end_epoch(self, epoch: int, progress: Progress) -> str | None:
        """Validate, step the schedule, track the best, checkpoint, publish; returns a stop reason if any."""
        state = self.progress_in_epoch
        loss_sum, samples, seen = distributed.sum_over_ranks(state.loss_sum, state.samples, state.seen)
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": state.lrs[0],
            **{f"lr/group{i}": lr for i, lr in enumerate(state.lrs[1:], start=1)},
            "train/loss": loss_sum / samples if samples else None,
            "train/steps": self.global_step,
            **state.stats,
        }
        if "time/samples_per_s" in state.stats and self.world_size > 1:
            # the job's rate, the same on every rank: all ranks' samples over the slowest rank's epoch (each time
            # taken after its queued kernels finished, see EpochMeter), not rank 0's own rate
            slowest = max(distributed.all_gather(state.stats["time/epoch_s"]))
            record["time/samples_per_s"] = seen / slowest if slowest > 0 else 0.0
        result = None
        improved = False
        if epoch % self.settings.val_every == 0 or epoch == self.settings.epochs:
            result = self._validate()
            record.update(result.metrics)
            if self.settings.monitor not in result.metrics:
                raise UserError(
                    f"validation produced no '{self.settings.monitor}' (got {', '.join(result.metrics)}); "
                    "the validation set needs at least one case with a hemorrhage mask"
                )
            value = result.metrics[self.settings.monitor]
            improved = self.stopping.update(value, epoch=epoch)
            if self.schedule.interval == "metric":
                self.schedule.scheduler.step(value)
        if self.schedule.interval == "epoch":
            self.schedule.scheduler.step()
        self.history.append(record)
        self.epoch = epoch
        self.progress_in_epoch = None
        rng = self._save(best=improved)
        self._publish(record, result)
        shown = ("train/loss", self.settings.monitor)
        progress.end_epoch(**{k: f"{record[k]:.4f}" for k in shown if record.get(k) is not None})
        stop = None
        pruned = False
        if result is not None:
            if self.is_main and self.epoch_callback is not None:
                pruned = bool(self.epoch_callback(epoch, dict(result.metrics)))
            pruned = distributed.broadcast(pruned)
        if pruned:
            log.info("epoch %d: stopped by the epoch callback (pruned)", epoch)
            stop = "pruned"
        elif self.stopping.should_stop:
            log.info(
                "early stopping: %s did not improve by more than %g for %d validations (best %.4f at epoch %d)",
                self.settings.monitor,
                self.settings.min_delta,
                self.stopping.bad_validations,
                self.stopping.best,
                self.stopping.best_epoch,
            )
            stop = "early_stopping"
        # The next epoch starts from the RNG state in the checkpoint, whatever the logger or callback drew.
        restore_rng(rng, self.clicks)
        return stop

    def _validate(self) -> ValidationResult:
        # Clicks seeded per batch (independent of training randomness): the same every epoch, and the same for a
        # batch whichever rank validates it (rank r takes the batches r, r + world_size, ...).
        def batch_seed(index: int) -> int:
            return derive_seed(self.settings.seed, VALIDATION_STREAM, self.rank + index * self.world_size)

        crops = validate_crops(
            unwrap(self.model),
            self.val_loader,
            rounds=self.settings.val_rounds,
            val_clicks=self.settings.val_clicks,
            prompt_mode=self.settings.prompt_mode,
            device=self.device,
            autocast=self.autocast,
            generator=torch.Generator(device=self.device),
            batch_seed=batch_seed,
            gather=_gather_over_ranks if self.world_size > 1 else None,
            default_spacing=self.settings.spacing,
        )
        if self.scan_validation is None:
            return crops
        # whole scans decide (val/dice); the lesion-centred crops stay as a cheap extra (val/crop_*)
        metrics = {key.replace("val/", "val/crop_", 1): value for key, value in crops.metrics.items()}
        rows = self.scan_validation.case_rows(unwrap(self.model), device=self.device, autocast=self.autocast,
                                              rank=self.rank, world_size=self.world_size)
        if self.world_size > 1:
            rows = [row for part in distributed.all_gather(rows) for row in part]
        metrics.update(self.scan_validation.metrics(rows))
        return ValidationResult(metrics, crops.example)

    def _publish(self, record: dict[str, Any], result: ValidationResult | None) -> None:
        epoch = record["epoch"]
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
        self.logger.log_metrics(numbers, step=epoch)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k not in ("epoch", "train/steps"))
        log.info("epoch %d/%d: %s", epoch, self.settings.epochs, shown)
        if epoch % self.settings.log_freq or not self.is_main:
            return
        plot_curves(self.history, self.run_dir / CURVES)
        if self.settings.log_images and result is not None and result.example is not None:
            path = self.run_dir / "images" / f"val_epoch{epoch:04d}.png"
            path.parent.mkdir(exist_ok=True)
            save_overlay(*result.example, path, title=f"epoch {epoch}, first positive validation case")
            self.logger.log_images({"val/overlay": path}, step=epoch)

    # ---------------------------------------------------------------- state
    def _save(self, *, best: bool = False) -> dict[str, Any]:
        """latest_model.pth now (mid-epoch when `progress_in_epoch` is set); best_model.pth as a copy if `best`.

        Returns the RNG states written into the checkpoint (rank 0 alone writes; the file holds every rank's)."""
        position = asdict(self.progress_in_epoch) if self.progress_in_epoch is not None else None
        rng = capture_rng(self.clicks)
        ranks = distributed.all_gather({"rng": rng, "position": position}) if self.world_size > 1 else None
        if not self.is_main:
            return rng
        state = {
            "format": FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "position": position,
            "ranks": ranks,
            "metric_name": self.settings.monitor,
            "best_metric": self.stopping.best,
            "best_epoch": self.stopping.best_epoch,
            "early_stopping": self.stopping.state_dict(),
            "history": self.history,
            "events": dict(self.events),
            "rng": rng,
            "logger_run_id": self.logger.run_id,
            "config": self.config,
            "elapsed_s": self._elapsed(),
        }
        latest = self.run_dir / LATEST
        save_checkpoint(state, latest)
        if best:
            copy_checkpoint(latest, self.run_dir / BEST)
        return rng

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        model = unwrap(self.model)
        try:
            keys = model.load_state_dict(state["model"], strict=False)
        except RuntimeError as err:
            raise UserError(f"checkpoint {path} does not fit the model: {str(err).splitlines()[1].strip()}") from None
        if keys.missing_keys or keys.unexpected_keys:
            raise UserError(
                f"checkpoint {path} does not fit the model: missing keys {keys.missing_keys[:3]}, "
                f"unexpected keys {keys.unexpected_keys[:3]}; it was saved with another model config"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise UserError(f"checkpoint {path}: optimiser state does not fit ({err})") from None
        self.schedule.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.stopping.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.events.update(state["events"])
        self._logger_run_id = state["logger_run_id"]
        self._elapsed_before = state["elapsed_s"]
        position, rng = self._own_place(state, path)
        self._resume = (EpochPosition(**position) if position is not None else None, rng)
        log.info(
            "resumed from %s: epoch %d done, %d optimiser steps, best %s=%s",
            path,
            self.epoch,
            self.global_step,
            self.settings.monitor,
            self.stopping.best,
        )

    def _own_place(self, state: dict[str, Any], path: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """This rank's place in the epoch and random state from a checkpoint (rank 0's in a one-process file)."""
        ranks = state.get("ranks")
        saved_by = len(ranks) if ranks else 1
        if saved_by == self.world_size:
            own = ranks[self.rank] if ranks else state
            return own["position"], own["rng"]
        if state["position"] is not None:
            raise UserError(
                f"checkpoint {path} was saved mid-epoch by {saved_by} processes and this run has {self.world_size}; "
                f"resume with hardware.nproc_per_node={saved_by} (or as many torchrun ranks)"
            )
        log.warning(
            "checkpoint %s was written by %d processes, this run has %d: training continues from its weights, but "
            "the data order and clicks differ from an uninterrupted run", path, saved_by, self.world_size,
        )
        return None, state["rng"]

    def _elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def _write_summary(self, stop_reason: str) -> dict[str, Any]:
        summary = {
            **self.extra_summary,
            "metric_name": self.settings.monitor,
            "best_metric": self.stopping.best,
            "best_epoch": self.stopping.best_epoch,
            "epochs_run": self.epoch,
            "global_step": self.global_step,
            "stop_reason": stop_reason,
            "wall_time_s": self._elapsed(),
            "peak_memory_mb": peak_memory_mb(self.device, self.history),
            "determinism": guarantee(self.device, self.settings.precision),
            "events": dict(self.events),
            "history": self.history,
        }
        summary = _json_safe(summary)
        if not self.is_main:
            return summary
        tmp = self.run_dir / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
        os.replace(tmp, self.run_dir / SUMMARY)
        if self.history:
            plot_curves(self.history, self.run_dir / CURVES)
        log.info(
            "run finished (%s): best %s=%s at epoch %s after %d epochs; events %s",
            stop_reason,
            self.settings.monitor,
            summary["best_metric"],
            summary["best_epoch"],
            self.epoch,
            self.events,
        )
        return summary


def _segment(model: torch.nn.Module, image: torch.Tensor, **kwargs: Any) -> Any:
    """Call `segment`, through a DDP wrapper when there is one: its forward hooks schedule the gradient
    all-reduce, so going around the wrapper (as the official SAM-Med3D code does) never synchronises."""
    if isinstance(model, DistributedDataParallel):
        return model(image, **kwargs)
    return model.segment(image, **kwargs)


def _gather_over_ranks(scores: CaseScores) -> CaseScores:
    return CaseScores.merge(distributed.all_gather(scores))


def _plain_data(value: Mapping[str, Any], name: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be plain data (OmegaConf.to_container(cfg, resolve=True)): {err}") from None


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None so summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
