"""The training loop: epochs of gradient-accumulation windows, validation, checkpoints, early stopping.

The parts live beside it: one optimiser update and its failure handling in `step`, the checkpoint's files and the
place in an epoch in `checkpoint`, what a run reports (tracker, log, pictures, summary.json) in `summary`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from samft import distributed
from samft.engine.batches import batch_size
from samft.engine.checkpoint import (
    BEST,
    FORMAT,
    LATEST,
    EpochPosition,
    capture_rng,
    copy_checkpoint,
    load_checkpoint,
    load_model_state,
    own_place,
    plain_data,
    restore_rng,
    save_checkpoint,
    unwrap,
)
from samft.engine.determinism import VALIDATION_STREAM, derive_seed, seed_loader
from samft.engine.faults import EVENT_KINDS
from samft.engine.interrupts import GracefulInterrupt
from samft.engine.loggers import NoneLogger, RunLogger
from samft.engine.losses import SegmentationLoss
from samft.engine.metrics import CaseScores, ValidationResult, validate_crops
from samft.engine.monitor import EpochMeter, Progress
from samft.engine.optim import Schedule
from samft.engine.precision import autocast, grad_scaler
from samft.engine.settings import TrainSettings
from samft.engine.step import OptimiserStep
from samft.engine.stopping import EarlyStopping
from samft.engine.summary import CURVES, SUMMARY, epoch_record, publish_epoch, run_summary, write_summary
from samft.engine.validation import ScanValidation
from samft.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["CURVES", "SUMMARY", "EpochCallback", "EpochPosition", "Trainer"]

EpochCallback = Callable[[int, dict[str, float]], bool]


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
        self.config = plain_data(resolved_config or {}, "resolved_config")
        self.extra_summary = dict(extra_summary or {})
        self.epoch_callback = epoch_callback
        self.scan_validation = scan_validation
        self.autocast = partial(autocast, settings.precision, self.device)
        self.clicks = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.stopping = EarlyStopping(patience=settings.patience, min_delta=settings.min_delta)
        self.history: list[dict[str, Any]] = []
        self.best_cases: list[dict[str, Any]] = []  # the whole-scan rows of the best validation
        self.events = dict.fromkeys(EVENT_KINDS, 0)
        self.step = OptimiserStep(
            model=self.model, optimizer=optimizer, schedule=schedule, settings=settings,
            loss_fn=SegmentationLoss(
                ich_weight=settings.ich_loss_weight, lesion_pos_weight=settings.lesion_pos_weight,
                batch_dice=settings.batch_dice,
            ).to(self.device),
            scaler=grad_scaler(settings.precision, self.device), autocast=self.autocast, clicks=self.clicks,
            events=self.events, world_size=self.world_size,
        )
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
            self.load_state_dict(load_checkpoint(Path(resume_from)), source=Path(resume_from))
        try:
            self.logger.start(run_id=self._logger_run_id)
            stop_reason = self._run_interruptible()
            summary = run_summary(
                stop_reason=stop_reason, settings=self.settings, stopping=self.stopping, epochs_run=self.epoch,
                global_step=self.global_step, wall_time_s=self._elapsed(), device=self.device, events=self.events,
                history=self.history, extra=self.extra_summary,
            )
            if self.is_main:
                write_summary(summary, self.run_dir, history=self.history)
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
        """Epochs until one gives a stop reason: train, then validate, checkpoint, publish; a stop inside an epoch
        saves the place in it."""
        while self.epoch < self.settings.epochs:
            stopped = self._stop_before_epoch(interrupt)
            if stopped is not None:
                return stopped
            epoch = self.epoch + 1
            stopped = self._train_epoch(epoch, interrupt, progress)
            if stopped is not None:
                self._save()
                log.warning("stopped in epoch %d (%s); %s holds the state after %d optimiser steps",
                            epoch, stopped, LATEST, self.global_step)
                return stopped
            stopped = self._end_epoch(epoch, progress)
            if stopped is not None:
                return stopped
        return "completed"

    def _stop_before_epoch(self, interrupt: GracefulInterrupt) -> str | None:
        if self._interrupted(interrupt):
            return "interrupted"
        if self.stopping.should_stop:  # resumed from a run that had already stopped early
            return "early_stopping"
        if self.settings.stop_after_epoch is not None and self.epoch >= self.settings.stop_after_epoch:
            log.info("stopped after epoch %d (stop_after_epoch); resume=auto continues the run", self.epoch)
            return "stopped_after_epoch"
        return None

    # ---------------------------------------------------------------- one epoch of training
    def _train_epoch(self, epoch: int, interrupt: GracefulInterrupt, progress: Progress) -> str | None:
        """Optimiser updates over the epoch's windows; returns a stop reason when the epoch cannot finish."""
        state, batches = self._start_epoch(epoch)
        k, limit = self.settings.grad_accum_steps, self.settings.max_steps_per_epoch or math.inf
        meter = EpochMeter(self.device)
        meter.start()
        progress.start_epoch(epoch, min(len(self.train_loader), limit * k), done=state.batches_done)
        stop = self._interrupted(interrupt)
        while state.windows_done < limit and not stop:
            window = list(islice(batches, k))
            if not window:
                break
            loss = self.step(window, at=self.global_step)
            size = sum(batch_size(b) for b in window)
            state.batches_done += len(window)
            state.windows_done += 1
            state.seen += size
            if loss is None:
                self.events["skipped_steps"] += 1
                self.consecutive_failures += 1
                if self.consecutive_failures >= self.settings.max_consecutive_failures:
                    log.error("%d consecutive optimiser steps failed (events so far: %s); stopping. Lower optim.lr, "
                              "use hardware.precision=fp32/bf16 or a smaller data.batch_size",
                              self.consecutive_failures, self.events)
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

    def _start_epoch(self, epoch: int) -> tuple[EpochPosition, Iterator[dict[str, Any]]]:
        """The epoch's place (`progress_in_epoch`) and its batches, replayed up to a resumed checkpoint's place."""
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
        return state, batches

    def _interrupted(self, interrupt: GracefulInterrupt) -> bool:
        """Whether a Ctrl-C reached any rank (all ranks call this at the same points and agree)."""
        return distributed.any_rank(interrupt.requested) if self.world_size > 1 else interrupt.requested

    # ---------------------------------------------------------------- end of an epoch
    def _end_epoch(self, epoch: int, progress: Progress) -> str | None:
        """Validate, step the schedule, track the best, checkpoint, publish; returns a stop reason if any."""
        record = epoch_record(self.progress_in_epoch, epoch=epoch, global_step=self.global_step,
                              world_size=self.world_size)
        result, improved = self._validate_epoch(epoch, record) if self._validates(epoch) else (None, False)
        if improved:
            self.best_cases = plain_data({"cases": result.cases}, "validation cases")["cases"]
        if self.schedule.interval == "epoch":
            self.schedule.scheduler.step()
        self.history.append(record)
        self.epoch = epoch
        self.progress_in_epoch = None
        rng = self._save(best=improved)
        publish_epoch(record, result, history=self.history, settings=self.settings, logger=self.logger,
                      run_dir=self.run_dir, is_main=self.is_main)
        shown = ("train/loss", self.settings.monitor)
        progress.end_epoch(**{k: f"{record[k]:.4f}" for k in shown if record.get(k) is not None})
        stop = self._stop_after_epoch(epoch, result)
        # The next epoch starts from the RNG state in the checkpoint, whatever the logger or callback drew.
        restore_rng(rng, self.clicks)
        return stop

    def _validates(self, epoch: int) -> bool:
        return epoch % self.settings.val_every == 0 or epoch == self.settings.epochs

    def _validate_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[ValidationResult, bool]:
        """Validate into `record`, update early stopping and a metric-driven schedule; (result, new best?)."""
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
        return result, improved

    def _stop_after_epoch(self, epoch: int, result: ValidationResult | None) -> str | None:
        """"pruned" when the epoch callback says so (rank 0 asks, all follow), "early_stopping" when patience ran
        out, else None."""
        pruned = False
        if result is not None:
            if self.is_main and self.epoch_callback is not None:
                pruned = bool(self.epoch_callback(epoch, dict(result.metrics)))
            pruned = distributed.broadcast(pruned)
        if pruned:
            log.info("epoch %d: stopped by the epoch callback (pruned)", epoch)
            return "pruned"
        if self.stopping.should_stop:
            log.info("early stopping: %s did not improve by more than %g for %d validations (best %.4f at epoch %d)",
                     self.settings.monitor, self.settings.min_delta, self.stopping.bad_validations,
                     self.stopping.best, self.stopping.best_epoch)
            return "early_stopping"
        return None

    def _validate(self) -> ValidationResult:
        # Clicks seeded per batch (independent of training randomness): the same every epoch, and the same for a
        # batch whichever rank validates it (rank r takes the batches r, r + world_size, ...).
        def batch_seed(index: int) -> int:
            return derive_seed(self.settings.seed, VALIDATION_STREAM, self.rank + index * self.world_size)

        crops = validate_crops(
            unwrap(self.model), self.val_loader, rounds=self.settings.val_rounds, val_clicks=self.settings.val_clicks,
            prompt_mode=self.settings.prompt_mode, device=self.device, autocast=self.autocast,
            generator=torch.Generator(device=self.device), batch_seed=batch_seed,
            gather=_gather_over_ranks if self.world_size > 1 else None, default_spacing=self.settings.spacing,
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
        return ValidationResult(metrics, crops.example, cases=rows)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The training state a checkpoint holds (model, optimiser, schedule, scaler, counters, early stopping,
        history, the best validation's whole-scan rows, events, RNG states, place in the epoch when saved
        mid-epoch, logger run id, config, elapsed time).

        `load_state_dict` reads back every key written here. A collective under torch.distributed (every rank
        calls it): `ranks` holds every rank's RNG state and place in the epoch (None with one process)."""
        position = asdict(self.progress_in_epoch) if self.progress_in_epoch is not None else None
        rng = capture_rng(self.clicks)
        ranks = distributed.all_gather({"rng": rng, "position": position}) if self.world_size > 1 else None
        return {
            "format": FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "position": position,
            "ranks": ranks,
            "metric_name": self.settings.monitor,
            "best_metric": self.stopping.best,
            "best_epoch": self.stopping.best_epoch,
            "early_stopping": self.stopping.state_dict(),
            "history": self.history,
            "best_cases": self.best_cases,
            "events": dict(self.events),
            "rng": rng,
            "logger_run_id": self.logger.run_id,
            "config": self.config,
            "elapsed_s": self._elapsed(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, source: Path | str = "state") -> None:
        """Restore what `state_dict` returned (`source`, the checkpoint file, names it in errors). The RNG states
        and the place in the epoch take effect when the next epoch starts (`_train_epoch`), so nothing in between,
        such as the logger's start, shifts the resumed run's random streams. `metric_name`, `best_metric`,
        `best_epoch` (copies of `early_stopping`'s) and `config` are for readers of the file."""
        load_model_state(unwrap(self.model), state["model"], source=source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise UserError(f"checkpoint {source}: optimiser state does not fit ({err})") from None
        self.schedule.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.stopping.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.best_cases = list(state.get("best_cases", []))  # absent in checkpoints written before it
        self.events.update(state["events"])
        self._logger_run_id = state["logger_run_id"]
        self._elapsed_before = state["elapsed_s"]
        position, rng = own_place(state, rank=self.rank, world_size=self.world_size, source=source)
        self._resume = (EpochPosition(**position) if position is not None else None, rng)
        log.info("resumed from %s: epoch %d done, %d optimiser steps, best %s=%s", source, self.epoch,
                 self.global_step, self.settings.monitor, self.stopping.best)

    def _save(self, *, best: bool = False) -> dict[str, Any]:
        """latest_model.pth now (mid-epoch when `progress_in_epoch` is set); best_model.pth as a copy if `best`.

        Returns the RNG states written into the checkpoint (rank 0 alone writes; the file holds every rank's)."""
        state = self.state_dict()
        if self.is_main:
            save_checkpoint(state, self.run_dir / LATEST)
            if best:
                copy_checkpoint(self.run_dir / LATEST, self.run_dir / BEST)
        return state["rng"]

    def _elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started


def _gather_over_ranks(scores: CaseScores) -> CaseScores:
    return CaseScores.merge(distributed.all_gather(scores))

