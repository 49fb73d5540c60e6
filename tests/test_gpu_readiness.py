"""The GPU code paths that a CPU can check: what `deterministic` promises per device, the torch floor the code
needs, benchmark tensors on the benchmark's device, and the DDP smoke runs kept on gloo where a GPU is visible."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers.standin import make_trainer, settings
from test_benchmarks_smoke import load
from test_distributed import SMOKE_DDP

from samft import distributed
from samft.devices import resolve_device
from samft.engine.determinism import guarantee
from samft.engine.monitor import EpochMeter

REPO = Path(__file__).resolve().parents[1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def test_summary_states_what_a_seeded_run_repeats_on_its_device(tmp_path: Path) -> None:
    summary = make_trainer(tmp_path, n_train=2, train_settings=settings(epochs=1)).fit()
    assert summary["determinism"]["device"] == "cpu" and summary["determinism"]["guarantee"].startswith("bit-exact")
    assert "not bit-exact" in guarantee(torch.device("cpu"), "bf16")["guarantee"]


@pytest.mark.parametrize("deterministic", [True, False])
def test_on_cuda_deterministic_true_is_not_promised_bit_exact(deterministic: bool) -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # as seed_everything sets it
        stated = guarantee(torch.device("cuda"), "bf16")
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert stated["deterministic_algorithms"] is deterministic and stated["warn_only"] is True
    assert "bit-exact" not in stated["guarantee"] or "never bit-exact" in stated["guarantee"]
    if deterministic:
        assert "attention backward" in stated["guarantee"] and "index_add" in stated["guarantee"]
    else:
        assert "differ between runs" in stated["guarantee"]


# The newest torch API the code calls, with the release that added it; the declared floor must cover them all.
TORCH_APIS = {
    ("src/samft/engine/step.py", "torch.OutOfMemoryError"): "2.5",
    ("src/samft/data/datamodule.py", "torch.serialization.safe_globals"): "2.5",
    ("src/samft/engine/precision.py", "torch.amp.GradScaler(device.type"): "2.3",
}


def test_the_declared_torch_floor_covers_the_apis_the_code_calls() -> None:
    """CI installs one torch (the newest the lock allows): a second, old torch wheel (~800 MB from PyPI, CUDA
    build) does not fit its time budget, so the floor is checked against the APIs' first releases instead."""
    [torch_spec] = re.findall(r'^\s*"(torch>=[\d.]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    floor = _version(torch_spec.split(">=", 1)[1])
    for (path, api), added in TORCH_APIS.items():
        assert api in (REPO / path).read_text(), f"{path} no longer calls {api}: update TORCH_APIS"
        assert floor >= _version(added), f"{api} needs torch>={added}, pyproject declares {torch_spec}"


def test_loop_overhead_puts_its_loss_weights_on_the_benchmark_device() -> None:
    buffers = list(load("loop_overhead").loss_on(torch.device("meta")).buffers())
    assert buffers and all(b.device.type == "meta" for b in buffers)  # the BCE pos_weight among them


def test_the_ddp_smoke_runs_use_gloo_even_where_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a one-GPU machine `auto` would pick CUDA, hence NCCL, which refuses two ranks on one GPU."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(SMOKE_DDP))
    assert cfg.hardware.distributed and cfg.hardware.nproc_per_node == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device(cfg.hardware.device, key="hardware.device")
    assert distributed.backend_for(cfg.hardware.backend, device.type) == "gloo"


def test_epoch_meter_waits_for_queued_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a synchronize the epoch time on CUDA would end when the last kernel was launched, not run."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 1024**2)
    meter = EpochMeter(torch.device("cuda", 0))
    meter.start()
    calls.append("epoch")
    stats = meter.stop(4)
    assert calls == ["sync", "reset", "epoch", "sync"]
    assert stats["memory/gpu_peak_mb"] == 3 and stats["time/samples_per_s"] > 0
