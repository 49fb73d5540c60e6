"""Resampling a head CT to the model's spacing: samft's preprocessing (MONAI `Spacingd` in float32) against the same
pipeline with MONAI's default float64 resampling.

    python benchmarks/resampling.py                          # 512 x 512 x 29 at 0.49 x 0.49 x 5 mm -> 1.5 mm
    python benchmarks/resampling.py --size 64 --slices 8 --repeats 1   # smoke run

The deterministic part of the pipeline (`build_transforms(stage="val")`: read, orient, resample image and mask,
window) on one synthetic scan of HU values with a blob-shaped mask, as `.pkl` + `.nii.gz` files; the baseline is
the same pipeline object with its `Spacingd` set back to float64. It runs once per scan before training (and for
every scan `samft.predict` and `samft.evaluate` read). Printed: the median time of each (alternating, after one
warm-up each) as a ratio, the largest image difference and the mask voxels that differ (nearest-neighbour ties
that float32 rounding breaks the other way).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import header, ratio_line
from monai.transforms import Spacingd

from samft.data.transforms import build_transforms


def write_scan(folder: Path, *, size: int, slices: int) -> dict[str, str]:
    """A scan (HU, .pkl) and its mask (.nii.gz) at 0.49 x 0.49 x 5 mm; returns the pipeline's record."""
    rng = np.random.default_rng(0)
    hu = rng.normal(30, 20, size=(size, size, slices)).astype(np.int16)
    grid = np.indices(hu.shape).astype(np.float32)
    centre = np.array([size * 0.6, size * 0.4, slices / 2])[:, None, None, None]
    radii = np.array([size / 10, size / 14, max(slices / 6, 1.0)])[:, None, None, None]
    mask = (((grid - centre) / radii) ** 2).sum(axis=0) <= 1.0
    affine = np.diag([0.49, 0.49, 5.0, 1.0])
    image = folder / "scan.pkl"
    image.write_bytes(pickle.dumps(hu))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "scan.nii.gz")
    return {"image": str(image), "label": str(folder / "scan.nii.gz"), "ich": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane voxels of the scan")
    parser.add_argument("--slices", type=int, default=29)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(header(__file__))
    print(f"torch threads {torch.get_num_threads()}, scan {args.size} x {args.size} x {args.slices} at "
          f"0.49 x 0.49 x 5 mm -> 1.5 mm, {args.repeats} repeats each (alternating, after one warm-up), median")
    samft = build_transforms(stage="val")
    spacing = next(t for t in samft.transforms if isinstance(t, Spacingd))
    ours = spacing.dtype
    with tempfile.TemporaryDirectory() as tmp:
        record = write_scan(Path(tmp), size=args.size, slices=args.slices)

        def run(dtype: tuple) -> tuple[float, dict]:
            spacing.dtype = dtype
            start = time.perf_counter()
            out = samft(dict(record))
            return time.perf_counter() - start, out

        variants = {"float64": (np.float64,) * len(ours), "samft": ours}
        outputs = {name: run(dtype)[1] for name, dtype in variants.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
                times[name].append(run(variants[name])[0])
    image_diff = (outputs["samft"]["image"] - outputs["float64"]["image"]).abs().max().item()
    mask_diff = int((outputs["samft"]["label"] != outputs["float64"]["label"]).sum())
    in_mask = int(outputs["float64"]["label"].sum())
    print(f"resampled image {tuple(outputs['samft']['image'].shape)}, largest image difference {image_diff:.2g} "
          f"(window units), mask voxels that differ {mask_diff} of {in_mask} in the mask")
    print(ratio_line("preprocessing one scan, samft (float32) / float64", statistics.median(times["samft"]),
                     statistics.median(times["float64"]), unit="s"))


if __name__ == "__main__":
    main()
