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
