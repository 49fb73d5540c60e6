"""`python -m samft.reproduce <run dir> [--output DIR] [--epochs N]`: re-run a saved run and compare the summaries.

The config is rebuilt the robust way: the project's config composed with the run's saved overrides (so the
schema checks apply), then the run's saved `.hydra/config.yaml` merged on top (so a changed default in
`conf/` cannot change the re-run). The new run goes into a fresh directory; the report lists every metric
that differs, and a changed git commit, dirty flag or package version. `--epochs N` re-runs only the first N
epochs of an expensive run (`stop_after_epoch`, so the schedule is the original one) and compares those epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from samft.errors import EXIT_USER_ERROR, UserError
from samft.redact import redact

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
COMPARED_METRICS = ("best_metric", "best_epoch", "epochs_run", "stop_reason")


def saved_config(run_dir: Path) -> DictConfig:
    """The validated config of a saved run, rebuilt from its `.hydra/` folder."""
    from hydra import compose, initialize_config_dir

    from samft.config import validate

    hydra_dir = run_dir / ".hydra"
    if not (hydra_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} has no .hydra/config.yaml; pass a run directory written by samft.train")
    overrides = [o for o in OmegaConf.load(hydra_dir / "overrides.yaml") if not o.startswith(("hydra.", "trial."))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose("train", overrides=overrides)
    merged = OmegaConf.merge(composed, OmegaConf.load(hydra_dir / "config.yaml"))
    typed = validate(merged)
    typed.trial.number = None  # a re-run of a sweep trial reports to no study
    typed.resume = "never"
    return typed


def pin_thread_count(cfg: DictConfig, summary: dict[str, Any]) -> None:
    """A run that left `hardware.cpu_threads` to the default re-runs with the thread count it recorded: the default
    depends on the machine and the cache, and another count changes the order of float sums."""
    if cfg.hardware.cpu_threads is None and summary.get("cpu_threads"):
        cfg.hardware.cpu_threads = summary["cpu_threads"]


def compare(old: dict[str, Any], new: dict[str, Any], *, epochs: int | None = None) -> list[str]:
    """Lines describing every difference that matters between two summary.json contents (with `epochs`: between
    the first `epochs` epochs of `old` and the whole of `new`)."""
    differences = []
    old_history, new_history = old.get("history", []), new.get("history", [])
    if epochs is None:
        for key in COMPARED_METRICS:
            if not _same(old.get(key), new.get(key)):
                differences.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    else:
        old_history = old_history[:epochs]
    if len(old_history) != len(new_history):
        differences.append(f"history length: {len(old_history)} -> {len(new_history)} epochs")
    for epoch, (a, b) in enumerate(zip(old_history, new_history), start=1):
        for key in sorted(set(a) | set(b)):
            if key.startswith(("time/", "memory/")):
                continue  # wall-clock and memory figures legitimately vary
            if not _same(a.get(key), b.get(key)):
                differences.append(f"epoch {epoch} {key}: {a.get(key)!r} -> {b.get(key)!r}")
    differences += _provenance_changes(old, new)
    return differences


def _provenance_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    old_git, new_git = old.get("git") or {}, new.get("git") or {}
    for key in ("commit", "dirty"):
        if old_git.get(key) != new_git.get(key):
            changes.append(f"git {key}: {old_git.get(key)!r} -> {new_git.get(key)!r}")
    old_pkgs, new_pkgs = old.get("packages") or {}, new.get("packages") or {}
    for name in sorted(set(old_pkgs) | set(new_pkgs)):
        if old_pkgs.get(name) != new_pkgs.get(name):
            changes.append(f"package {name}: {old_pkgs.get(name)} -> {new_pkgs.get(name)}")
    return changes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def reproduce(run_dir: Path, output: Path | None = None, *, epochs: int | None = None) -> tuple[Path, list[str]]:
    """Re-run `run_dir` (its first `epochs` epochs, or all) into `output` (default: a sibling
    `<name>_reproduced_<time>`); returns the differences."""
    from samft.runner import run_training

    run_dir = run_dir.resolve()
    old_summary_path = run_dir / "summary.json"
    if not old_summary_path.exists():
        raise UserError(f"{run_dir} has no summary.json to compare with; did the run finish?")
    old = json.loads(old_summary_path.read_text())
    cfg = saved_config(run_dir)
    pin_thread_count(cfg, old)
    if epochs is not None:
        if epochs < 1:
            raise UserError(f"--epochs {epochs}: give a number of epochs >= 1")
        cfg.stop_after_epoch = epochs
    output = output or run_dir.with_name(f"{run_dir.name}_reproduced_{datetime.now():%Y-%m-%d_%H-%M-%S}")
    if output.exists():
        raise UserError(f"--output {output} exists; name a new folder")
    output.mkdir(parents=True)
    _log_to(output / "train.log")
    OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(cfg))), output / "reproduced_config.yaml")
    run_training(cfg, output)
    new = json.loads((output / "summary.json").read_text())
    return output, compare(old, new, epochs=epochs)


def _log_to(path: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(path)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samft.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by samft.train")
    parser.add_argument("--output", type=Path, default=None, help="where the re-run goes (must not exist)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="re-run and compare only the first N epochs (the original schedule is kept)")
    args = parser.parse_args(argv)
    try:
        output, differences = reproduce(args.run_dir, args.output, epochs=args.epochs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"re-run directory: {output}")
    if not differences:
        scope = "" if args.epochs is None else f" over the first {args.epochs} epoch(s)"
        print(f"reproduced{scope}: identical metrics, same git commit and package versions")
        return 0
    print(f"{len(differences)} difference(s) from {args.run_dir}:")
    for line in differences:
        print(f"  {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
