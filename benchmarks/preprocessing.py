"""Preprocessing throughput: the first (uncached) epoch against cached epochs.

Generates realistic head CTs (default 6 volumes of 512 x 512 x 30 HU voxels, 0.45 x 0.45 x 5 mm, `.pkl` images
and `.nii.gz` masks as users have them) in a temporary folder and runs the training pipeline over them
(default settings: 1.5 mm, 128^3 crops, augmentation probability 0.3) through `build_dataloaders`:

- baseline ``cache=none``: every epoch reads, orients, resamples and normalises every volume again;
- ``cache=memory`` and ``cache=disk``: filled once, later epochs only crop and augment (train) or copy (val).

Prints volumes per second and the ratio (uncached epoch time / cached epoch time), the goal being >= 10x,
for the training loader (cached epochs still crop and augment every sample) and for the deterministic
preprocessing alone (the validation loader, whose crop is cached too).
Smoke run: ``python benchmarks/preprocessing.py --size 64 --slices 8 --n 2 --epochs 1``.
"""

from __future__ import annotations

import argparse
import datetime
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch

from samft.data.datamodule import build_dataloaders
from samft.data.demo import make_phantom
from samft.data.transforms import Preprocessing
from samft.devices import available_cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="in-plane voxels (size x size)")
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--n", type=int, default=6, help="number of volumes")
    parser.add_argument("--epochs", type=int, default=3, help="cached epochs timed per mode")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: time the main process)")
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument("--aug-prob", type=float, default=0.3, help="data.aug_prob (0: crops only)")
    parser.add_argument("--caches", default="memory,disk", help="cached modes to compare with cache=none")
    args = parser.parse_args()

    print(header())
    with tempfile.TemporaryDirectory(prefix="samft-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        records, spacing = write_volumes(folder, n=args.n, size=args.size, slices=args.slices)
        print(f"data: {args.n} volumes {args.size}x{args.size}x{args.slices} int16 HU, "
              f"{'x'.join(f'{s:.2f}' for s in spacing)} mm (generated in {time.perf_counter() - start:.1f} s); "
              f"pipeline: 1.5 mm, roi {args.roi}, aug_prob {args.aug_prob}, batch 1, workers {args.workers}")
        settings = Preprocessing(roi_size=args.roi, aug_prob=args.aug_prob)
        base = run_mode(records, settings, cache="none", epochs=2, workers=args.workers, cache_dir=None)
        for cache in args.caches.split(","):
            timed = run_mode(records, settings, cache=cache, epochs=args.epochs, workers=args.workers,
                             cache_dir=folder / "cache")
            for loader, what in (("train", "training loader (per-epoch crops and augmentation)"),
                                 ("val", "deterministic preprocessing (validation loader)")):
                ratio = base[loader] / timed[loader]
                print(f"  ratio cache={cache}, {what}: {base[loader]:.2f} s / {timed[loader]:.3f} s per epoch = "
                      f"{ratio:.1f}x (goal >= 10x: {'met' if ratio >= 10 else 'NOT met'})")


def run_mode(
    records: list[dict], settings: Preprocessing, *, cache: str, epochs: int, workers: int, cache_dir: Path | None
) -> dict[str, float]:
    """Mean seconds per train and per val epoch over all volumes, after a first epoch that fills the cache."""
    start = time.perf_counter()
    loaders = build_dataloaders(
        train_records=records, val_records=records, preprocessing=settings, batch_size=1,
        num_workers=workers, cache=cache, cache_dir=cache_dir, seed=0,
    )
    train, val = loaders.train, loaders.val
    fill = time.perf_counter() - start
    if cache != "none":
        fill += epoch_time(train) + epoch_time(val)  # the disk cache fills while the first epoch reads
    result = {"train": float(np.mean([epoch_time(train) for _ in range(epochs)])),
              "val": float(np.mean([epoch_time(val) for _ in range(epochs)]))}
    n = len(records)
    print(f"cache={cache}: " + (f"filling the cache (both loaders) {fill:.1f} s; " if cache != "none" else "")
          + f"train epoch {result['train']:.2f} s ({n / result['train']:.1f} volumes/s), "
          f"val epoch {result['val']:.2f} s ({n / result['val']:.1f} volumes/s)")
    return result


def epoch_time(loader) -> float:
    start = time.perf_counter()
    for _batch in loader:
        pass
    return time.perf_counter() - start


def header() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "none"
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"benchmarks/preprocessing.py  {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"machine: {platform.node()} {cpu}, {available_cpus()} CPUs; python {sys.version.split()[0]}, torch "
            f"{torch.__version__}, monai {monai.__version__}; git commit {commit}{' (+changes)' if dirty else ''}")


def write_volumes(folder: Path, *, n: int, size: int, slices: int) -> tuple[list[dict], tuple[float, ...]]:
    spacing = (0.45 * 512 / size, 0.45 * 512 / size, 5.0 * 30 / slices)  # same field of view at any size
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        phantom = make_phantom(rng, shape=(size, size, slices), spacing=spacing, n_bleeds=int(i % 3 != 2))
        image, label = folder / f"{i:03d}.pkl", folder / f"{i:03d}.nii.gz"
        image.write_bytes(pickle.dumps({"image": phantom.image, "affine": phantom.affine}, protocol=4))
        nib.save(nib.Nifti1Image(phantom.mask, phantom.affine), label)
        records.append({"image": str(image), "label": str(label), "ich": int(phantom.mask.any()),
                        "patient_id": f"p{i}", "case_id": f"{i:03d}", "origin": f"volume {i}"})
    return records, spacing


if __name__ == "__main__":
    main()
