"""torch.distributed for training: process-group set-up and teardown, rank helpers, launching workers.

A run with `hardware.distributed=true` gets its processes in one of three ways:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set; every rank is its own Hydra run;
- submitit with several tasks (hydra/launcher=slurm, tasks_per_node > 1): every task is the same Hydra job;
- otherwise the Hydra job itself starts `hardware.nproc_per_node` local workers (`spawn`), also inside `-m` sweeps.

Every helper below answers as rank 0 of 1 (and every collective is a no-op) when no process group is up, so
single-process code paths call them unconditionally.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from samft.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------- rank helpers
def is_active() -> bool:
    """Whether a process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and talks to trackers and Optuna."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK, set by torchrun, submitit's export and `spawn`)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_active() else 0


def local_world_size() -> int:
    """Processes of this run on this node (LOCAL_WORLD_SIZE, set by torchrun and `spawn`; else the world size)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) if is_active() else 1


def cuda_device() -> torch.device:
    """The GPU of this rank: local rank modulo the visible GPUs (a scheduler may show each task only its own)."""
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not is_active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order (any picklable object)."""
    if not is_active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not is_active():
        return flag
    tensor = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def sum_over_ranks(*values: float) -> list[float]:
    """The sums over ranks of each of `values` (float64)."""
    if not is_active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def _collective_device() -> torch.device:
    return cuda_device() if dist.get_backend() == dist.Backend.NCCL else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- process groups
def backend_for(backend: str, device_type: str) -> str:
    """`hardware.backend` resolved: auto is NCCL on GPUs and gloo on CPUs."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise UserError("hardware.backend=nccl needs GPUs (hardware.device=cuda); use hardware.backend=gloo on CPU")
    return backend


def external_launcher() -> str | None:
    """'torchrun' or 'submitit' when this process is one of several started by them, else None."""
    if all(name in os.environ for name in TORCHRUN_VARIABLES):
        return "torchrun"
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            return "submitit"
    return None


def export_submitit_environment() -> None:
    """Set the torchrun variables from the submitit job (master = the job's first node)."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


@contextmanager
def process_group(
    *,
    backend: str,
    timeout_min: float,
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[None]:
    """Initialise the default process group (from the torchrun variables unless `rank`/`world_size` are given)
    and destroy it on exit. With NCCL the rank's GPU becomes the current device first.

    `timeout_min` bounds every collective: a rank that waits longer (a crashed or stuck peer) fails the run
    instead of hanging it.
    """
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    explicit = {} if rank is None else {"rank": rank, "world_size": world_size}
    dist.init_process_group(backend, init_method=init_method, timeout=timedelta(minutes=timeout_min), **explicit)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, *, device: torch.device, find_unused_parameters: bool) -> torch.nn.Module:
    """DistributedDataParallel around `model` (already on `device`); a plain model when no group is up.

    `find_unused_parameters` costs a graph traversal per step; it is needed when some trainable parameters get
    no gradient in a step (SAM's extra mask-token hypernetworks and IoU head, prompt embeddings a batch does not
    use, a head whose loss weight is 0).
    """
    if not is_active():
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


# ---------------------------------------------------------------------------------------------- data
class EveryNthBatch(Sampler[list[int]]):
    """Whole batches `rank, rank + world_size, ...` of a batch sampler: no case is padded or repeated, so the
    per-case results gathered from all ranks hold every case exactly once, in batches composed as in one process."""

    def __init__(self, batches: Sampler[list[int]] | Sequence[list[int]], *, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batches):
            if index % self.world_size == self.rank:
                yield batch


def shard_batches(loader: DataLoader) -> DataLoader:
    """`loader` restricted to this rank's batches (`EveryNthBatch`), with the same dataset and loading settings."""
    if loader.batch_sampler is None:
        raise ValueError("shard_batches needs a loader with a batch size")
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_sampler=EveryNthBatch(loader.batch_sampler, rank=rank(), world_size=world_size()),
        num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, generator=loader.generator, timeout=loader.timeout,
        persistent_workers=loader.persistent_workers and workers > 0,
        **({"prefetch_factor": loader.prefetch_factor, "multiprocessing_context": loader.multiprocessing_context}
           if workers else {}),
    )


# ---------------------------------------------------------------------------------------------- run directory, logs
def agree_on_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory, on every rank.

    Under torchrun each rank composes its own config, so `${now:...}` in hydra.run.dir may name another second.
    A rank whose Hydra folder differs removes it when it holds nothing but Hydra's files (.hydra/, the log).
    """
    agreed = Path(broadcast(str(run_dir)))
    only_hydra = run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())
    if agreed != run_dir and only_hydra:
        shutil.rmtree(run_dir, ignore_errors=True)
    return agreed


def keep_logs_on_main() -> None:
    """On ranks other than 0: drop the log-file handlers and show only warnings and errors on the console."""
    if is_main():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)


def _log_setup() -> dict[str, Any]:
    """The root logger's level and handlers (file path or console stream, format) as plain data."""
    root = logging.getLogger()
    handlers = []
    for handler in root.handlers:
        fmt = _format_string(handler.formatter)
        if isinstance(handler, logging.FileHandler):
            handlers.append({"file": handler.baseFilename, "format": fmt})
        elif isinstance(handler, logging.StreamHandler):
            handlers.append({"stream": "stderr" if handler.stream is sys.stderr else "stdout", "format": fmt})
    return {"level": root.level, "handlers": handlers}


def _format_string(formatter: logging.Formatter | None) -> str | None:
    """The format string of a handler's formatter. `logging.Formatter` keeps it only in the private `_fmt` (there
    is no public accessor); a formatter without one (another class) gives None, and the worker's handler then
    formats as logging does by default (the message alone)."""
    fmt = getattr(formatter, "_fmt", None)
    return fmt if isinstance(fmt, str) else None


def _apply_log_setup(setup: dict[str, Any]) -> None:
    """Rebuild the parent's logging in a spawned worker (appending to its log file); then `keep_logs_on_main`."""
    root = logging.getLogger()
    root.setLevel(setup["level"])
    for spec in setup["handlers"]:
        if "file" in spec:
            handler: logging.Handler = logging.FileHandler(spec["file"], mode="a")
        else:
            handler = logging.StreamHandler(sys.stderr if spec["stream"] == "stderr" else sys.stdout)
        handler.setFormatter(logging.Formatter(spec["format"]))
        root.addHandler(handler)
    keep_logs_on_main()


# ---------------------------------------------------------------------------------------------- spawning
def spawn(fn: Callable[..., T], *, args: tuple = (), nprocs: int, backend: str, timeout_min: float) -> T:
    """Run `fn(*args)` in `nprocs` new local processes, ranks 0..nprocs-1 of one process group, and return rank
    0's result. `fn` and `args` must pickle (a module-level function; plain data, e.g.
    `OmegaConf.to_container(cfg, resolve=True)`, not a DictConfig that still refers to Hydra).

    Workers log like this process (rank 0 alone to the log file and the console below warnings). An exception
    in a worker stops all of them and is re-raised here: the first worker's own exception when it pickles
    (a UserError stays a one-line message, a pruned trial stays pruned), else torch's ProcessRaisedException
    with the worker's traceback. Ctrl-C reaches the workers, which stop and save; this process waits for them.
    """
    outcomes = mp.get_context("spawn").SimpleQueue()
    # The ranks meet through a file, not a TCP port: a port chosen free here could be taken by another process
    # before rank 0 binds it.
    with tempfile.TemporaryDirectory(prefix="samft-rendezvous-") as rendezvous:
        init_method = Path(rendezvous, "store").as_uri()
        worker_args = (fn, args, nprocs, init_method, backend, timeout_min, _log_setup(), outcomes)
        context = mp.start_processes(_worker, args=worker_args, nprocs=nprocs, join=False, start_method="spawn")
        try:
            _join(context)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            results = _drain(outcomes)
            raised = [value for kind, value in results.values() if kind == "raised" and value is not None]
            if raised:
                raise raised[0] from err
            raise
    return _drain(outcomes)[0][1]


def _worker(
    index: int, fn: Callable[..., Any], args: tuple, nprocs: int, init_method: str, backend: str,
    timeout_min: float, log_setup: dict[str, Any], outcomes: Any,
) -> None:
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(index), str(nprocs)
    with process_group(backend=backend, timeout_min=timeout_min, init_method=init_method, rank=index,
                       world_size=nprocs):
        _apply_log_setup(log_setup)
        try:
            value = fn(*args)
        except Exception as err:
            outcomes.put((index, "raised", err if _pickles(err) else None))
            raise
        outcomes.put((index, "returned", value if index == 0 else None))


def _join(context: mp.ProcessContext) -> None:
    """Wait for every worker; Ctrl-C here is left to the workers (they finish their step and save), a third
    one terminates them."""
    interrupts = 0
    while True:
        try:
            if context.join():
                return
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 3:
                for process in context.processes:
                    process.terminate()
                raise
            log.warning("Ctrl-C: waiting for the %d workers to stop (a third Ctrl-C kills them)",
                        len(context.processes))


def _drain(outcomes: Any) -> dict[int, tuple[str, Any]]:
    results = {}
    while not outcomes.empty():
        index, kind, value = outcomes.get()
        results.setdefault(index, (kind, value))
    return dict(sorted(results.items()))


def _pickles(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:
        return False
    return True
