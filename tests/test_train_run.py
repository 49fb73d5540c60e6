"""A whole smoke run writes every file of the run contract, with the right contents, and reproduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.patience import patience
from omegaconf import OmegaConf

from samft.config import validate
from samft.data.demo import ensure_demo_dataset

pytestmark = pytest.mark.slow


def run_module(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(Path(cwd or ".").resolve() / "cache")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=patience(timeout),
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke experiment's demo data (4 patients, seed 0), generated once for the module's runs."""
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_dataset(root=root, n_patients=4, seed=0)
    return root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("smoke")
    run_dir = root / "run"
    proc = run_module("samft.train", "experiment=smoke", f"hydra.run.dir={run_dir}", "hardware.num_workers=0",
                      "hardware.cpu_threads=3", f"data.demo_dir={demo}", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_run_writes_every_file_of_the_contract(smoke_run) -> None:
    run_dir, proc = smoke_run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "config.json",
                 "best_model.pth", "latest_model.pth", "sam_encoder.pth", "summary.json", "stats.json",
                 "train.log", "training_curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert f"run directory: {run_dir}" in proc.stdout
    # the contents, not only the presence: data statistics per split, the whole log, a real picture
    stats = json.loads((run_dir / "stats.json").read_text())
    assert set(stats) == {"all", "train", "val"}
    assert stats["train"]["n_samples"] + stats["val"]["n_samples"] == stats["all"]["n_samples"] > 0
    assert stats["all"]["n_positive"] + stats["all"]["n_negative"] == stats["all"]["n_samples"]
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and log.count("run finished (completed)") == 1
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best val/dice:" in proc.stdout


def test_summary_holds_the_contract_keys_and_sane_values(smoke_run) -> None:
    run_dir, _ = smoke_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric_name"] == "val/dice"
    assert 0.0 <= summary["best_metric"] <= 1.0
    assert summary["best_epoch"] in (1, 2)
    assert summary["epochs_run"] == 2 and summary["stop_reason"] == "completed"
    assert summary["wall_time_s"] > 0 and summary["peak_memory_mb"] > 0
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    for record in summary["history"]:
        lr = json.loads((run_dir / "config.json").read_text())["optim"]["lr"]
        assert record["train/loss"] > 0 and record["lr"] == pytest.approx(lr)  # plateau: no change in 2 epochs
        assert 0.0 <= record["val/dice"] <= 1.0
    assert summary["best_metric"] == max(h["val/dice"] for h in summary["history"])
    assert summary["seed"] == 42 and summary["packages"]["torch"] == torch.__version__
    assert summary["cpu_threads"] == 3 and summary["loader_workers"] == 0  # torch's count in the run, as set
    assert set(summary["git"]) == {"commit", "dirty"}
    assert summary["skipped_samples"] == []
    assert set(summary["events"]) >= {"oom", "nonfinite_loss"}


def test_checkpoints_hold_the_full_state_and_the_config(smoke_run) -> None:
    run_dir, _ = smoke_run
    config = json.loads((run_dir / "config.json").read_text())
    latest = torch.load(run_dir / "latest_model.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_metric", "rng",
            "config", "history"} <= set(latest)
    assert latest["epoch"] == 2 and latest["config"] == config
    best = torch.load(run_dir / "best_model.pth", weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert best["epoch"] == summary["best_epoch"]
    encoder = torch.load(run_dir / "sam_encoder.pth", weights_only=True)
    for key, value in encoder["image_encoder_state_dict"].items():
        torch.testing.assert_close(value, best["model"][f"image_encoder.{key}"], rtol=0, atol=0)


def test_config_round_trips_through_hydra_folder(smoke_run) -> None:
    run_dir, _ = smoke_run
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(validate(saved), resolve=True) == json.loads((run_dir / "config.json").read_text())
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "experiment=smoke" in overrides


def test_rerun_from_the_hydra_folder_composes_the_same_config(smoke_run, tmp_path: Path) -> None:
    run_dir, _ = smoke_run
    proc = run_module("samft.train", "--config-path", str(run_dir / ".hydra"), "--config-name", "config",
                      "--cfg", "job", cwd=tmp_path, timeout=patience(120))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def test_reproduce_reports_identical_metrics(smoke_run, tmp_path: Path) -> None:
    run_dir, _ = smoke_run
    proc = run_module("samft.reproduce", str(run_dir), "--output", str(tmp_path / "again"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reproduced: identical metrics" in proc.stdout
    old = json.loads((run_dir / "summary.json").read_text())
    new = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert new["best_metric"] == old["best_metric"]
    assert [h["train/loss"] for h in new["history"]] == [h["train/loss"] for h in old["history"]]


def test_reproduce_the_first_epochs_of_a_run(smoke_run, tmp_path: Path) -> None:
    from samft.reproduce import compare

    run_dir, _ = smoke_run
    proc = run_module("samft.reproduce", str(run_dir), "--epochs", "1", "--output", str(tmp_path / "one"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reproduced over the first 1 epoch(s): identical metrics" in proc.stdout
    old = json.loads((run_dir / "summary.json").read_text())
    new = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert new["stop_reason"] == "stopped_after_epoch" and len(new["history"]) == 1
    assert new["history"][0]["train/loss"] == old["history"][0]["train/loss"]
    new["history"][0]["val/dice"] += 0.5
    assert compare(old, new, epochs=1) == [f"epoch 1 val/dice: {old['history'][0]['val/dice']!r} -> "
                                           f"{new['history'][0]['val/dice']!r}"]


def test_a_run_stopped_before_its_first_validation_is_not_an_error(tmp_path: Path, demo: Path) -> None:
    run_dir = tmp_path / "boxed"
    proc = run_module("samft.train", "experiment=smoke", "val_every=2", "stop_after_epoch=1", "max_steps_per_epoch=1",
                      f"hydra.run.dir={run_dir}", f"data.demo_dir={demo}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "stopped_after_epoch" and summary["best_metric"] is None
    assert len(summary["history"]) == 1 and (run_dir / "latest_model.pth").is_file()


def test_resume_auto_continues_a_finished_run_without_training_again(smoke_run, demo: Path) -> None:
    run_dir, _ = smoke_run
    before = torch.load(run_dir / "latest_model.pth", weights_only=True)["model"]
    steps = json.loads((run_dir / "summary.json").read_text())["global_step"]
    proc = run_module("samft.train", "experiment=smoke", f"hydra.run.dir={run_dir}", "epochs=2",
                      f"data.demo_dir={demo}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = torch.load(run_dir / "latest_model.pth", weights_only=True)["model"]
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["global_step"] == steps
    # CPU training is deterministic, so equal weights alone would also follow from training again from scratch
    output = proc.stdout + proc.stderr
    assert "resumed from" in output and "epoch 1/2" not in output and "epoch 2/2" not in output, output[-3000:]


def test_unet_baseline_trains_through_the_same_framework_and_predicts(tmp_path: Path, demo: Path) -> None:
    import nibabel as nib
    import numpy as np

    run_dir = tmp_path / "unet"
    proc = run_module("samft.train", "experiment=smoke", "model=unet", "data.roi_size=32", "val_scans=1",
                      f"hydra.run.dir={run_dir}", f"data.demo_dir={demo}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0.0 <= summary["best_metric"] <= 1.0
    assert "val/dice@1" not in summary["history"][0]  # prompt-free: no click metrics
    assert (run_dir / "best_model.pth").is_file() and not (run_dir / "sam_encoder.pth").exists()

    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    scan = np.random.default_rng(0).normal(35, 10, size=(90, 80, 40)).astype(np.int16)
    nib.save(nib.Nifti1Image(scan, affine), tmp_path / "scan.nii.gz")
    proc = run_module("samft.predict", f"ckpt={run_dir / 'best_model.pth'}", f"input={tmp_path / 'scan.nii.gz'}",
                      f"output={tmp_path / 'pred'}", f"hydra.run.dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained with click prompts" not in proc.stderr
    mask = nib.load(tmp_path / "pred" / "scan_mask.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, affine)
