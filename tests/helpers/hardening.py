"""Shared pieces of the hardening tests: a small U-Net checkpoint as a run stores it, scans, and the entry points
run the way a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from helpers.patience import patience
from samft.config import TrainConfig
from samft.engine.checkpoint import FORMAT, save_checkpoint
from samft.model import build_model_from_config

CONF = Path(__file__).resolve().parents[2] / "conf"
AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])


def unet_checkpoint(folder: Path) -> Path:
    """A randomly initialised small U-Net checkpoint (prompt-free, 2 x 2 x 5 mm, 32 x 32 x 8 windows) whose
    output bias makes it predict a few per cent of a scan, with the config a run stores."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "data": {"source": "demo", "spacing": [2.0, 2.0, 5.0], "roi_size": [32, 32, 8], "cache": "none"},
        "model": {"name": "unet", "prompt_mode": "auto", "ich_loss_weight": 0.0,
                  "unet": {"channels": [4, 8], "strides": [[2, 2, 2]]}},
    })
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model).eval()
    with torch.no_grad():
        logits = model.segment(torch.rand(1, 1, 32, 32, 8)).logits[0]
        bias = [p for name, p in model.named_parameters() if name.endswith("bias") and p.numel() == 1][-1]
        bias -= torch.quantile(logits.flatten(), 0.97)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"format": FORMAT, "model": model.state_dict(),
                     "config": OmegaConf.to_container(cfg, resolve=True)}, folder / "best_model.pth")
    return folder / "best_model.pth"


def scan(shape: tuple[int, int, int] = (40, 36, 10), seed: int = 0) -> np.ndarray:
    """Float32 HU noise around brain density with a brighter blob: the model's output varies over it."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(35, 15, size=shape).astype(np.float32)
    hu[10:20, 10:20, 3:7] += 40
    return hu


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def tool_config(tool: str, *overrides: str) -> DictConfig:
    """conf/<tool>.yaml composed with command-line `overrides`, as `python -m samft.<tool>` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(tool, overrides=list(overrides))


def run_cli(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAMFT_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=patience(300),
                          env=env)
