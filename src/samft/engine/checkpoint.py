"""Atomic full-state checkpoints that load with `torch.load(weights_only=True)`, and RNG state capture."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from samft.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "samft-checkpoint-1"
LATEST = "latest_model.pth"
BEST = "best_model.pth"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (so state-dict keys carry no `module.`)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, then rename.

    An interruption at any point leaves the previous file at `path` intact.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, name=path.name)
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
    remove_stale_temporaries(target.parent, name=target.name)
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
    remove_stale_temporaries(path.parent)  # a resume after a SIGKILL during a write finds its temporary here
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


def load_model_state(model: torch.nn.Module, weights: Mapping[str, Any], *, source: Path | str) -> None:
    """Load a checkpoint's model weights strictly; UserError naming `source` and the first keys that differ."""
    try:
        keys = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise UserError(f"checkpoint {source} does not fit the model: {str(err).splitlines()[1].strip()}") from None
    if keys.missing_keys or keys.unexpected_keys:
        raise UserError(
            f"checkpoint {source} does not fit the model: missing keys {keys.missing_keys[:3]}, "
            f"unexpected keys {keys.unexpected_keys[:3]}; it was saved with another model config"
        )


def own_place(
    state: Mapping[str, Any], *, rank: int, world_size: int, source: Path | str
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """This rank's place in the epoch (an EpochPosition as a dict, None at an epoch's end) and random state from a
    checkpoint (rank 0's in a one-process file). Mid-epoch, the number of processes must be the saver's."""
    ranks = state.get("ranks")
    saved_by = len(ranks) if ranks else 1
    if saved_by == world_size:
        own = ranks[rank] if ranks else state
        return own["position"], own["rng"]
    if state["position"] is not None:
        raise UserError(
            f"checkpoint {source} was saved mid-epoch by {saved_by} processes and this run has {world_size}; "
            f"resume with hardware.nproc_per_node={saved_by} (or as many torchrun ranks)"
        )
    log.warning(
        "checkpoint %s was written by %d processes, this run has %d: training continues from its weights, but "
        "the data order and clicks differ from an uninterrupted run", source, saved_by, world_size,
    )
    return None, state["rng"]


def plain_data(value: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A copy of `value` as JSON-able data (what a checkpoint stores as its config); ValueError if it is not."""
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be plain data (OmegaConf.to_container(cfg, resolve=True)): {err}") from None


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def remove_stale_temporaries(folder: Path, *, name: str | None = None) -> list[Path]:
    """Delete the `.<name>.<pid>.tmp` files that `save_checkpoint`/`copy_checkpoint` left in `folder` when their
    process was killed mid-write (its pid is gone, or is this process, which is not writing them now). Files of
    live processes (another rank writing) are kept. `name`: only temporaries of that checkpoint. Returns the
    removed paths."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or (name is not None and match["name"] != name) or not entry.is_file():
            continue
        if int(match["pid"]) != os.getpid() and _alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # no such pid can exist
    except PermissionError:
        return True  # another user's process: alive
    return True


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


def restore_rng(state: dict[str, Any], click_generator: torch.Generator) -> bool:
    """Inverse of `capture_rng`; returns whether the restore was exact.

    A state saved on other hardware is restored as far as it fits, so a run resumes on fewer or more GPUs, or
    moves between CPU and CUDA, at the cost of bit-exactness (a warning says so): the first min(saved, visible)
    CUDA generators take the saved states (the rest keep their seeds), and a click-generator state of the other
    kind (CPU Mersenne Twister vs CUDA Philox) re-seeds the generator from a hash of that state, so resuming the
    same checkpoint on the same hardware twice still draws the same clicks.
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    exact = True
    saved_cuda = list(state["cuda"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved_cuda[:visible]):
        torch.cuda.set_rng_state(cuda_state, device=index)
    if len(saved_cuda) != visible:
        exact = False
        log.warning("random state saved with %d CUDA device(s), %d visible now: the resumed run is not bit-exact",
                    len(saved_cuda), visible)
    clicks = state["clicks"]
    if clicks.numel() == click_generator.get_state().numel():
        click_generator.set_state(clicks)
    else:
        exact = False
        digest = hashlib.sha256(clicks.numpy().tobytes()).digest()
        click_generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        log.warning("click-generator state saved on another kind of device than %s: re-seeded from it; the resumed "
                    "run is not bit-exact", click_generator.device.type)
    return exact


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
