"""GPU readiness in one run: the checks a session with a CUDA device runs once (under 5 minutes), one JSON report.

    python benchmarks/gpu_smoke.py --out gpu_smoke.json                   # on a CUDA machine
    python benchmarks/gpu_smoke.py --device cpu --out gpu_smoke_cpu.json  # every check with a CPU form (< 3 min)

Checks (each "passed", "failed" or "skipped" with its reason, seconds and findings; exit status 1 if one failed):
- pytest_gpu: `pytest -m gpu` (CUDA only).
- mixed_precision: the model (sam_med3d_tiny at 128^3 on CUDA; the SMALL variant at 48^3 on CPU) trained by the
  Trainer in bf16 and fp16 with 2-step accumulation and clipping, every batch holding one empty and one
  non-empty target: steps done, no non-finite loss or gradient, finite weights that moved.
- attention: scaled_dot_product_attention's fused kernels (efficient and flash on CUDA, flash on CPU) against the
  math kernel, outputs and input gradients.
- injected_oom: an out-of-memory error in the first forward (a real CUDA allocation failure on CUDA, a raised
  torch.OutOfMemoryError on CPU) is skipped and training goes on.
- resume: a checkpoint saved on the device resumed on the CPU and on the device.
- seeded_runs: two seeded runs with deterministic algorithms, weights compared bitwise, torch's determinism
  warnings recorded (bit-equality is required on CPU only; on CUDA it is reported, see README).
- gpu_benchmark: `benchmarks/gpu.py --quick` (on CPU: the tiny model, one repeat), its report included.
- predict: a one-epoch smoke run and `samft.predict` on the device, on a synthetic head CT; on CUDA also with
  `precision=bf16 sw_batch_size=4`, whose mask must agree with the default's on 99 % of the voxels.
- ddp_oom: two ranks (NCCL on 2+ GPUs, gloo on CPU), grad_accum_steps=2, an OOM injected into rank 1's forward:
  both finish with equal weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from common import small_sam_spec
from loop_overhead import make_batches, optimizer_for
from torch.utils.data import DataLoader

from samft import distributed
from samft.engine import Trainer, TrainSettings, build_scheduler
from samft.engine.checkpoint import unwrap
from samft.engine.faults import inject_faults, out_of_memory_on
from samft.model import build_model, build_sam

REPO = Path(__file__).resolve().parents[1]
# 48, not SMALL's 32: torch 2.13's CPU bf16 Conv3d weight gradient is garbage (at times NaN) when the image is
# smaller than the kernel, as the encoder neck's 3^3 convolution on the 2^3 token grid of a 32^3 input is
CPU_SIZE = 48


class Skip(Exception):
    """A check without a form for this device."""


@dataclass
class Context:
    device: torch.device
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_model(ctx: Context) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name="sam_med3d_tiny") if ctx.cuda else build_sam(replace(small_sam_spec(), img_size=CPU_SIZE))


def make_trainer(ctx: Context, run_dir: Path, *, precision: str, epochs: int = 1, device: torch.device | None = None,
                 model: torch.nn.Module | None = None, windows: int = 2) -> Trainer:
    """The Trainer on the real model: `windows` updates of 2 micro-batches of 2 (one empty, one lesion target)."""
    device = device or ctx.device
    model = model or make_model(ctx)
    optimizer = optimizer_for(model)
    size = unwrap(model).img_size
    train = DataLoader(samples(2 * windows, size=size), batch_size=2)
    val = DataLoader(samples(1, size=size), batch_size=2)
    settings = TrainSettings(epochs=epochs, seed=0, grad_accum_steps=2, max_grad_norm=1.0, precision=precision,
                             device=str(device), train_clicks=1, val_clicks=(1,), ich_loss_weight=0.1, progress=False)
    schedule = build_scheduler("plateau", optimizer, epochs=epochs, steps_per_epoch=windows)
    return Trainer(model=model, optimizer=optimizer, schedule=schedule, train_loader=train, val_loader=val,
                   settings=settings, run_dir=run_dir)


def samples(batches: int, *, size: int) -> list[dict[str, Any]]:
    """The samples of `batches` batches of 2 (loop_overhead's data: the first a lesion, the second empty)."""
    made = make_batches(batches, batch=2, size=size, device=torch.device("cpu"))
    return [{key: value[i] for key, value in batch.items()} for batch in made for i in range(2)]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# ---------------------------------------------------------------------------------------------- checks
def check_pytest_gpu(ctx: Context) -> dict[str, Any]:
    if not ctx.cuda:
        raise Skip("the gpu-marked tests need CUDA")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                          capture_output=True, text=True, timeout=240, check=False)
    expect(proc.returncode == 0, f"pytest -m gpu exited {proc.returncode}: {proc.stdout[-1500:]}")
    return {"summary": proc.stdout.strip().splitlines()[-1]}


def check_mixed_precision(ctx: Context) -> dict[str, Any]:
    found = {}
    for precision in ("bf16", "fp16"):
        trainer = make_trainer(ctx, ctx.work / f"amp_{precision}", precision=precision)
        before = weights(trainer.model)
        summary = trainer.fit()
        after = weights(trainer.model)
        expect(summary["global_step"] == 2,
               f"{precision}: {summary['global_step']} optimiser steps, expected 2 (events {summary['events']})")
        expect(summary["events"]["nonfinite_loss"] == summary["events"]["nonfinite_grad"] == 0,
               f"{precision}: non-finite losses or gradients {summary['events']}")
        expect(all(torch.isfinite(v).all() for v in after.values()), f"{precision}: non-finite weights")
        moved = max_difference(before, after)
        expect(moved > 0, f"{precision}: no weight changed")
        found[precision] = {"train_loss": summary["history"][0]["train/loss"], "max_weight_change": moved,
                            "events": summary["events"], "peak_memory_mb": summary["peak_memory_mb"]}
    return found


def check_attention(ctx: Context) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    # the image encoder's shape at 128^3: 8^3 tokens, 6 heads of 64 channels (batch 2)
    q, k, v = (torch.randn(2, 6, 512, 64, generator=gen).to(ctx.device, dtype).requires_grad_() for _ in range(3))

    def run(backend: SDPBackend) -> list[torch.Tensor]:
        for t in (q, k, v):
            t.grad = None
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.float().square().mean().backward()
        return [out.detach().float(), *(t.grad.detach().float() for t in (q, k, v))]

    reference = run(SDPBackend.MATH)
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION] if ctx.cuda else [SDPBackend.FLASH_ATTENTION]
    found = {}
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for backend in fused:
        got = run(backend)
        worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, reference))
        found[backend.name.lower()] = {"max_relative_difference": worst}
        expect(worst < tolerance, f"{backend.name} differs from MATH by {worst:.3g} (relative)")
    return found


def check_injected_oom(ctx: Context) -> dict[str, Any]:
    model = make_model(ctx)
    # on CUDA a real allocation failure: the caching allocator's state must recover from it
    inject_faults(model, out_of_memory_on(1, device=ctx.device))
    summary = make_trainer(ctx, ctx.work / "oom", precision="bf16", model=model, windows=3).fit()
    expect(summary["events"]["oom"] == 1 and summary["events"]["skipped_steps"] == 1, f"events {summary['events']}")
    expect(summary["global_step"] == 2 and summary["stop_reason"] == "completed", "training did not go on")
    return {"events": summary["events"]}


def check_resume(ctx: Context) -> dict[str, Any]:
    saved = ctx.work / "saved"
    # bf16 on CPU can turn a step non-finite (skipped), which would blur the step count this check compares
    precision = "bf16" if ctx.cuda else "fp32"
    make_trainer(ctx, saved, precision=precision, epochs=1).fit()
    targets = [torch.device("cpu"), ctx.device] if ctx.cuda else [torch.device("cpu")]
    found = {}
    for target in targets:
        run_dir = ctx.work / f"resumed_{target.type}"
        run_dir.mkdir()
        (run_dir / "latest_model.pth").write_bytes((saved / "latest_model.pth").read_bytes())
        trainer = make_trainer(ctx, run_dir, precision=precision, epochs=2, device=target)
        summary = trainer.fit(resume_from=run_dir / "latest_model.pth")
        expect(summary["epochs_run"] == 2 and summary["global_step"] == 4, f"resume on {target}: {summary}")
        found[f"{ctx.device.type}_to_{target.type}"] = {"global_step": summary["global_step"]}
    return found


def check_seeded_runs(ctx: Context) -> dict[str, Any]:
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    precision = "bf16" if ctx.cuda else "fp32"  # each device's default precision (bf16 on CPU is not bit-exact)
    try:
        runs, caught = [], []
        for index in range(2):
            with warnings.catch_warnings(record=True) as recorded:
                warnings.simplefilter("always")
                trainer = make_trainer(ctx, ctx.work / f"seeded_{index}", precision=precision)
                trainer.fit()
            runs.append(weights(trainer.model))
            caught += [str(w.message).splitlines()[0] for w in recorded if "determinis" in str(w.message)]
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    difference = max_difference(*runs)
    if not ctx.cuda:
        expect(difference == 0.0, f"two seeded CPU runs differ by {difference:g}")
    return {"precision": precision, "bit_equal": difference == 0.0, "max_weight_difference": difference,
            "determinism_warnings": sorted(set(caught))}


def check_gpu_benchmark(ctx: Context) -> dict[str, Any]:
    out = ctx.work / "gpu.json"
    args = ["--quick", "--out", str(out), "--device", ctx.device.type]
    if not ctx.cuda:
        args += ["--size", "tiny", "--warmup", "1", "--repeats", "1"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    expect(proc.returncode == 0, f"gpu.py exited {proc.returncode}: {proc.stderr[-1500:]}")
    return {"report": json.loads(out.read_text())}


def check_predict(ctx: Context) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    run_dir, env = ctx.work / "smoke_run", {**os.environ, "XDG_CACHE_HOME": str(ctx.work / "cache")}
    device = ctx.device.type
    steps = [
        ["samft.train", "experiment=smoke", "epochs=1", f"hardware.device={device}", f"hydra.run.dir={run_dir}",
         f"data.demo_dir={ctx.work / 'demo'}"],
        ["samft.predict", f"ckpt={run_dir / 'best_model.pth'}", f"input={ctx.work / 'scan.nii.gz'}",
         f"output={ctx.work / 'pred'}", f"device={device}", f"hydra.run.dir={ctx.work / 'predict_logs'}"],
    ]
    if ctx.cuda:  # inference under autocast with batched windows against the fp32 (TF32) default
        steps.append([*steps[1][:3], f"output={ctx.work / 'pred_bf16'}", f"device={device}", "precision=bf16",
                      "sw_batch_size=4", f"hydra.run.dir={ctx.work / 'predict_logs'}"])
    scan = np.random.default_rng(0).normal(35, 10, size=(90, 80, 40)).astype(np.int16)
    nib.save(nib.Nifti1Image(scan, np.diag([0.9, 0.9, 2.0, 1.0])), ctx.work / "scan.nii.gz")
    seconds = []
    for args in steps:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ctx.work, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        seconds.append(time.monotonic() - start)
        expect(proc.returncode == 0, f"{args[0]} exited {proc.returncode}: {proc.stderr[-1500:]}")
    mask = nib.load(ctx.work / "pred" / "scan_mask.nii.gz")
    expect(mask.shape == scan.shape, f"mask shape {mask.shape} != scan shape {scan.shape}")
    found = {"train_s": seconds[0], "predict_s": seconds[1], "mask_voxels": int(np.asarray(mask.dataobj).sum())}
    if ctx.cuda:
        bf16 = np.asarray(nib.load(ctx.work / "pred_bf16" / "scan_mask.nii.gz").dataobj)
        agree = float((bf16 == np.asarray(mask.dataobj)).mean())
        expect(agree > 0.99, f"bf16 autocast predict agrees with fp32 on {agree:.4f} of the voxels")
        found.update(predict_bf16_s=seconds[2], bf16_voxel_agreement=agree)
    return found


def ddp_body(work: str, device_type: str) -> dict[str, Any]:
    """One rank of the ddp_oom check: rank 1 runs out of memory in the forward of window 2's first micro-step."""
    rank = distributed.rank()
    device = distributed.cuda_device() if device_type == "cuda" else torch.device("cpu")
    ctx = Context(device=torch.device(device_type), work=Path(work))
    model = make_model(ctx).to(device)
    if rank == 1:
        inject_faults(model, out_of_memory_on(3))  # also its forward, which DDP calls
    wrapped = distributed.wrap_model(model, device=device, find_unused_parameters=model.has_unused_parameters)
    precision = "bf16" if device_type == "cuda" else "fp32"  # bf16 on CPU is not bit-exact, see seeded_runs
    trainer = make_trainer(ctx, Path(work) / f"ddp_{rank}", precision=precision, device=device, model=wrapped,
                           windows=3)
    summary = trainer.fit()
    gathered = distributed.all_gather(weights(trainer.model))
    nonfinite = sorted(key for key, value in gathered[0].items() if not torch.isfinite(value).all())
    return {"difference": max_difference(*gathered), "nonfinite_weights": nonfinite, "events": summary["events"],
            "steps": summary["global_step"]}


def check_ddp_oom(ctx: Context) -> dict[str, Any]:
    if ctx.cuda and torch.cuda.device_count() < 2:
        raise Skip("needs 2 GPUs (the CPU form runs with --device cpu)")
    backend = "nccl" if ctx.cuda else "gloo"
    found = distributed.spawn(ddp_body, args=(str(ctx.work), ctx.device.type), nprocs=2, backend=backend,
                              timeout_min=2)
    expect(found["difference"] == 0.0, f"ranks' weights differ by {found['difference']:g}")
    expect(found["events"]["skipped_steps"] == 1 and found["steps"] == 2, f"rank 0: {found}")
    return {"backend": backend, **found}


CHECKS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "pytest_gpu": check_pytest_gpu,
    "mixed_precision": check_mixed_precision,
    "attention": check_attention,
    "injected_oom": check_injected_oom,
    "resume": check_resume,
    "seeded_runs": check_seeded_runs,
    "gpu_benchmark": check_gpu_benchmark,
    "predict": check_predict,
    "ddp_oom": check_ddp_oom,
}


def run_check(name: str, ctx: Context) -> dict[str, Any]:
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            found = {"status": "passed", **CHECKS[name](ctx)}
    except Skip as reason:
        found = {"status": "skipped", "reason": str(reason)}
    except Exception as err:  # a failed check is reported, the others still run
        found = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc()[-3000:]}
    if ctx.cuda:
        torch.cuda.empty_cache()
    return {**found, "seconds": round(time.monotonic() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; run with --device cpu for the checks that have a CPU form")
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        sys.exit(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    report: dict[str, Any] = {
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "gpus": torch.cuda.device_count() if args.device == "cuda" else 0, "torch": torch.__version__,
        "python": platform.python_version(), "checks": {},
    }
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as work:
        for name in names:
            check_dir = Path(work) / name
            check_dir.mkdir()
            report["checks"][name] = run_check(name, Context(device=torch.device(args.device), work=check_dir))
            report["seconds"] = round(time.monotonic() - start, 2)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every check: a crash keeps the rest
            print(f"{name}: {report['checks'][name]['status']} ({report['checks'][name]['seconds']} s)", flush=True)
    failed = [name for name, found in report["checks"].items() if found["status"] == "failed"]
    print(f"report: {args.out}; {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{report['seconds']} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
