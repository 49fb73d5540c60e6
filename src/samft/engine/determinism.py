"""Seeds derived from (run seed, epoch, stream), and per-epoch seeding of a DataLoader's shuffling."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

LOADER_STREAM = 0
VALIDATION_STREAM = 1


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named by `keys` (e.g. epoch and stream id)."""
    words = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_loader(loader: DataLoader, *, seed: int, epoch: int) -> bool:
    """Seed every torch.Generator the loader shuffles with (and a sampler's `set_epoch`) for `epoch`.

    Returns False when the loader has no generator: its order then follows the global torch RNG, which the
    checkpoint restores, so resuming stays exact, but the order is not a function of (seed, epoch) alone.
    """
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for sampler in samplers:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    generators = [loader.generator, *(getattr(sampler, "generator", None) for sampler in samplers)]
    unique = {id(g): g for g in generators if isinstance(g, torch.Generator)}
    for generator in unique.values():
        generator.manual_seed(derive_seed(seed, epoch, LOADER_STREAM))
    return bool(unique)


# What a seeded run repeats, by device, as written into summary.json (`determinism`) and stated in the README.
_CPU = ("bit-exact in fp32: a re-run with the same seed, config, data, thread count and torch build gives the same "
        "weights and metrics")
_CPU_AUTOCAST = ("same data order, augmentation and clicks, but not bit-exact: bf16/fp16 autocast on CPU gave weights "
                 "differing in the last bits between two identical runs (benchmarks/gpu_smoke.py); fp32 is bit-exact")
_CUDA_DETERMINISTIC = (
    "same data order, augmentation and clicks; deterministic kernels where CUDA has them, but "
    "use_deterministic_algorithms runs with warn_only=True, so the ops without one (memory-efficient and flash "
    "attention backward, atomic index_add/scatter_add) still run and weights and "
    "metrics may differ in the last bits between runs, growing over epochs; never bit-exact across GPU models, "
    "GPU counts, driver or torch versions"
)
_CUDA_FREE = ("same data order, augmentation and clicks; kernels are not deterministic (hardware.deterministic=false: "
              "cuDNN autotuning and atomics), so weights and metrics differ between runs")


def guarantee(device: torch.device, precision: str) -> dict[str, object]:
    """What repeats when this process's run is started again with the same seed, for summary.json."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    text = _CPU if precision == "fp32" else _CPU_AUTOCAST
    if device.type == "cuda":
        text = _CUDA_DETERMINISTIC if deterministic else _CUDA_FREE
    return {
        "device": device.type,
        "deterministic_algorithms": deterministic,
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "guarantee": text,
    }
