"""One optimiser update from an accumulation window of micro-batches, and what it does when a micro-step fails."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from samft import distributed
from samft.engine.batches import batch_size, plain_tensor, split_batch
from samft.engine.faults import PEER_FAILURE, Failure, free_memory
from samft.engine.losses import SegmentationLoss
from samft.engine.optim import Schedule
from samft.engine.settings import TrainSettings

log = logging.getLogger(__name__)


class OptimiserStep:
    """Forward, backward and one optimiser update per window; failures are counted into `events` (shared with the
    Trainer, which saves them) and the window is skipped, or, for an out-of-memory forward under
    `oom_policy=halve` in one process, retried as two halves.

    `model` is what the Trainer trains (a DDP wrapper under torch.distributed), `clicks` the training click
    generator, `autocast()` a fresh autocast context of the run's precision, `scaler` its GradScaler.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        settings: TrainSettings,
        loss_fn: SegmentationLoss,
        scaler: torch.amp.GradScaler,
        autocast: Callable[[], AbstractContextManager[Any]],
        clicks: torch.Generator,
        events: dict[str, int],
        world_size: int,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.settings = settings
        self.loss_fn = loss_fn
        self.scaler = scaler
        self.autocast = autocast
        self.clicks = clicks
        self.events = events
        self.world_size = world_size
        self.device = torch.device(settings.device)

    def __call__(self, window: list[dict[str, Any]], *, at: int) -> float | None:
        """One optimiser update from the micro-batches of `window`; its loss, or None if the window failed. `at`:
        the optimiser steps done so far (for the log).

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
                    log.warning("step %d: out of memory on %d samples; retrying as two halves", at, batch_size(batch))
                    continue
                log.warning("step %d: %s; skipping this optimiser step", at, result.kind)
                self.optimizer.zero_grad(set_to_none=True)
                return None
            window_loss += result.double()
        loss, grad_norm = torch.stack([window_loss, self._gradient_norm()]).tolist()  # the window's one host read
        if not math.isfinite(loss):  # one process: its backward ran on the non-finite loss; nothing is applied
            self.events["nonfinite_loss"] += 1
            log.warning("step %d: nonfinite_loss; skipping this optimiser step", at)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if not math.isfinite(grad_norm):
            self.events["nonfinite_grad"] += 1
            log.warning("step %d: nonfinite_grad (gradient norm %s of a finite loss); skipping this optimiser step",
                        at, grad_norm)
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

    def _gradient_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients (a float64 scalar on the device); 0 under fp16, whose GradScaler skips a
        non-finite update itself and lowers its scale. In fp32 and bf16 nothing else would: one non-finite gradient
        of a finite loss turns every weight into NaN through the clipping and the optimiser."""
        if self.scaler.is_enabled():
            return torch.zeros((), dtype=torch.float64, device=self.device)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).to(self.device, torch.float64)

    def _micro_step(self, batch: dict[str, Any], weight: float, *, sync: bool) -> torch.Tensor | Failure:
        """Forward and backward of one micro-batch; returns its weighted loss (a detached scalar on the device) or
        what went wrong. One process checks the loss for NaN/Inf once per window (`__call__`), not here.

        With several ranks, all agree before each backward whether every forward succeeded, so a failure on one
        rank skips the window on all (none is left waiting in the gradient all-reduce of the last micro-step).
        A failed backward is announced at the others' next agreement; one in the synchronising backward cannot be
        taken back and ends the run.
        """
        image = plain_tensor(batch["image"]).to(self.device, non_blocking=True)
        label = plain_tensor(batch["label"]).to(self.device, torch.float32, non_blocking=True)  # uint8 as cached
        ich = plain_tensor(batch["ich"]).to(self.device, non_blocking=True)
        no_sync = (
            self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not sync else nullcontext()
        )
        with no_sync:
            failure = None
            try:
                with self.autocast():
                    output = segment(
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


def segment(model: torch.nn.Module, image: torch.Tensor, **kwargs: Any) -> Any:
    """Call `segment`, through a DDP wrapper when there is one: its forward hooks schedule the gradient
    all-reduce, so going around the wrapper (as the official SAM-Med3D code does) never synchronises."""
    if isinstance(model, DistributedDataParallel):
        return model(image, **kwargs)
    return model.segment(image, **kwargs)
