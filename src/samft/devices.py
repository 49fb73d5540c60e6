"""The one rule for turning a device setting (auto | cpu | cuda) into a torch device, and the CPUs this process may
use."""

from __future__ import annotations

import contextlib
import os

import torch

from samft.errors import UserError


def resolve_device(name: str, *, key: str) -> torch.device:
    """auto: cuda when a GPU is visible, else cpu. `key` names the setting in the error for a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA GPU is visible; use {key}=cpu")
    return torch.device(name)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what a container or `taskset` grants), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_cpu_threads(requested: int | None, *, usable_cpus: int, busy_workers: int, processes: int = 1) -> int:
    """Set torch's intra- and inter-op threads for this process and return the intra-op count now in force.

    requested None: the usable CPUs shared by the `processes` of this machine's run, less one CPU per busy loader
    worker, at least 1. A worker that reads and resamples scans (no preprocessing cache) is busy: on 2 cores,
    torch's two threads beside it oversubscribe them. A worker that only crops and augments cached scans is not:
    leaving it a core costs 30-36 % of the training speed (benchmarks/cpu_threads.py).
    Inter-op threads can be set only before torch's first parallel work; after that the current value is kept.
    """
    threads = requested or max(1, usable_cpus // max(1, processes) - busy_workers)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already fixed by earlier parallel work in this process
        torch.set_num_interop_threads(threads)
    return torch.get_num_threads()
