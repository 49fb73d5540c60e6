"""What can go wrong in one micro-step, freeing memory afterwards, and making it go wrong on purpose."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

EVENT_KINDS = ("oom", "oom_split", "nonfinite_loss", "nonfinite_grad", "skipped_steps", "fp16_overflow")
# Another rank's micro-step failed, so this rank skips the window too (counted by the rank that failed).
PEER_FAILURE = "peer_failure"


@dataclass(frozen=True)
class Failure:
    """A failed micro-step. `splittable`: the forward pass ran out of memory before any gradient was written,
    so the micro-batch may be retried as two halves."""

    kind: str
    splittable: bool = False


def free_memory(device: torch.device) -> None:
    """Return cached blocks after an out-of-memory error (the failed step's tensors must be out of scope)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


Fault = Callable[[int, torch.Tensor], "str | None"]


def inject_faults(model: torch.nn.Module, fault: Fault) -> None:
    """Make `model` fail on purpose, for tests and benchmarks: its `segment` and `forward` (the entry a DDP wrapper
    calls) are replaced, on this instance, by a wrapper that calls `fault(n, image)` before the n-th training call
    (n = 1, 2, ...; calls in eval mode are not counted). `fault` may raise (before any click is drawn) or return
    "nan" to make that call's last-round logits NaN; None leaves the call alone."""
    segment = model.segment
    calls = 0

    def faulty(image: torch.Tensor, **kwargs: Any) -> Any:
        nonlocal calls
        action = None
        if model.training:
            calls += 1
            action = fault(calls, image)
        output = segment(image, **kwargs)
        if action == "nan":
            output.logits[-1] = output.logits[-1] * float("nan")
        return output

    model.segment = model.forward = faulty


def out_of_memory_on(call: int, *, device: torch.device | None = None) -> Fault:
    """A `Fault` raising torch.OutOfMemoryError on training call number `call`; on a CUDA `device` the error is a
    real failed allocation (1 PiB), so the caching allocator goes through its own out-of-memory path."""

    def fault(n: int, image: torch.Tensor) -> None:
        if n == call:
            if device is not None and device.type == "cuda":  # raises the allocator's own OutOfMemoryError
                torch.empty(1 << 50, dtype=torch.uint8, device=device)
            raise torch.OutOfMemoryError("injected")

    return fault
