"""Training samples/s with `hardware.cpu_threads` at its default (null) against a core spared per loader worker.

    python benchmarks/cpu_threads.py                          # experiment=demo, 5 steps a run, A/B/B/A
    python benchmarks/cpu_threads.py --recipe realistic       # realistic_ich_unet and realistic_ich on SAMFT_ICH_DATA
    python benchmarks/cpu_threads.py --steps 1 --rounds 1 --extra "data.batch_size=1"   # smoke run

A loader worker that reads and resamples every scan needs a core of its own; one that crops cached scans does
not. `hardware.cpu_threads=null` (samft's default, samft.devices.set_cpu_threads) takes all usable CPUs when the
scans are cached (`data.cache=memory|disk`) and spares a core per worker only without a cache. A spares a core for
each default loader worker (the default before the preprocessing cache), B is the default. Every run is one fresh
process of
`python -m samft.train experiment=E epochs=2 val_every=2 stop_after_epoch=1 logger=none max_steps_per_epoch=N
data.cache=disk hardware.cpu_threads=T` (one training epoch, stopped before the first validation), T the usable
CPUs less the default loader workers (A) or null (B), in the order A B B A (two --rounds) so that drift in the
machine's load falls on both alike. The disk cache lives in one folder under --out shared by all runs, so only
the first run preprocesses (untimed either way); the figure is summary.json's training samples/s (samples over
the training epoch's seconds: start-up and checkpoints excluded), averaged over a setting's runs. Each run's
summary.json records the thread count in force and the loader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, exit_if_failed, header, load_average, ratio_line, training_rate

from samft.data.datamodule import default_num_workers
from samft.devices import available_cpus

RECIPES = {"demo": ["demo"], "realistic": ["realistic_ich_unet", "realistic_ich"]}
# One training epoch and no validation: the run stops after epoch 1, before epoch 2's validation.
RUN = ["epochs=2", "val_every=2", "stop_after_epoch=1", "logger=none"]


def realistic_root() -> Path:
    """The realistic ICH data folder, as the realistic experiments find it (SAMFT_ICH_DATA, else data/realistic_ich)."""
    return Path(os.environ.get("SAMFT_ICH_DATA") or REPO / "data" / "realistic_ich").expanduser().resolve()


def run(experiment: str, threads: int | None, *, steps: int, run_dir: Path, cache_dir: Path,
        overrides: list[str]) -> dict:
    """One training process; its training samples/s and the threads and loader workers it recorded."""
    setting = "null" if threads is None else str(threads)
    cmd = [sys.executable, "-m", "samft.train", f"experiment={experiment}", *RUN, f"max_steps_per_epoch={steps}",
           "data.cache=disk", f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides,
           f"hardware.cpu_threads={setting}"]
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    exit_if_failed(cmd, code, log)
    summary = json.loads((run_dir / "summary.json").read_text())
    samples, seconds = training_rate(summary)
    return {"experiment": experiment, "setting": setting, "run_dir": str(run_dir),
            "cpu_threads": summary["cpu_threads"], "loader_workers": summary["loader_workers"],
            "samples": samples, "train_s": seconds, "samples_per_s": samples / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="demo")
    parser.add_argument("--steps", type=int, default=5, help="optimiser steps in each run's one epoch")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs per experiment; round r runs A B "
                        "when r is even, B A when odd (2 rounds: A B B A)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the runs, their shared disk cache and report.json (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--extra", default="", help="more overrides for every run, e.g. \"data.batch_size=1\"")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")

    overrides = shlex.split(args.extra)
    if args.recipe == "realistic":
        root = realistic_root()
        if not (root / "train.csv").is_file():
            sys.exit(f"skipped: no realistic ICH data at {root} (no train.csv); set SAMFT_ICH_DATA to the folder "
                     f"(see experiments/realistic_ich.md) or use --recipe demo")
        overrides = [f"data.root={root}", *overrides]
    spared = max(1, available_cpus() - default_num_workers())  # a core left to each default loader worker

    print(header(__file__))
    print(f"runs: python -m samft.train experiment=E {' '.join(RUN)} max_steps_per_epoch={args.steps} "
          f"data.cache=disk {' '.join(overrides)}; A: hardware.cpu_threads={spared} (a core spared per default "
          f"loader worker), B: hardware.cpu_threads=null (samft's default)")
    with tempfile.TemporaryDirectory(prefix="samft-threads-") as tmp:
        out = (args.out or Path(tmp)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        results: list[dict] = []
        for experiment in RECIPES[args.recipe]:
            for r in range(args.rounds):
                for threads in ((spared, None) if r % 2 == 0 else (None, spared)):
                    name = f"{experiment}-{'A' if threads else 'B'}{r}"
                    start = time.perf_counter()
                    result = run(experiment, threads, steps=args.steps, run_dir=out / name,
                                 cache_dir=out / "cache", overrides=overrides)
                    results.append(result)
                    print(f"  run {name}: hardware.cpu_threads={result['setting']} -> cpu_threads "
                          f"{result['cpu_threads']}, loader_workers {result['loader_workers']}: "
                          f"{result['samples_per_s']:.4f} samples/s ({result['samples']:.0f} samples in "
                          f"{result['train_s']:.2f} s; process {time.perf_counter() - start:.1f} s); "
                          f"load average {load_average()}", flush=True)
        (out / "report.json").write_text(json.dumps({"spared": spared, "steps": args.steps,
                                                     "runs": results}, indent=2) + "\n")

        print()
        for experiment in RECIPES[args.recipe]:
            mean = {}
            for setting in (str(spared), "null"):
                speeds = [x["samples_per_s"] for x in results if x["experiment"] == experiment
                          and x["setting"] == setting]
                mean[setting] = sum(speeds) / len(speeds)
            print(ratio_line(f"experiment={experiment}, train samples/s, cpu_threads=null / cpu_threads={spared}",
                             mean["null"], mean[str(spared)], unit="samples/s", higher_is_better=True))
        if args.out:
            print(f"runs, logs and report.json in {out}")


if __name__ == "__main__":
    main()
