"""A tiny U-Net and the demo data's validation scans, as whole-scan validation meets them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from samft.config import TrainConfig
from samft.data.datamodule import build_datasets
from samft.data.records import source_records
from samft.data.transforms import Preprocessing
from samft.model import build_model_from_config


def tiny_unet_on_demo(root: Path, *, patients: int) -> tuple[DictConfig, torch.nn.Module, Preprocessing, Any, list]:
    """(config, U-Net with seeded random weights in eval mode, preprocessing, uncached val scans, val records) for
    `patients` demo patients generated under root/demo (2 x 2 x 5 mm, 32 x 32 x 8 windows)."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "data": {"source": "demo", "demo_dir": str(root / "demo"), "demo_patients": patients,
                 "spacing": [2.0, 2.0, 5.0], "roi_size": [32, 32, 8], "cache": "none"},
        "model": {"name": "unet", "prompt_mode": "auto", "ich_loss_weight": 0.0,
                  "unet": {"channels": [4, 8], "strides": [[2, 2, 2]]}},
    })
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model).eval()
    preprocessing = Preprocessing.from_config(cfg.data, None)
    records = source_records(cfg.data, seed=cfg.seed)[1]
    scans = build_datasets(train_records=[], val_records=records, preprocessing=preprocessing, cache="none")[1]
    return cfg, model, preprocessing, scans, records
