"""What can go wrong in one micro-step, and freeing memory afterwards."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

EVENT_KINDS = ("oom", "oom_split", "nonfinite_loss", "skipped_steps", "fp16_overflow")
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
