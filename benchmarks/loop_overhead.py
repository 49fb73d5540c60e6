"""Training-loop overhead: samft's Trainer against a bare hand-written PyTorch loop doing the same updates.

    python benchmarks/loop_overhead.py                                  # sam_med3d_tiny at 128^3, fp32 and bf16
    python benchmarks/loop_overhead.py --size tiny --rounds 1 --windows 1   # smoke run (32^3 model)

Both loops get the same model (identical initial weights), the same AdamW over samft's parameter groups, the
same click-generator seed and the same batches: pre-made tensors in memory, handed out by a DataLoader with
batch_size=None (no collation, no copies), so data loading is excluded. Timed per epoch of `--windows`
optimiser updates of `--accum` micro-batches of `--batch` samples, with `--clicks` click rounds per forward:

- samft: `Trainer._train_epoch`, the epoch body that `Trainer.fit` runs (model.train(), loader seeding, the
  accumulation windows; per micro-batch: plain-tensor/device move, one autocast around `model.segment` and
  SegmentationLoss, `loss.item()` and the finiteness check, GradScaler (disabled for fp32/bf16), backward; per
  window: unscale, the gradient norm and its finiteness check (a host read), clipping, optimiser step,
  zero_grad, schedule rule, step/event/progress bookkeeping;
  the epoch's throughput meter). Not timed: validation, checkpoint, curves and summary (`_end_epoch`, once
  per epoch, proportional to the validation set and model size, not to the number of steps).
- bare: for each micro-batch, one autocast around the same `model.segment` + SegmentationLoss, loss / accum,
  backward; every `accum` micro-batches clip_grad_norm_, optimiser step, zero_grad. Nothing else.

The loops do identical arithmetic (printed: the largest parameter difference between their models at the end).
A control, a second bare loop on a third copy of the model, shows how far two identical loops differ on this
machine (the resolution of the measurement). Each round times one epoch of each loop, the order rotating from
round to round; the figures are medians over rounds after one untimed warm-up epoch each, of the wall time and
of the process's CPU time (all threads; less disturbed by other processes on a shared machine, where
`--threads 1` also spares OpenMP threads from waiting for each other).
Goal: samft <= 1.05x the bare loop.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import header, load_average, ratio_line, small_sam_spec
from torch.utils.data import DataLoader

from samft.engine import Trainer, TrainSettings, build_optimizer, build_scheduler
from samft.engine.interrupts import GracefulInterrupt
from samft.engine.losses import SegmentationLoss
from samft.engine.monitor import Progress
from samft.model import build_model, build_sam, param_groups

GOAL = 1.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR, WEIGHT_DECAY, ICH_WEIGHT = 1e-4, 1e-4, 0.1


def make_batches(n: int, *, batch: int, size: int, device: torch.device) -> list[dict[str, Any]]:
    """n batch dicts as the data module makes them (image B x 1 x S^3 normalised, label B x 1 x S^3 in {0, 1},
    ich B, case_id); samples alternate between one with a bright lesion cube and one with an empty mask."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        label = torch.zeros(batch, 1, size, size, size)
        for b in range(batch):
            if (i * batch + b) % 2 == 0:
                x, y, z = torch.randint(0, size - size // 4, (3,), generator=gen).tolist()
                label[b, :, x : x + size // 4, y : y + size // 4, z : z + size // 4] = 1.0
        image = torch.randn(batch, 1, size, size, size, generator=gen) + 2.0 * label
        batches.append({"image": image.to(device), "label": label.to(device),
                        "ich": label.flatten(1).amax(1).to(device), "case_id": [f"c{i}_{b}" for b in range(batch)]})
    return batches


def bare_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
               loss_fn: SegmentationLoss, generator: torch.Generator, args: argparse.Namespace) -> None:
    """The hand-written loop: autocast, accumulation, clipping, nothing else."""
    model.train()
    device = next(model.parameters()).device
    for index, batch in enumerate(loader, start=1):
        with torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=args.precision != "fp32"):
            output = model.segment(batch["image"], target=batch["label"], num_clicks=args.clicks, generator=generator)
            loss = loss_fn(output, batch["label"], batch["ich"]) / args.accum
        loss.backward()
        if index % args.accum == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, lr=LR, weight_decay=WEIGHT_DECAY, encoder_lr_mult=1.0)
    return build_optimizer(groups, lr=LR, weight_decay=WEIGHT_DECAY)


def loss_on(device: torch.device) -> SegmentationLoss:
    """The bare loops' loss, with its BCE pos_weight on `device` (as the Trainer moves its own)."""
    return SegmentationLoss(ich_weight=ICH_WEIGHT).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LOOPS = ("samft", "bare", "control")


def compare(args: argparse.Namespace, run_dir: Path) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Per-round epoch seconds ({"wall"|"cpu": {loop: [...]}} for the LOOPS) and the largest parameter difference
    of the samft and control models from the bare loop's after the last round."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_sam(small_sam_spec()) if args.size == "tiny" else build_model(name="sam_med3d_tiny")
    models = {"samft": model, "bare": copy.deepcopy(model).to(device), "control": copy.deepcopy(model).to(device)}
    optimizers = {name: optimizer_for(m) for name, m in models.items()}
    loader = DataLoader(make_batches(args.windows * args.accum, batch=args.batch, size=model.img_size, device=device),
                        batch_size=None)
    settings = TrainSettings(epochs=args.rounds + 1, seed=0, grad_accum_steps=args.accum,
                             max_grad_norm=args.max_grad_norm, precision=args.precision, device=args.device,
                             train_clicks=args.clicks, ich_loss_weight=ICH_WEIGHT, progress=False)
    trainer = Trainer(model=model, optimizer=optimizers["samft"], val_loader=loader, train_loader=loader,
                      settings=settings, run_dir=run_dir,
                      schedule=build_scheduler("plateau", optimizers["samft"], epochs=settings.epochs,
                                               steps_per_epoch=1))
    loss_fn = loss_on(device)
    clicks = {name: torch.Generator(device=device).manual_seed(0) for name in ("bare", "control")}
    progress = Progress(epochs=settings.epochs, done=0, enabled=False)
    interrupt = GracefulInterrupt()  # not entered: never requested

    def run(name: str, epoch: int) -> None:
        if name == "samft":
            if trainer._train_epoch(epoch, interrupt, progress) is not None:
                sys.exit("samft's epoch stopped early (a failed step?): the comparison is void")
        else:
            bare_epoch(models[name], optimizers[name], loader, loss_fn=loss_fn, generator=clicks[name], args=args)

    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in LOOPS} for clock in ("wall", "cpu")}
    for epoch in range(args.rounds + 1):
        shift = epoch % len(LOOPS)
        for name in LOOPS[shift:] + LOOPS[:shift]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            run(name, epoch + 1)
            synchronize(device)
            if epoch:  # epoch 0 warms up all
                times["wall"][name].append(time.perf_counter() - wall)
                times["cpu"][name].append(time.process_time() - cpu)
    progress.close()
    bare_state = models["bare"].state_dict()
    diff = max((value - bare_state[key]).abs().max().item()
               for name in ("samft", "control") for key, value in models[name].state_dict().items())
    return times, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="full",
                        help="full: sam_med3d_tiny at its 128^3 input; tiny: a 32^3, 2-block model for smoke runs")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32, bf16, fp16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="samples per micro-batch")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimiser update")
    parser.add_argument("--windows", type=int, default=1, help="optimiser updates per timed epoch")
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs of each loop (after one warm-up)")
    parser.add_argument("--clicks", type=int, default=3, help="click rounds per training forward (model default)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(header(__file__))
    print(f"model {'sam_med3d_tiny at 128^3' if args.size == 'full' else 'small 32^3 SAM (smoke)'}, device "
          f"{args.device}, torch threads {torch.get_num_threads()}; epoch = {args.windows} updates x {args.accum} "
          f"micro-batches x {args.batch} samples, {args.clicks} click rounds, clip {args.max_grad_norm}, AdamW; "
          f"median of {args.rounds} rounds")
    for precision in args.precisions.split(","):
        args.precision = precision
        with tempfile.TemporaryDirectory(prefix="samft-loop-") as tmp:
            times, diff = compare(args, Path(tmp))
        print(f"{precision}: max |parameter difference| from the bare loop's model after {args.rounds + 1} epochs "
              f"{diff:.1e}; load average {load_average()}")
        for clock, label in (("wall", "wall time"), ("cpu", "CPU time")):
            medians = {name: statistics.median(values) for name, values in times[clock].items()}
            for name in ("samft", "control"):
                pairs = " ".join(f"{x / b:.3f}" for x, b in zip(times[clock][name], times[clock]["bare"]))
                print(f"  {label}: {name} {medians[name]:.3f} s, bare loop {medians['bare']:.3f} s per epoch; "
                      f"per-round ratios {pairs}")
            print(ratio_line(f"samft Trainer / bare loop, {precision}, {label}", medians["samft"], medians["bare"],
                             unit="s", goal=GOAL))
            print(ratio_line(f"control / bare loop (two identical loops: the noise), {precision}, {label}",
                             medians["control"], medians["bare"], unit="s"))

if __name__ == "__main__":
    main()
