"""From the data settings to checked sample records: pick the source, pre-flight it, compute statistics."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samft.data import sources
from samft.data.demo import default_demo_dir, ensure_demo_dataset
from samft.data.preflight import preflight
from samft.data.stats import format_stats

log = logging.getLogger("samft.data")


@dataclass(frozen=True)
class DataBundle:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    warnings: list[str]
    stats: dict[str, Any]
    norm_stats: dict[str, float] | None


def source_records(data: Any, *, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and validation records for `data.source` (the `data` config section)."""
    if data.source == "demo":
        n, demo_seed = data.demo_patients, data.demo_seed
        root = Path(data.demo_dir) if data.demo_dir else default_demo_dir(seed=demo_seed, n_patients=n)
        train_csv, val_csv, mask_dir = ensure_demo_dataset(root=root, n_patients=n, seed=demo_seed)
        return sources.csv_records(train_csv, val_csv, mask_dir)
    if data.source == "csv":
        return sources.csv_records(Path(data.train_csv), Path(data.val_csv), Path(data.mask_dir))
    if data.source == "ct_ich":
        return sources.ct_ich_records(
            Path(data.root), val_fraction=data.val_fraction, seed=seed,
            split_file=Path(data.split_file) if data.split_file else None,
        )
    return sources.nifti_folder_records(
        Path(data.image_dir), Path(data.label_dir), val_fraction=data.val_fraction, seed=seed
    )


def load_records(data: Any, *, seed: int, run_dir: Path) -> DataBundle:
    """Read, check and describe the data; writes `stats.json` (train, val and all samples) into `run_dir`.

    The nnU-Net-style normalisation statistics come from the training split only.
    """
    train, val = source_records(data, seed=seed)
    report = preflight(train, val, on_bad_sample=data.on_bad_sample)
    for line in report.lines():
        log.warning(line)
    stats = {"all": report.stats(), "train": report.stats(report.train), "val": report.stats(report.val)}
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("dataset statistics:\n%s", format_stats(stats["all"]))
    return DataBundle(
        report.train, report.val, list(report.skipped), list(report.warnings), stats,
        stats["train"]["foreground_intensity"],
    )
