"""Atomic full-state checkpoints that load with `torch.load(weights_only=True)`, and RNG state capture."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from samft.errors import UserError

FORMAT = "samft-checkpoint-1"
LATEST = "latest_model.pth"
BEST = "best_model.pth"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (so state-dict keys carry no `module.`)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, then rename.

    An interruption at any point leaves the previous file at `path` intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Make `target` hold the bytes of `source`, atomically (a hard link where the filesystem allows)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors on CPU); UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass resume=never or a path to a saved .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} cannot be read ({first_line}); delete it or pass another file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a samft training checkpoint (no format '{FORMAT}')")
    return state


def capture_rng(click_generator: torch.Generator) -> dict[str, Any]:
    """Python, NumPy, torch (CPU and every CUDA device) and click-generator states as plain data/tensors."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "clicks": click_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], click_generator: torch.Generator) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    click_generator.set_state(state["clicks"])


def _fsync_dir(folder: Path) -> None:
    """Persist a rename on POSIX filesystems; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
