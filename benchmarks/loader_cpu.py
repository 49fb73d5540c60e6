"""CPU time the training loader's worker spends per batch, from the memory cache: samft's loader against the same
loader as it was before (the cache deep-copied for every sample, the label cast to float32 after the crop).

    python benchmarks/loader_cpu.py                                   # 6 head CTs of 512 x 512 x 30, batch 2
    python benchmarks/loader_cpu.py --size 96 --slices 12 --roi 32 --epochs 1   # smoke run

On a machine whose cores the training step keeps busy (two cores, two torch threads), the worker's CPU time is
taken from the step, so it is the figure that matters, not the loader's wall time. Both loaders are built by
`build_dataloaders` on the same generated volumes (benchmarks/preprocessing.py's phantoms) with the realistic
recipe's pipeline (1.5 mm, foreground-oversampled crops, flips and intensity augmentation); the baseline differs
only in MONAI's default `copy_cache=True` and a float32 cast of the label after the crop. The variants alternate
epoch by epoch. Printed: the worker CPU milliseconds per batch of each, as a ratio (lower is better), and whether
the two yield the same batches once the label is cast.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psutil
import torch
from common import header, ratio_line
from monai.transforms import Lambdad
from preprocessing import write_volumes

from samft.data.datamodule import build_dataloaders
from samft.data.transforms import ForegroundOversampledCropd, Preprocessing, as_float32


def as_before(loader: torch.utils.data.DataLoader) -> None:
    """Turn samft's training loader back into the earlier one: deep-copy the cached sample before the random
    transforms and cast the label to float32 right after the crop."""
    cached = loader.dataset.dataset  # SeededSamples over the CacheDataset
    cached.copy_cache = True
    steps = cached.transform.transforms
    crop = next(i for i, t in enumerate(steps) if isinstance(t, ForegroundOversampledCropd))
    cached.transform.transforms = (*steps[:crop + 1], Lambdad(keys="label", func=as_float32), *steps[crop + 1:])


def worker_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children (the loader workers)."""
    return sum(sum(child.cpu_times()[:2]) for child in psutil.Process().children(recursive=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane voxels (size x size)")
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--n", type=int, default=6, help="number of volumes")
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per loader (alternating)")
    args = parser.parse_args()
    print(header(__file__))
    with tempfile.TemporaryDirectory(prefix="samft-bench-") as tmp:
        records, _ = write_volumes(Path(tmp), n=args.n, size=args.size, slices=args.slices)
        settings = Preprocessing(roi_size=args.roi)
        loaders = {}
        for name in ("samft", "before"):
            loaders[name] = build_dataloaders(train_records=records, val_records=records[:1], preprocessing=settings,
                                              batch_size=args.batch, num_workers=1, cache="memory", seed=0).train
        as_before(loaders["before"])
        print(f"torch threads {torch.get_num_threads()}, {args.n} volumes {args.size}x{args.size}x{args.slices}, "
              f"crop {args.roi}^3, batch {args.batch}, 1 worker, memory cache, {args.epochs} epochs each")
        seconds = {name: 0.0 for name in loaders}
        batches = {name: 0 for name in loaders}
        same = True
        for epoch in range(args.epochs):
            epoch_batches = {}
            for name in (("samft", "before") if epoch % 2 == 0 else ("before", "samft")):
                loaders[name].sampler.set_epoch(epoch)
                start = worker_cpu_seconds()
                epoch_batches[name] = list(loaders[name])
                seconds[name] += worker_cpu_seconds() - start
                batches[name] += len(epoch_batches[name])
            same &= all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"].float(), b["label"])
                        for a, b in zip(epoch_batches["samft"], epoch_batches["before"], strict=True))
        ours, before = (1e3 * seconds[name] / batches[name] for name in ("samft", "before"))
        print(ratio_line("loader worker CPU per batch, samft / before", ours, before, unit="ms"))
        print(f"same batches once the label is cast: {same}")


if __name__ == "__main__":
    main()
