"""End to end on the demo data: samples/s and peak RSS of short `python -m samft.train` runs, cache x workers.

    python benchmarks/end_to_end.py                                      # experiment=smoke as shipped
    python benchmarks/end_to_end.py --size tiny --configs none:1,memory:2  # smoke run

The demo data set is generated once into a temporary folder (untimed). Then every configuration
(data.cache : hardware.num_workers) is one fresh process of
`python -m samft.train experiment=smoke data.cache=C hardware.num_workers=W data.demo_dir=... hydra.run.dir=...`
(full: 4 demo patients, 2 epochs of 2 optimiser steps of batch 2, 1 click round, validation every epoch; tiny:
3 patients, 1 epoch of 1 step of batch 1). Reported per run:

- train samples/s: samples trained / seconds in the training epochs, from summary.json's per-epoch meter (the
  accumulation windows including any wait for the loader; validation and checkpoints excluded);
- wall s: the whole process (imports, data statistics, the memory cache's fill, validation, checkpoints);
- peak memory: the main process's peak RSS (ru_maxrss, summary.json's peak_memory_mb) and the process tree's
  peak PSS (main process plus loader workers, proportional set sizes summed, so pages the forked workers share
  with the main process count once; sampled every 0.5 s, so a shorter spike can be missed).

Ratios are against the first configuration (default cache=none, 1 worker). Runs go one after another, once each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, PeakTreeMemory, exit_if_failed, header, load_average, ratio_line, training_rate

from samft.data.demo import ensure_demo_dataset

SIZES = {
    "full": {"patients": 4, "overrides": []},
    "tiny": {"patients": 3, "overrides": ["epochs=1", "max_steps_per_epoch=1", "data.batch_size=1"]},
}


def run(cache: str, workers: int, *, size: str, demo: Path, run_dir: Path) -> dict[str, float]:
    """One training process; its throughput, wall time and peak memory."""
    cmd = [sys.executable, "-m", "samft.train", "experiment=smoke", f"data.cache={cache}",
           f"hardware.num_workers={workers}", f"data.demo_patients={SIZES[size]['patients']}",
           f"data.demo_dir={demo}", f"hydra.run.dir={run_dir}", "logger=none", *SIZES[size]["overrides"]]
    log = run_dir.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        with PeakTreeMemory(process.pid) as memory:
            code = process.wait()
    wall = time.perf_counter() - start
    exit_if_failed(cmd, code, log)
    summary = json.loads((run_dir / "summary.json").read_text())
    samples, seconds = training_rate(summary)
    return {"samples_per_s": samples / seconds, "samples": samples, "train_s": seconds, "wall_s": wall,
            "main_rss_mib": summary["peak_memory_mb"], "tree_pss_mib": memory.pss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    parser.add_argument("--configs", default="none:1,memory:1,none:2,memory:2",
                        help="comma-separated data.cache:hardware.num_workers; the first is the baseline")
    args = parser.parse_args()
    configs = [(cache, int(workers)) for cache, workers in (item.split(":") for item in args.configs.split(","))]

    print(header(__file__))
    with tempfile.TemporaryDirectory(prefix="samft-e2e-") as tmp:
        start = time.perf_counter()
        demo = Path(tmp) / "demo"
        ensure_demo_dataset(root=demo, n_patients=SIZES[args.size]["patients"], seed=0)
        print(f"demo data: {SIZES[args.size]['patients']} patients generated in {time.perf_counter() - start:.1f} s; "
              f"runs: python -m samft.train experiment=smoke {' '.join(SIZES[args.size]['overrides'])}")
        results = {}
        for cache, workers in configs:
            results[cache, workers] = run(cache, workers, size=args.size, demo=demo,
                                          run_dir=Path(tmp) / f"run-{cache}-{workers}")
            print(f"  done cache={cache} workers={workers}; load average {load_average()}", flush=True)

    base_key = configs[0]
    base = results[base_key]
    print("\n| data.cache | num_workers | train samples/s | ratio | wall s | ratio | main peak RSS MiB | ratio "
          "| tree peak PSS MiB | ratio |\n|---|---|---|---|---|---|---|---|---|---|")
    for (cache, workers), r in results.items():
        cells = [f"{r['samples_per_s']:.3f}", f"{r['samples_per_s'] / base['samples_per_s']:.2f}x",
                 f"{r['wall_s']:.1f}", f"{r['wall_s'] / base['wall_s']:.2f}x",
                 f"{r['main_rss_mib']:.0f}", f"{r['main_rss_mib'] / base['main_rss_mib']:.2f}x",
                 f"{r['tree_pss_mib']:.0f}", f"{r['tree_pss_mib'] / base['tree_pss_mib']:.2f}x"]
        print(f"| {cache} | {workers} | " + " | ".join(cells) + " |")
    print(f"({base['samples']:.0f} samples in {base['train_s']:.1f} s of training epochs for the baseline)")
    for key in configs[1:]:
        name = f"cache={key[0]} workers={key[1]} vs cache={base_key[0]} workers={base_key[1]}"
        print(ratio_line(f"{name}, train samples/s", results[key]["samples_per_s"], base["samples_per_s"],
                         unit="samples/s"))
        print(ratio_line(f"{name}, tree peak PSS", results[key]["tree_pss_mib"], base["tree_pss_mib"], unit="MiB"))


if __name__ == "__main__":
    main()
