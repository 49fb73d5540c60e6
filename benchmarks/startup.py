"""Start-up wall time of `python -m samft.train --cfg job` and `--help` against a minimal one-file Hydra app.

    python benchmarks/startup.py               # 7 runs of each command
    python benchmarks/startup.py --repeats 1   # smoke run

Baseline: one @hydra.main function and one YAML file, written to a temporary folder and run with `--cfg job`
by this same interpreter from the repository root, so Hydra scans the same installed plugins (samft's sweeper
included). Each command is a fresh process, timed from spawn to exit; all commands run once per round, in an
order rotated every round, so load changes on a shared machine hit them alike; the median over rounds counts.
Also timed for reference: `import hydra` alone, and the minimal app's own `--help` (Hydra's help lists every
config group of every plugin, which costs the same in any app). Goal: samft <= 1.3x the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, header, load_average, ratio_line

GOAL = 1.3
MINIMAL_APP = '''import hydra
from omegaconf import DictConfig


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(cfg.lr)


if __name__ == "__main__":
    main()
'''
MINIMAL_CONFIG = "lr: 0.001\nepochs: 10\n"


def commands(app: Path) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "minimal app --cfg job (baseline)": [python, str(app), "--cfg", "job"],
        "minimal app --help": [python, str(app), "--help"],
        "samft.train --cfg job": [python, "-m", "samft.train", "--cfg", "job"],
        "samft.train --help": [python, "-m", "samft.train", "--help"],
        "python -c 'import hydra'": [python, "-c", "import hydra"],
    }


def wall_time(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (the median counts)")
    args = parser.parse_args()

    print(header(__file__))
    with tempfile.TemporaryDirectory(prefix="samft-startup-") as tmp:
        app = Path(tmp) / "app.py"
        app.write_text(MINIMAL_APP)
        (Path(tmp) / "config.yaml").write_text(MINIMAL_CONFIG)
        cmds = commands(app)
        wall_time(cmds["minimal app --cfg job (baseline)"])  # untimed: warms the file cache and .pyc files
        times: dict[str, list[float]] = {name: [] for name in cmds}
        names = list(cmds)
        for round_index in range(args.repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(wall_time(cmds[name]))

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"wall time of a fresh process, median of {args.repeats} (min-max), cwd {REPO}; load average after: "
          f"{load_average()}")
    for name, values in times.items():
        print(f"  {name:34s} {medians[name]:6.2f} s  ({min(values):.2f}-{max(values):.2f})")
    base = medians["minimal app --cfg job (baseline)"]
    print(ratio_line("samft.train --cfg job / minimal --cfg job", medians["samft.train --cfg job"], base,
                     unit="s", goal=GOAL))
    print(ratio_line("samft.train --help / minimal --cfg job", medians["samft.train --help"], base, unit="s",
                     goal=GOAL))
    print(ratio_line("samft.train --help / minimal --help (like for like)", medians["samft.train --help"],
                     medians["minimal app --help"], unit="s", goal=GOAL))


if __name__ == "__main__":
    main()
