"""Watching a run: start-up system check, per-epoch throughput and memory, progress bars with ETA."""

from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from samft.devices import available_cpus

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2


def system_check(
    output_dir: Path,
    *,
    device: str = "cpu",
    min_free_disk_gb: float = 10.0,
    min_free_gpu_gb: float = 8.0,
    min_free_ram_gb: float = 8.0,
    min_cpus: int = 4,
) -> list[str]:
    """Log the GPU, memory, disk and CPU situation; return a warning for each resource below its minimum."""
    warnings = []
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            warnings.append(f"device={device} but torch sees no CUDA GPU (torch {torch.__version__})")
        else:
            index = torch.device(device).index or 0
            free, total = torch.cuda.mem_get_info(index)
            log.info(
                "GPU %d: %s, %.1f of %.1f GiB free", index, torch.cuda.get_device_name(index), free / GIB, total / GIB
            )
            if free / GIB < min_free_gpu_gb:
                warnings.append(
                    f"GPU {index} has {free / GIB:.1f} GiB free (< {min_free_gpu_gb}); lower "
                    "data.batch_size, raise optim.grad_accum_steps or use hardware.precision=bf16"
                )
    ram = psutil.virtual_memory().available / GIB
    if ram < min_free_ram_gb:
        warnings.append(f"{ram:.1f} GiB of RAM available (< {min_free_ram_gb}); use data.cache=disk or none")
    existing = next(p for p in (Path(output_dir), *Path(output_dir).absolute().parents) if p.exists())
    disk = shutil.disk_usage(existing).free / GIB
    if disk < min_free_disk_gb:
        warnings.append(f"{disk:.1f} GiB free on the disk of {output_dir} (< {min_free_disk_gb}); checkpoints may fail")
    cpus = available_cpus()
    if cpus < min_cpus:
        warnings.append(f"{cpus} CPU cores usable (< {min_cpus}); data loading may bound the speed")
    log.info("system: %d CPU cores, %.1f GiB RAM available, %.1f GiB free disk at %s", cpus, ram, disk, existing)
    return warnings


class EpochMeter:
    """Throughput and memory of one epoch: samples/s, GPU peak allocated (MB), process RSS (MB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._started = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels still queued belong to the previous phase
            torch.cuda.reset_peak_memory_stats(self.device)
        self._started = time.perf_counter()

    def stop(self, samples: int) -> dict[str, float]:
        """The epoch's stats; on CUDA after the queued kernels finished (else the rate counts launches)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._started
        stats = {
            "time/epoch_s": seconds,
            "time/samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "memory/rss_mb": psutil.Process().memory_info().rss / MIB,
        }
        if self.device.type == "cuda":
            stats["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / MIB
        return stats


def peak_memory_mb(device: torch.device, history: list[dict[str, Any]]) -> float:
    """Peak GPU memory allocated over the epochs on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return max((h.get("memory/gpu_peak_mb", 0.0) for h in history), default=0.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Progress:
    """A run bar over epochs and an epoch bar over micro-batches, both with rate and ETA (tqdm)."""

    def __init__(self, *, epochs: int, done: int, enabled: bool) -> None:
        self.enabled = enabled
        self.run = tqdm(total=epochs, initial=done, desc="run", unit="epoch", position=0, disable=not enabled)
        self.epoch: tqdm | None = None

    def start_epoch(self, epoch: int, batches: int, *, done: int = 0) -> None:
        self.epoch = tqdm(
            total=batches,
            initial=done,
            desc=f"epoch {epoch}",
            unit="batch",
            position=1,
            leave=False,
            disable=not self.enabled,
        )

    def advance(self, batches: int, **postfix: Any) -> None:
        self.epoch.update(batches)
        if postfix:
            self.epoch.set_postfix(postfix, refresh=False)

    def end_epoch(self, **postfix: Any) -> None:
        self.epoch.close()
        self.run.update(1)
        self.run.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.epoch is not None:
            self.epoch.close()
        self.run.close()
