"""GPU-path findings checked on CPU through the same code: host syncs in the training loop, inference precision
and sliding-window batch size, TF32 (device as a parameter; torch.cuda faked where the code touches it)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.hardening import scan, tool_config, unet_checkpoint, write_nifti
from helpers.standin import make_trainer, settings
from monai.data import MetaTensor

import samft.engine.validation as validation_module
from samft.engine.checkpoint import load_checkpoint, save_checkpoint
from samft.engine.step import OptimiserStep
from samft.engine.validation import ScanValidation
from samft.errors import UserError
from samft.inference import Predictor
from samft.predict import PredictConfig, check_model_tool
from samft.segmentation import CUDA_SW_BATCH_SIZE, inference_precision, sw_batch_size_for

SAMFT = Path(__import__("samft").__file__).parent
HOST_READS = ("item", "tolist", "__bool__", "__float__", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts the tensor-to-host reads (each one a sync on a GPU) that samft's own code makes while
    `counting["on"]` is true (MONAI's Dice loss reads its reduce axes from a CPU `arange`: no device sync)."""
    counting: dict[str, Any] = {"on": False, "n": 0, "where": []}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if counting["on"] and f"{SAMFT}" in sys._getframe(1).f_code.co_filename:
                counting["n"] += 1
                counting["where"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counting


@pytest.mark.parametrize("accum", [1, 4])
def test_the_loop_reads_the_loss_on_the_host_once_per_optimiser_step_not_per_micro_step(
    tmp_path: Path, host_reads: dict[str, Any], accum: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is prompt-free (its click simulation is the model's own business); everything else the loop
    does between two optimiser steps stays on the device."""
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1, grad_accum_steps=accum, prompt_mode="auto",
                                                             ich_loss_weight=0.0), batch_size=1, n_train=8)
    train_window = OptimiserStep.__call__
    windows = []

    def counted_window(self, window, **kwargs):
        host_reads["on"] = True
        try:
            return train_window(self, window, **kwargs)
        finally:
            host_reads["on"] = False
            windows.append(len(window))

    monkeypatch.setattr(OptimiserStep, "__call__", counted_window)
    summary = trainer.fit()
    assert windows == [accum] * (8 // accum) and summary["global_step"] == 8 // accum
    assert host_reads["n"] == len(windows), host_reads["where"]  # one read per window, whatever its micro-steps


# --- inference: precision, windows per forward pass, TF32 ----------------------------------------------------


def test_auto_precision_is_the_runs_on_cuda_and_fp32_on_cpu_and_windows_batch_on_cuda() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [inference_precision("auto", device=cuda, trained=p) for p in ("fp32", "bf16", "fp16")] == [
        "fp32", "bf16", "fp16"]
    assert inference_precision("auto", device=cpu, trained="bf16") == "fp32"  # CPU results as before
    assert inference_precision("bf16", device=cpu, trained="fp32") == "bf16"  # an explicit choice is kept
    assert sw_batch_size_for(None, device=cuda) == CUDA_SW_BATCH_SIZE > 1
    assert sw_batch_size_for(None, device=cpu) == 1 and sw_batch_size_for(3, device=cpu) == 3


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def bf16_run_checkpoint(folder: Path) -> Path:
    """The hardening tests' small U-Net checkpoint, as a run trained with hardware.precision=bf16 stores it."""
    path = unet_checkpoint(folder)
    state = load_checkpoint(path)
    state["config"]["hardware"]["precision"] = "bf16"
    save_checkpoint(state, path)
    return path


def test_a_predictor_on_cuda_takes_the_runs_precision_tf32_and_batched_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tf32_flags
) -> None:
    """The CUDA branch of Predictor's set-up, with the model's move to the GPU faked (no GPU here)."""
    ckpt = bf16_run_checkpoint(tmp_path)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    on_cuda = Predictor(ckpt, device=torch.device("cuda", 0))
    assert on_cuda.precision == "bf16" and on_cuda.sw_batch_size == CUDA_SW_BATCH_SIZE
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    on_cpu = Predictor(ckpt, device=torch.device("cpu"))
    assert on_cpu.precision == "fp32" and on_cpu.sw_batch_size == 1
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def _spy_windows(predictor: Predictor) -> list[tuple[int, bool, torch.dtype]]:
    """Each forward pass of the predictor's model: (windows in the batch, autocast on, autocast dtype)."""
    calls: list[tuple[int, bool, torch.dtype]] = []
    segment = predictor.model.segment

    def spy(image: torch.Tensor, **kwargs: Any):
        calls.append((image.shape[0], torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return segment(image, **kwargs)

    predictor.model.segment = spy
    return calls


def test_predict_runs_the_chosen_precision_and_windows_and_stays_fp32_by_default_on_cpu(tmp_path: Path) -> None:
    ckpt = bf16_run_checkpoint(tmp_path)
    path = write_nifti(tmp_path / "scan.nii.gz", scan((80, 72, 10)))
    default = Predictor(ckpt, device=torch.device("cpu"))
    calls = _spy_windows(default)
    probabilities = default.predict(path).probabilities
    assert len(calls) > 2 and all(c == (1, False, calls[0][2]) for c in calls)  # fp32, one window at a time

    # the CPU default is explicit fp32 with one window per forward pass, bit for bit
    reference = Predictor(ckpt, device=torch.device("cpu"), precision="fp32", sw_batch_size=1)
    assert np.array_equal(reference.predict(path).probabilities, probabilities)

    chosen = Predictor(ckpt, device=torch.device("cpu"), precision="bf16", sw_batch_size=3)
    calls = _spy_windows(chosen)
    bf16 = chosen.predict(path).probabilities
    assert calls[0] == (3, True, torch.bfloat16) and all(c[1:] == (True, torch.bfloat16) for c in calls)
    assert all(c[0] == 3 for c in calls[:-1]) and 1 <= calls[-1][0] <= 3  # windows in threes, the rest last
    assert bf16.dtype == probabilities.dtype and np.abs(bf16 - probabilities).max() < 0.05


@pytest.mark.parametrize(("override", "message"), [
    ("precision=fp64", "precision"),
    ("sw_batch_size=0", "'sw_batch_size' is 0"),
])
def test_predict_refuses_a_bad_precision_or_window_batch_in_one_line(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_model_tool(tool_config("predict", "ckpt=x", "input=y", "output=z", override), PredictConfig,
                         tool="predict")


def test_validation_takes_the_device_default_window_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """ScanValidation passes None on as 1 window per pass on a CPU (its CUDA default is CUDA_SW_BATCH_SIZE)."""
    seen: list[int] = []

    def fake_logits(model, volume, *, sw_batch_size: int, **kwargs: Any) -> torch.Tensor:
        seen.append(sw_batch_size)
        raise StopIteration

    monkeypatch.setattr(validation_module, "scan_logits", fake_logits)
    monkeypatch.setattr(validation_module, "_truth", lambda record, shape: np.zeros(shape, dtype=bool))
    image = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"spatial_shape": (4, 4, 4), "original_affine": np.eye(4)})
    for setting, expected in ((None, 1), (2, 2)):
        check = ScanValidation(scans=[{"image": image}], transform=None, records=[{}], roi_size=(4, 4, 4),
                               overlap=0.0, air=0.0, prompt_mode="auto", sw_batch_size=setting)
        with pytest.raises(StopIteration):
            check.case_rows(torch.nn.Identity(), device=torch.device("cpu"), autocast=nullcontext)
        assert seen[-1] == expected


# --- throughput under DDP -------------------------------------------------------------------------------------


def test_under_ddp_samples_per_s_is_the_jobs_rate_over_the_slowest_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks faked at the collectives (this process is rank 0; the other rank is a copy of it that took three
    times as long): the rate is both ranks' samples over the slower epoch, not rank 0's own rate."""
    from samft import distributed

    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "shard_batches", lambda loader: loader)
    monkeypatch.setattr(distributed, "any_rank", lambda flag: flag)
    monkeypatch.setattr(distributed, "broadcast", lambda value: value)
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda *values: [2 * v for v in values])
    monkeypatch.setattr(distributed, "all_gather", lambda value: [value, 3 * value if isinstance(value, float)
                                                                  else value])
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1), batch_size=2, n_train=8)
    (epoch,) = trainer.fit()["history"]
    own_rate = 8 / epoch["time/epoch_s"]
    assert epoch["time/samples_per_s"] == pytest.approx(2 * 8 / (3 * epoch["time/epoch_s"]))
    assert epoch["time/samples_per_s"] != pytest.approx(own_rate) and epoch["time/samples_per_s"] != pytest.approx(
        2 * own_rate)
