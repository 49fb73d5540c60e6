"""Forward+backward time and peak memory of samft's SAM-Med3D against medim's, at equal outputs, on CPU.

    python benchmarks/model_vs_medim.py --size full --repeats 2     # the released architecture
    python benchmarks/model_vs_medim.py --size tiny --repeats 1     # a reduced width/depth smoke run

Both networks get the same random weights. Each runs in its own fresh process (so one cannot inherit the
other's heap) with glibc told to mmap large blocks (so freed memory leaves RSS at once). Memory is the peak
RSS above the pre-step level during the first forward+backward, sampled every millisecond by psutil; time
is the median of the following `--repeats` steps. A step is image encoder + prompt encoder + mask decoder
with 3 points and a mask prompt, then backward of a weighted sum of the low-resolution logits.
Printed: ours/medim ratios (goal: time <= 1/1.5, memory <= 0.7) with machine, date and git commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
MEDIM_ARGS = {
    "full": {},
    "tiny": dict(encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=[1, 3],
                 prompt_embed_dim=48),
}


def build(kind: str, size: str, *, gradient_checkpointing: bool) -> torch.nn.Module:
    if kind == "medim":
        import medim

        return medim.create_model("SAM-Med3D", pretrained=False, **MEDIM_ARGS[size])
    from samft.model import REGISTRY, build_sam

    spec = REGISTRY["sam_med3d"]
    if size == "tiny":  # medim's decoder sizes are fixed, so only the encoder and prompt width shrink
        spec = dataclasses.replace(spec, encoder_dim=96, encoder_depth=4, encoder_heads=4,
                                   global_attn_indexes=(1, 3), prompt_dim=48)
    return build_sam(spec, gradient_checkpointing=gradient_checkpointing)


def step(kind: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward+backward; returns (embedding, low-res logits), detached."""
    points = (inputs["coords"], inputs["labels"])
    if kind == "medim":
        embedding = model.image_encoder(inputs["image"])
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=inputs["mask"])
        logits, _ = model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    else:
        embedding = model.encode(inputs["image"])
        logits = model.decode(embedding, points=points, mask_prompt=inputs["mask"])
    (logits * inputs["weights"]).sum().backward()
    model.zero_grad(set_to_none=True)
    return embedding.detach(), logits.detach()


def peak_rss_during(fn):
    """(fn(), peak RSS above the starting RSS in bytes), RSS sampled every millisecond."""
    proc, peak, done = psutil.Process(), [0], threading.Event()
    start = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], proc.memory_info().rss) - start


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build(args.worker, args.size, gradient_checkpointing=args.gradient_checkpointing)
    state = torch.load(args.weights, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("representation_head", "ich_head")) for k in missing)
    inputs = torch.load(args.inputs, weights_only=True)
    model.train()
    (embedding, logits), peak = peak_rss_during(lambda: step(args.worker, model, inputs))
    torch.save({"embedding": embedding, "logits": logits}, args.outputs)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(args.worker, model, inputs)
        times.append(time.perf_counter() - start)
    print(json.dumps({"peak_bytes": peak, "times": times}))


def randomised_weights(size: str) -> dict[str, torch.Tensor]:
    """medim's default init with the zero/one-initialised tensors (position tables, norms) randomised."""
    torch.manual_seed(0)
    model = build("medim", size, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model.state_dict()


def make_inputs(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {
        "image": torch.randn(batch, 1, 128, 128, 128, generator=gen),
        "coords": torch.randint(0, 128, (batch, 3, 3), generator=gen).float(),
        "labels": torch.tensor([1, 0, 1]).repeat(batch, 1),
        "mask": torch.randn(batch, 1, 32, 32, 32, generator=gen),
        "weights": torch.randn(batch, 1, 32, 32, 32, generator=gen),
    }


def run_worker(kind: str, args: argparse.Namespace, files: dict[str, Path]) -> dict:
    out = files["tmp"] / f"{kind}_outputs.pt"
    cmd = [sys.executable, __file__, "--worker", kind, "--size", args.size, "--repeats", str(args.repeats),
           "--weights", str(files["weights"]), "--inputs", str(files["inputs"]), "--outputs", str(out)]
    if args.gradient_checkpointing and kind == "ours":
        cmd.append("--gradient-checkpointing")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{kind} worker failed:\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report.update(torch.load(out, weights_only=True))
    return report


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}; commit "
            f"{commit.stdout.strip() or 'none (no commits)'}{' + uncommitted changes' if dirty else ''}\n"
            f"machine {platform.node()}: {cpu}, {psutil.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
            f"torch {torch.__version__}, python {platform.python_version()}")


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = {"tmp": Path(tmp), "weights": Path(tmp) / "weights.pt", "inputs": Path(tmp) / "inputs.pt"}
        torch.save(randomised_weights(args.size), files["weights"])
        torch.save(make_inputs(args.batch), files["inputs"])
        medim_report = run_worker("medim", args, files)
        ours = run_worker("ours", args, files)

    diffs = {k: (ours[k] - medim_report[k]).abs().max().item() for k in ("embedding", "logits")}
    t_ours, t_medim = statistics.median(ours["times"]), statistics.median(medim_report["times"])
    m_ours, m_medim = ours["peak_bytes"], medim_report["peak_bytes"]
    print(machine())
    print(f"size {args.size}, batch {args.batch}, fp32, forward+backward, median of {args.repeats} "
          f"(gradient checkpointing: {'on' if args.gradient_checkpointing else 'off'})")
    print(f"equal outputs: max |diff| embedding {diffs['embedding']:.2e}, low-res logits {diffs['logits']:.2e}")
    print(f"time   medim {t_medim:8.2f} s   ours {t_ours:8.2f} s   speed-up {t_medim / t_ours:5.2f}x  (goal >= 1.5x)")
    print(f"memory medim {m_medim / 2**20:8.0f} MiB ours {m_ours / 2**20:8.0f} MiB ratio    "
          f"{m_ours / m_medim:5.2f}x  (goal <= 0.7x)")
    if max(diffs.values()) > 1e-4:
        sys.exit("outputs differ by more than 1e-4: the comparison is not at equal outputs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward+backward steps per model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="run ours with checkpointing")
    parser.add_argument("--worker", choices=("ours", "medim"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--outputs", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        worker(cli)
    else:
        main(cli)
