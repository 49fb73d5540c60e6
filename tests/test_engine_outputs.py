"""What a run leaves behind and tells the user: summary.json, pictures, log lines, progress, system check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.image
import pytest
import torch
from helpers.standin import make_trainer, settings

from samft.engine import CURVES, SUMMARY, TrainSettings, system_check


def test_summary_pictures_and_log_of_a_run(tmp_path: Path, caplog, capsys) -> None:
    caplog.set_level(logging.INFO, logger="samft.engine")
    trainer = make_trainer(
        tmp_path,
        train_settings=settings(epochs=3, log_images=True, log_freq=2, progress=True),
        extra_summary={"git_commit": "abc123", "seed": 0, "skipped_samples": []},
    )
    returned = trainer.fit()
    summary = json.loads((tmp_path / SUMMARY).read_text())  # strict JSON: no NaN/Infinity
    assert summary == returned
    assert summary["git_commit"] == "abc123" and summary["skipped_samples"] == []
    assert summary["metric_name"] == "val/dice" and summary["stop_reason"] == "completed"
    assert summary["epochs_run"] == 3 and summary["best_epoch"] in (1, 2, 3)
    assert summary["best_metric"] == max(h["val/dice"] for h in summary["history"])
    assert summary["wall_time_s"] > 0 and summary["peak_memory_mb"] > 0
    assert set(summary["events"]) == {"oom", "oom_split", "nonfinite_loss", "nonfinite_grad", "skipped_steps",
                                         "fp16_overflow"}
    epoch = summary["history"][0]
    for key in ("train/loss", "lr", "val/dice", "val/dice@1", "val/dice@2", "val/hd95_mm", "val/fp_volume_ml"):
        assert isinstance(epoch[key], float), key
    assert epoch["time/samples_per_s"] > 0 and epoch["memory/rss_mb"] > 0
    assert matplotlib.image.imread(tmp_path / CURVES).shape[2] in (3, 4)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["val_epoch0002.png"]  # every log_freq
    assert "epoch 2/3: lr 0.1, train/loss" in caplog.text
    assert "run finished (completed)" in caplog.text
    progress = capsys.readouterr().err
    assert "epoch 1" in progress and "run" in progress and "batch/s" in progress


def test_both_prompt_mode_trains_the_prompt_free_round_and_reports_it(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=1, prompt_mode="both", val_clicks=(1,)))
    calls = []
    segment = trainer.model.segment
    trainer.model.segment = lambda image, **kw: calls.append(kw["prompt_free"]) or segment(image, **kw)
    summary = trainer.fit()
    epoch = summary["history"][0]
    assert calls and all(calls)  # every training and validation forward also decoded prompt-free
    assert 0.0 <= epoch["val/dice_auto"] <= 1.0 and epoch["val/dice"] == epoch["val/dice@1"]


def test_bf16_autocast_on_cpu_trains(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=1, precision="bf16"))
    dtypes: list[torch.dtype] = []
    trainer.model.decoder.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    summary = trainer.fit()
    assert summary["global_step"] == 2 and summary["events"]["nonfinite_loss"] == 0
    assert dtypes and set(dtypes) == {torch.bfloat16}  # every training and validation forward ran under autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda_trains_and_resumes(tmp_path: Path, precision: str) -> None:
    trainer = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=2, precision=precision, device="cuda"))
    summary = trainer.fit()
    assert summary["global_step"] == 4 and summary["peak_memory_mb"] > 0
    assert "memory/gpu_peak_mb" in summary["history"][0]
    resumed = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=3, precision=precision, device="cuda"))
    assert resumed.fit(resume_from=tmp_path / "latest_model.pth")["global_step"] == 6


def test_system_check_warns_about_scarce_resources(tmp_path: Path) -> None:
    plenty = system_check(tmp_path, min_free_disk_gb=0, min_free_gpu_gb=0, min_free_ram_gb=0, min_cpus=1)
    assert plenty == []
    scarce = system_check(tmp_path / "new", min_free_disk_gb=1e9, min_free_ram_gb=1e9, min_cpus=10**6)
    assert [w.split()[1] for w in scarce] == ["GiB", "GiB", "CPU"]
    assert any("free on the disk" in w for w in scarce)
    if not torch.cuda.is_available():
        (warning,) = system_check(tmp_path, device="cuda", min_free_disk_gb=0, min_free_ram_gb=0, min_cpus=1)
        assert "no CUDA GPU" in warning


def test_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="precision in"):
        TrainSettings(epochs=1, precision="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps >= 1"):
        TrainSettings(epochs=1, grad_accum_steps=0)
    assert TrainSettings(epochs=1, prompt_mode="auto", val_clicks=(1,)).val_rounds == 0
