"""One AdamW update of tiny SAM-Med3D as `experiment=realistic_ich` builds it: samft's fused AdamW
(`samft.engine.build_optimizer`) against torch's default per-tensor AdamW, on the same parameters and gradients.

    python benchmarks/optimizer.py                  # the realistic recipe's model
    python benchmarks/optimizer.py --repeats 2      # smoke run

Both optimisers take the run's parameter groups and settings and step alternately from the same weights; after
the timed steps both copies are compared. Printed: the parameter count, the median step times as a ratio (lower
is better) and the largest weight difference between the two after the same updates.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import header, ratio_line

from samft.engine import build_optimizer
from samft.model import REGISTRY, param_groups
from samft.model.build import build_sam

LR, WEIGHT_DECAY = 1e-3, 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(header(__file__))
    torch.manual_seed(0)
    model = build_sam(REGISTRY["sam_med3d_tiny"], refine=True, refine_full_resolution=True, refine_norm="batch",
                      refine_crop=64, refine_cell_mlp=16)
    models = {"fused": model, "default": copy.deepcopy(model)}
    optimizers = {
        "fused": build_optimizer(param_groups(models["fused"], lr=LR, weight_decay=WEIGHT_DECAY, encoder_lr_mult=1.0),
                                 lr=LR, weight_decay=WEIGHT_DECAY),
        "default": torch.optim.AdamW(param_groups(models["default"], lr=LR, weight_decay=WEIGHT_DECAY,
                                                  encoder_lr_mult=1.0), lr=LR, weight_decay=WEIGHT_DECAY),
    }
    parameters = [p for p in model.parameters() if p.requires_grad]
    print(f"torch threads {torch.get_num_threads()}, {len(parameters)} parameter tensors, "
          f"{sum(p.numel() for p in parameters):,} weights, {args.repeats} steps each (alternating), median step")
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats):
        gradients = [torch.randn_like(p) for p in parameters]
        for name in (list(models) if repeat % 2 == 0 else list(reversed(models))):
            for p, g in zip((p for p in models[name].parameters() if p.requires_grad), gradients):
                p.grad = g.clone()
            start = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - start)
    fused, default = (statistics.median(times[name]) for name in ("fused", "default"))
    print(ratio_line("AdamW step, fused / default", fused * 1e3, default * 1e3, unit="ms"))
    difference = max((a - b).abs().max().item() for a, b in zip(models["fused"].parameters(),
                                                                models["default"].parameters()))
    print(f"largest weight difference after {args.repeats} updates: {difference:.3g}")


if __name__ == "__main__":
    main()
