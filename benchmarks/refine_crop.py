"""One training step of tiny SAM-Med3D with the refinement head refining the whole crop against a box of it
(`model.refine_crop`).

    python benchmarks/refine_crop.py                         # the realistic recipe's step, 128^3, batch 2
    python benchmarks/refine_crop.py --size 64 --box 32 --repeats 1   # smoke run

The step is the one `experiment=realistic_ich` trains: a click round and a prompt-free round on the same
features, the head at full resolution, batch Dice + CE, backward. The baseline, in the same process on the same
batch, is the recipe's head refining the whole crop (instance norm); samft's variant refines a box of `--box`
voxels per crop (batch norm, `model.refine_crop`, `model.refine_norm=batch`). The encoder and the decoder run on
the whole crop in both. A third variant adds the head's per-voxel stage to the box step
(`model.refine_cell_mlp`, `--cell-mlp` hidden units), timed against the box step. Printed: each step's output
shape and the median step times as ratios (lower is better), the variants alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from common import header, ratio_line, realistic_step_batch

from samft.model import REGISTRY
from samft.model.build import build_sam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="crop edge (the released model: 128)")
    parser.add_argument("--box", type=int, default=64, help="the head's box edge (model.refine_crop)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cell-mlp", type=int, default=16, help="hidden units of the per-voxel stage")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(header(__file__))
    print(f"torch threads {torch.get_num_threads()}, crop {args.size}^3, box {args.box}^3, batch {args.batch}, "
          f"{args.repeats} repeats each (alternating, after one warm-up), median step")
    spec = dataclasses.replace(REGISTRY["sam_med3d_tiny"], img_size=args.size)
    variants = {}
    box_options = {"refine_norm": "batch", "refine_crop": args.box}
    for name, options in (("whole crop", {}), ("box", box_options),
                          ("box + cell MLP", {**box_options, "refine_cell_mlp": args.cell_mlp})):
        torch.manual_seed(0)
        variants[name] = build_sam(spec, refine=True, refine_full_resolution=True, **options).train()
    loss_fn, image, label, ich = realistic_step_batch(size=args.size, batch=args.batch)

    def step(model: torch.nn.Module) -> tuple[float, tuple[int, ...]]:
        """(seconds, logits shape) of one forward + backward."""
        model.zero_grad()
        start = time.perf_counter()
        out = model.segment(image, target=label, num_clicks=1, prompt_free=True,
                            generator=torch.Generator().manual_seed(1))
        loss_fn(out, label, ich).backward()
        return time.perf_counter() - start, tuple(out.logits[0].shape)

    for name, model in variants.items():  # warm-up
        print(f"{name}: logits {step(model)[1]}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
            times[name].append(step(variants[name])[0])
    whole, box, cells = (statistics.median(t) for t in times.values())
    print(ratio_line("training step, box / whole crop", box * 1e3, whole * 1e3, unit="ms"))
    print(ratio_line("training step, box + cell MLP / box", cells * 1e3, box * 1e3, unit="ms"))


if __name__ == "__main__":
    main()
