"""Shared by the benchmark scripts: the run header (script, date, machine, load, commit) and ratio lines.

Each script imports this module by its plain name (`python benchmarks/x.py` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from samft.devices import available_cpus

if TYPE_CHECKING:
    from samft.model.build import SamMed3DSpec

REPO = Path(__file__).resolve().parents[1]
# The released SAM-Med3D geometry shrunk for smoke runs: 32^3 input, 2 global-attention blocks of width 96, prompt
# width 48, the decoder at its released sizes (medim fixes them); MEDIM_SMALL asks medim for the same network.
SMALL = dict(img_size=32, encoder_dim=96, encoder_depth=2, encoder_heads=4, global_attn_indexes=(0, 1), prompt_dim=48)
MEDIM_SMALL = dict(image_size=32, encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=4,
                   encoder_global_attn_indexes=[0, 1], prompt_embed_dim=48)


def header(script: str) -> str:
    """Two lines: the script and the date; the machine, its load, the software and the git commit."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"benchmarks/{Path(script).name}  {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"machine: {platform.node()} {_cpu_name()}, {available_cpus()} CPUs{gpu}, load average {load_average()}; "
        f"python {platform.python_version()}, torch {torch.__version__}; commit {commit()}"
    )


def small_sam_spec() -> SamMed3DSpec:
    """The SMALL variant of samft's SAM-Med3D (imported here: samft.model imports MONAI, which takes seconds)."""
    from samft.model import REGISTRY

    return dataclasses.replace(REGISTRY["sam_med3d"], **SMALL)


def commit() -> str:
    """Short HEAD commit, with '+ uncommitted changes' when the work tree differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "none"
    return head + (" + uncommitted changes" if git("status", "--porcelain") else "")


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"


def ratio_line(what: str, value: float, baseline: float, *, unit: str, goal: float | None = None,
               higher_is_better: bool = False) -> str:
    """'ratio <what>: value unit / baseline unit = r x (goal <= g x: met)'; r = value / baseline.

    For times and memory lower is better (goal is a maximum), for throughputs higher (goal is a minimum).
    """
    ratio = value / baseline
    text = f"ratio {what}: {value:.4g} {unit} / {baseline:.4g} {unit} = {ratio:.3f}x"
    if goal is not None:
        met = ratio >= goal if higher_is_better else ratio <= goal
        text += f" (goal {'>=' if higher_is_better else '<='} {goal:g}x: {'met' if met else 'NOT met'})"
    return text


class PeakTreeMemory:
    """Peak memory of process `pid` with its descendants (e.g. DataLoader workers), sampled every `interval` s.

    `pss` is the peak of the summed proportional set size (Linux: shared pages split between the processes
    that share them, so copy-on-write pages of forked workers count once; elsewhere RSS, which overstates it).
    Reading PSS walks the page tables (~20 ms a process here), hence the coarse default interval.
    """

    def __init__(self, pid: int, *, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.pss = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            try:
                processes = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:  # the process has ended
                return
            self.pss = max(self.pss, sum(_pss(p) for p in processes))


def exit_if_failed(cmd: list[str], code: int, log: Path) -> None:
    """Stop the benchmark with the command, its exit code and the end of its log when a training run failed."""
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; its output ends:\n"
                         + "\n".join(log.read_text().splitlines()[-20:]))


def training_rate(summary: dict) -> tuple[float, float]:
    """(samples, seconds) of a run's training epochs from its summary.json (start-up and checkpoints excluded)."""
    epochs = summary["history"]
    seconds = sum(e["time/epoch_s"] for e in epochs)
    return sum(e["time/samples_per_s"] * e["time/epoch_s"] for e in epochs), seconds


def _pss(process: psutil.Process) -> int:
    """Bytes; 0 for a process that ended between listing and reading."""
    rollup = Path(f"/proc/{process.pid}/smaps_rollup")
    try:
        if rollup.exists():
            line = next(line for line in rollup.read_text().splitlines() if line.startswith("Pss:"))
            return int(line.split()[1]) * 1024
        return process.memory_info().rss
    except (OSError, psutil.Error, StopIteration):
        return 0


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def realistic_step_batch(*, size: int, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The realistic recipe's training loss and a batch for timing its step: (loss, image B x 1 x size^3, label with
    one small box-shaped bleed in the middle, ich B)."""
    from samft.engine.losses import SegmentationLoss

    loss_fn = SegmentationLoss(ich_weight=0.1, lesion_pos_weight=50.0, batch_dice=True)
    image = torch.randn(batch, 1, *(size,) * 3, generator=torch.Generator().manual_seed(0))
    label = torch.zeros_like(image)
    c = size // 2
    label[..., c - 5:c + 5, c - 6:c + 6, c - 3:c + 3] = 1.0
    return loss_fn, image, label, torch.ones(batch)
