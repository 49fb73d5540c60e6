"""One training step of tiny SAM-Med3D with the refinement head: its split first convolution against MONAI's UNet
on the concatenated inputs.

    python benchmarks/refinement_head.py                 # the realistic recipe's step, 128^3, batch 2, 10 repeats
    python benchmarks/refinement_head.py --size 64 --repeats 1   # smoke run

The step is the one `experiment=realistic_ich` trains: a click round and a prompt-free round on the same
features, the head at full resolution, batch Dice + CE, backward. `RefinementHead` convolves the CT, the coarse
logits and the click guidance apart (the CT's share once per step, the guidance only with clicks); the baseline,
in the same process on the same weights and batch, is the UNet applied to their concatenation in every round, as
the head did before. Printed: the loss of each and the largest weight-gradient difference (equal up to float
rounding), and the median step time of each as a ratio (lower is better), the two alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import header, ratio_line, realistic_step_batch
from monai.networks.utils import pixelshuffle, pixelunshuffle

from samft.model import REGISTRY
from samft.model.build import build_sam
from samft.model.heads import RefinementHead
from samft.model.layers import trilinear_resize


def concatenated_forward(head: RefinementHead, image: torch.Tensor, low_res: torch.Tensor,
                         clicks: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                         image_term: torch.Tensor | None = None, box: object = None) -> torch.Tensor:
    """The baseline: the head's UNet on cat(CT, coarse logits, guidance) in every round (image_term unused; box
    None, the whole crop, as this model trains)."""
    size, d = image.shape[2:], head.downsample
    grid = [s // d for s in size]
    small = pixelunshuffle(image, spatial_dims=3, scale_factor=d) if head.full_resolution else F.avg_pool3d(image, d)
    guidance = head.guidance(clicks, batch=image.shape[0], grid=grid, like=small)
    correction = head.net(torch.cat([small, trilinear_resize(low_res, grid), guidance], dim=1))
    refined = trilinear_resize(low_res, size) + trilinear_resize(correction[:, :1], size)
    if head.full_resolution:
        refined = refined + pixelshuffle(correction[:, 1:], spatial_dims=3, scale_factor=d)
    return refined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="crop edge (the released model: 128)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(header(__file__))
    print(f"torch threads {torch.get_num_threads()}, crop {args.size}^3, batch {args.batch}, {args.repeats} repeats "
          "each (alternating, after one warm-up), median step")
    torch.manual_seed(0)
    spec = dataclasses.replace(REGISTRY["sam_med3d_tiny"], img_size=args.size)
    model = build_sam(spec, refine=True, refine_full_resolution=True)
    output = [m for m in model.refiner.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)][-1]
    torch.nn.init.normal_(output.weight, std=0.01)  # a trained head's correction is not zero
    loss_fn, image, label, ich = realistic_step_batch(size=args.size, batch=args.batch)

    def step(forward: Callable[..., torch.Tensor]) -> tuple[float, float, torch.Tensor]:
        """(seconds, loss, flat weight gradient) of one forward + backward with the head's forward replaced."""
        model.refiner.forward = lambda *a, **k: forward(model.refiner, *a, **k)
        model.zero_grad()
        start = time.perf_counter()
        out = model.segment(image, target=label, num_clicks=1, prompt_free=True,
                            generator=torch.Generator().manual_seed(1))
        loss = loss_fn(out, label, ich)
        loss.backward()
        seconds = time.perf_counter() - start
        return seconds, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    variants = {"split first convolution": RefinementHead.forward, "UNet on the concatenation": concatenated_forward}
    results = {name: step(forward) for name, forward in variants.items()}  # warm-up, and the equality check
    (_, split_loss, split_grad), (_, plain_loss, plain_grad) = results.values()
    print(f"loss {split_loss:.6f} (split) / {plain_loss:.6f} (concatenation); largest weight-gradient difference "
          f"{(split_grad - plain_grad).abs().max().item():.2e} of largest {plain_grad.abs().max().item():.2e}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
            times[name].append(step(variants[name])[0])
    split, plain = (statistics.median(t) for t in times.values())
    print(ratio_line("training step, split first convolution / UNet on the concatenation", split * 1e3,
                     plain * 1e3, unit="ms"))


if __name__ == "__main__":
    main()
