"""GPU training step of the full-size model at 128^3: samples/s, peak memory and MFU, against medim's SAM-Med3D.

    python benchmarks/gpu.py --out gpu.json            # the whole table (batch 1, 2, 4, 8 x fp32, bf16, fp16)
    python benchmarks/gpu.py --quick --out gpu.json    # batch 2, bf16 and fp32, ours vs medim
    python benchmarks/gpu.py --device cpu --size tiny --batches 2 --repeats 1 --warmup 0 --out /tmp/g.json
                                                       # logic check on a CPU (a 32^3, 2-block model)

One step, the same for both implementations: image encoder on B x 1 x 128^3, prompt encoder with one positive
point per sample (no mask prompt), mask decoder (one mask), the B x 1 x 32^3 logits upsampled to 128^3, binary
cross-entropy against a target cube, backward, AdamW step, zero_grad; bf16/fp16 under autocast (fp16 with a
GradScaler), fp32 as PyTorch defaults it (TF32 off unless enabled).
Variants: ours (samft.model) with a trainable encoder, the same with gradient checkpointing, and with
`freeze_encoder()` (no encoder gradients, encoder under no_grad); medim (`medim.create_model("SAM-Med3D",
pretrained=False)`) trainable, and with its encoder's requires_grad off and run under no_grad.
Each row: a fresh copy of the model and a fresh optimiser, `--warmup` untimed steps, then the mean of `--repeats`
synchronised steps; peak memory is torch.cuda.max_memory_allocated over the row (weights, gradients, AdamW state,
activations). FLOPs: torch.utils.flop_counter.FlopCounterMode over one fp32 batch-1 step per implementation and
encoder state (matmuls, convolutions, attention: what each implementation executes; medim's windowed attention
pads the 8^3 token grid to 14^3 windows, so it executes more for the same outputs). Model FLOPs are our count
(the smaller; no recomputation for checkpointed rows), the same for both implementations, scaled by the batch;
MFU = model FLOPs per second / the card's dense bf16 peak (a table by device name, or --peak-tflops).
Ratios: our rows against medim's at the same batch, precision and encoder state.
Goal (issue 9): at batch 2 in bf16, samples/s >= 2x medim's and peak memory <= 0.6x.
The JSON (--out) and a markdown table beside it (.md) are rewritten after every row, so a run cut short keeps what
it measured; --budget-s stops starting rows after that many seconds. An out-of-memory row is recorded as OOM.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import MEDIM_SMALL, header, ratio_line, small_sam_spec
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in this order against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
GOAL_SPEED, GOAL_MEMORY = 2.0, 0.6


@dataclass(frozen=True)
class Variant:
    impl: str  # "ours" or "medim"
    frozen: bool = False
    checkpointing: bool = False


FULL_VARIANTS = (Variant("ours"), Variant("medim"), Variant("ours", checkpointing=True), Variant("ours", frozen=True),
                 Variant("medim", frozen=True))
QUICK_VARIANTS = (Variant("ours"), Variant("medim"))


def build_template(impl: str, *, checkpointing: bool, size: str) -> torch.nn.Module:
    """A freshly initialised model on the CPU; rows train deep copies of it."""
    torch.manual_seed(0)
    if impl == "medim":
        import medim

        with contextlib.redirect_stdout(io.StringIO()):  # medim prints "creating model ..."
            return medim.create_model("SAM-Med3D", pretrained=False, **(MEDIM_SMALL if size == "tiny" else {}))
    from samft.model import REGISTRY, build_sam  # here: samft.model imports MONAI, which takes seconds

    spec = small_sam_spec() if size == "tiny" else REGISTRY["sam_med3d"]
    return build_sam(spec, gradient_checkpointing=checkpointing)


def prepare(template: torch.nn.Module, variant: Variant, device: torch.device) -> torch.nn.Module:
    model = copy.deepcopy(template)
    if variant.frozen:
        if variant.impl == "ours":
            model.freeze_encoder()
        else:
            model.image_encoder.requires_grad_(False)
    return model.to(device).train()


def make_inputs(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    target = torch.zeros(batch, 1, size, size, size)
    target[:, :, size // 4 : size // 2, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    inputs = {"image": torch.randn(batch, 1, size, size, size, generator=gen) + target, "target": target,
              "coords": torch.full((batch, 1, 3), 3 * size / 8), "labels": torch.ones(batch, 1, dtype=torch.long)}
    return {k: v.to(device) for k, v in inputs.items()}


def low_res_logits(model: torch.nn.Module, variant: Variant, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """B x 1 x S/4 x S/4 x S/4 logits for one point prompt per sample."""
    points = (inputs["coords"], inputs["labels"])
    if variant.impl == "ours":
        return model.decode(model.encode(inputs["image"]), points=points)
    with torch.no_grad() if variant.frozen else contextlib.nullcontext():
        embedding = model.image_encoder(inputs["image"])
    sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
    logits, _ = model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=False)
    return logits


class Stepper:
    """One training step of `model` (see the module doc) with its own optimiser and scaler."""

    def __init__(self, model: torch.nn.Module, variant: Variant, precision: str, device: torch.device) -> None:
        self.model, self.variant, self.precision, self.device = model, variant, precision, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, inputs: dict[str, torch.Tensor]) -> None:
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
            logits = low_res_logits(self.model, self.variant, inputs)
            full = F.interpolate(logits, size=inputs["target"].shape[2:], mode="trilinear", align_corners=False)
            loss = F.binary_cross_entropy_with_logits(full.float(), inputs["target"])
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(template: torch.nn.Module, variant: Variant, *, batch: int, precision: str, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    model = prepare(template, variant, device)
    step = Stepper(model, variant, precision, device)
    inputs = make_inputs(batch, model.image_encoder.img_size, device)
    for _ in range(args.warmup):
        step(inputs)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        step(inputs)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"status": "ok", "step_s": seconds, "samples_per_s": batch / seconds, "peak_gib": peak}


def count_flops(template: torch.nn.Module, variant: Variant, device: torch.device) -> float:
    """FLOPs of one fp32 batch-1 step (forward, backward; the optimiser adds none that are counted)."""
    model = prepare(template, variant, device)
    step = Stepper(model, variant, "fp32", device)
    inputs = make_inputs(1, model.image_encoder.img_size, device)
    with FlopCounterMode(display=False) as counter:
        step(inputs)
    return float(counter.get_total_flops())


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def plan(args: argparse.Namespace) -> list[tuple[int, str, Variant]]:
    """Rows in measuring order: batch 2 bf16 (the goal) first, then by batch and precision."""
    variants = QUICK_VARIANTS if args.quick else FULL_VARIANTS
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    precisions = ["bf16", "fp32"] if args.quick else args.precisions.split(",")
    rows = list(product(batches, precisions, variants))
    return sorted(rows, key=lambda r: ((r[0], r[1]) != (2, "bf16"), r[0], precisions.index(r[1])))


def medim_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in rows if r["impl"] == "medim" and r["status"] == "ok" and r["frozen"] == row["frozen"]
                 and r["batch"] == row["batch"] and r["precision"] == row["precision"]), None)


def markdown(report: dict[str, Any]) -> str:
    lines = ["| implementation | encoder | grad ckpt | batch | precision | samples/s | vs medim | peak GiB | vs medim "
             "| MFU | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        base = medim_row(report["rows"], row) if row["impl"] == "ours" and row["status"] == "ok" else None
        ok = row["status"] == "ok"
        speed = f"{row['samples_per_s']:.2f}" if ok else ""
        memory = f"{row['peak_gib']:.2f}" if ok and row["peak_gib"] is not None else ("n/a" if ok else "")
        speed_ratio = f"{row['samples_per_s'] / base['samples_per_s']:.2f}x" if base else ""
        memory_ratio = (f"{row['peak_gib'] / base['peak_gib']:.2f}x"
                        if base and row["peak_gib"] is not None and base["peak_gib"] else "")
        mfu = f"{100 * row['mfu']:.3g}%" if row.get("mfu") is not None else ""
        lines.append(f"| {row['impl']} | {'frozen' if row['frozen'] else 'trained'} | "
                     f"{'on' if row['checkpointing'] else 'off'} | {row['batch']} | {row['precision']} | {speed} | "
                     f"{speed_ratio} | {memory} | {memory_ratio} | {mfu} | {row['status']} |")
    lines += ["", f"{flops_note(report)}; {report['warmup']} warm-up and {report['repeats']} timed steps a row"]
    return "\n".join(lines) + "\n"


def flops_note(report: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v:.4g}" for k, v in report["gflop_per_sample"].items())
    return (f"GFLOP per sample and step (FlopCounterMode): {counts}; dense bf16 peak "
            f"{report['peak_tflops'] or 'unknown'} TFLOP/s")


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"{report['header']}\n\n{markdown(report)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the markdown table goes beside it (.md)")
    parser.add_argument("--quick", action="store_true", help="batch 2, bf16 and fp32, ours vs medim only")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a 32^3 model for CPU checks")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--precisions", default="bf16,fp32,fp16")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (their mean counts)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu.py: no CUDA device is visible (torch {torch.__version__}); run it on a GPU machine, or check "
                 "its logic on a CPU with --device cpu --size tiny")

    started = time.perf_counter()
    print(header(__file__), flush=True)
    rows = plan(args)
    variants = list(dict.fromkeys(v for _, _, v in rows))
    templates = {(v.impl, v.checkpointing): build_template(v.impl, checkpointing=v.checkpointing, size=args.size)
                 for v in variants}
    flops = {}
    for variant in dict.fromkeys(Variant(v.impl, frozen=v.frozen) for v in variants):
        flops[variant] = count_flops(templates[variant.impl, False], variant, device)
        free(device)
    peak = peak_tflops(args, device)
    report: dict[str, Any] = {
        "header": header(__file__), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.size, "warmup": args.warmup, "repeats": args.repeats, "peak_tflops": peak,
        "gflop_per_sample": {f"{v.impl} {'frozen' if v.frozen else 'trained'}": f / 1e9 for v, f in flops.items()},
        "rows": [],
    }
    print(flops_note(report), flush=True)
    for batch, precision, variant in rows:
        row: dict[str, Any] = {"batch": batch, "precision": precision, **asdict(variant)}
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            row["status"] = "skipped (time budget)"
        else:
            try:
                row.update(measure(templates[variant.impl, variant.checkpointing], variant, batch=batch,
                                   precision=precision, args=args, device=device))
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as err:  # noqa: BLE001 - one broken row must not cost the rest of a GPU lease
                traceback.print_exc()
                row["status"] = f"error: {type(err).__name__}"
            free(device)
        if row["status"] == "ok":
            model_flops = batch * flops[Variant("ours", frozen=variant.frozen)]
            row["mfu"] = model_flops / row["step_s"] / (peak * 1e12) if peak else None
        report["rows"].append(row)
        write(report, args.out)
        shown = row["status"]
        if row["status"] == "ok":
            memory = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
            shown = f"{row['samples_per_s']:.2f} samples/s, peak memory {memory}"
        print(f"  {variant.impl:5s} {'frozen ' if variant.frozen else ''}{'ckpt ' if variant.checkpointing else ''}"
              f"batch {batch} {precision}: {shown}", flush=True)

    print(markdown(report))
    ours = next((r for r in report["rows"] if r["status"] == "ok" and r["impl"] == "ours" and not r["frozen"]
                 and not r["checkpointing"] and r["batch"] == 2 and r["precision"] == "bf16"), None)
    base = medim_row(report["rows"], ours) if ours else None
    if base is None:
        print("no ok batch-2 bf16 pair of ours and medim: no goal ratios")
        return
    print(ratio_line("ours / medim samples/s, batch 2 bf16", ours["samples_per_s"], base["samples_per_s"],
                     unit="samples/s", goal=GOAL_SPEED, higher_is_better=True))
    if ours["peak_gib"] is not None:
        print(ratio_line("ours / medim peak memory, batch 2 bf16", ours["peak_gib"], base["peak_gib"], unit="GiB",
                         goal=GOAL_MEMORY))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
