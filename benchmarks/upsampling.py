"""SAM-Med3D's output upsampling, forward + backward: samft's `trilinear_resize` against `F.interpolate`.

    python benchmarks/upsampling.py                  # the refinement head's sizes, batch 2, 20 repeats
    python benchmarks/upsampling.py --repeats 2      # smoke run

The mask decoder's 32^3 logits and the refinement head's 64^3 correction are upsampled to the 128^3 crop in every
training step (and the 32^3 logits to the head's 64^3 grid). `trilinear_resize` computes the same trilinear
interpolation (align_corners=False) as three matrix products; the baseline is `F.interpolate(mode="trilinear")`
in the same process on the same tensors. Printed per size: the largest difference of the outputs and of the
input gradients, and the median forward + backward time of each as a ratio (lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import header, ratio_line

from samft.model.layers import trilinear_resize

SIZES = ((32, 128), (64, 128), (32, 64))


def median_seconds(resize, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward + backward of `resize(x)`, after one untimed warm-up."""
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        resize(x).backward(grad)
        if index:
            times.append(time.perf_counter() - start)
        x.grad = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(header(__file__))
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.repeats} repeats, median fwd + bwd")
    generator = torch.Generator().manual_seed(0)
    for source, target in SIZES:
        x = torch.randn(args.batch, 1, source, source, source, generator=generator, requires_grad=True)
        grad = torch.randn(args.batch, 1, target, target, target, generator=generator)
        size = (target,) * 3
        matrices = lambda v, size=size: trilinear_resize(v, size)  # noqa: E731
        library = lambda v, size=size: F.interpolate(v, size=size, mode="trilinear", align_corners=False)  # noqa: E731
        ours, theirs = matrices(x), library(x)
        ours_grad, theirs_grad = (torch.autograd.grad(y, x, grad)[0] for y in (ours, theirs))
        print(f"{source}^3 -> {target}^3: largest difference {(ours - theirs).abs().max().item():.2e} (output), "
              f"{(ours_grad - theirs_grad).abs().max().item():.2e} (gradient)")
        print(ratio_line(f"{source}^3 -> {target}^3 trilinear_resize / F.interpolate",
                         median_seconds(matrices, x, grad, args.repeats) * 1e3,
                         median_seconds(library, x, grad, args.repeats) * 1e3, unit="ms"))


if __name__ == "__main__":
    main()
