"""Whole-scan validation during training scores exactly what `samft.evaluate` scores for the same checkpoint and
scans: one inference path (`samft.segmentation`) and one scoring (`samft.scoring`)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from helpers.tiny_unet import tiny_unet_on_demo
from omegaconf import OmegaConf

from samft.engine import validation as validation_module
from samft.engine.checkpoint import FORMAT, save_checkpoint
from samft.engine.validation import ScanValidation


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """A U-Net checkpoint (random weights, its output bias set so that about 1 % of a scan is predicted) on
    the demo data's validation split, with the config a run stores."""
    root = tmp_path_factory.mktemp("scanval")
    cfg, model, preprocessing, scans, val_records = tiny_unet_on_demo(root, patients=3)
    with torch.no_grad():
        logits = model.segment(scans[0]["image"].as_tensor()[None, :, :32, :32, :8]).logits[0]
    bias = [p for name, p in model.named_parameters() if name.endswith("bias") and p.numel() == 1][-1]
    with torch.no_grad():
        bias -= torch.quantile(logits.flatten(), 0.99)
    run_dir = root / "run"
    run_dir.mkdir()
    save_checkpoint({"format": FORMAT, "model": model.state_dict(),
                     "config": OmegaConf.to_container(cfg, resolve=True)}, run_dir / "best_model.pth")
    return root, run_dir, model, preprocessing, scans, val_records


def test_validation_dice_equals_evaluate_dice_per_scan(run) -> None:
    root, run_dir, model, preprocessing, scans, records = run
    validation = ScanValidation(scans=scans, transform=preprocessing.transforms("val"), records=records,
                                roi_size=preprocessing.roi, overlap=0.25, air=preprocessing.air, prompt_mode="auto")
    rows = validation.case_rows(model, device=torch.device("cpu"), autocast=nullcontext)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "samft.evaluate", f"ckpt={run_dir / 'best_model.pth'}",
                           f"output={root / 'eval'}", f"hydra.run.dir={root / 'logs'}"],
                          capture_output=True, text=True, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = pd.read_csv(root / "eval" / "per_case.csv", dtype={"case_id": str}).set_index("case_id")
    ours = {row["case_id"]: row for row in rows}
    assert set(ours) == set(evaluated.index) and len(ours) >= 2
    positives = [case for case, row in ours.items() if row["positive"]]
    assert positives and any(row["pred_volume_ml"] > 0 for row in rows)  # masks to compare, not empty ones
    for case, row in ours.items():
        assert row["dice"] == pytest.approx(evaluated.loc[case, "dice"], abs=1e-6), case
        assert row["pred_volume_ml"] == pytest.approx(evaluated.loc[case, "pred_volume_ml"], rel=1e-6), case
    monitored = validation.metrics(rows)["val/dice"]
    assert monitored == pytest.approx(evaluated.loc[positives, "dice"].mean(), abs=1e-6)


def test_a_fixed_evenly_spaced_subset(run) -> None:
    _, _, _, preprocessing, scans, records = run
    validation = ScanValidation(scans=list(range(10)), transform=preprocessing.transforms("val"), records=records,
                                roi_size=preprocessing.roi, overlap=0.25, air=0.0, prompt_mode="auto", limit=4)
    assert validation.indices() == [0, 3, 6, 9]
    assert ScanValidation(scans=list(range(3)), transform=None, records=[], roi_size=(8, 8, 8), overlap=0.0,
                          air=0.0, prompt_mode="auto", limit=5).indices() == [0, 1, 2]


@pytest.mark.parametrize("prompt_mode", ["click", "both"])
def test_click_validation_decodes_as_the_predictor_does_for_the_prompt_mode(run, monkeypatch, prompt_mode) -> None:
    """Validation's click mode hands `scan_logits` the run's prompt_mode, as `Predictor` does: a model trained both
    ways is decoded in sliding windows, a click-only one in the window centred on the click."""
    _, _, model, preprocessing, scans, records = run
    seen = []

    def spy(model, volume, **kwargs):
        seen.append((kwargs["clicks"] is not None, kwargs["prompt_mode"]))
        return torch.zeros_like(volume)

    monkeypatch.setattr(validation_module, "scan_logits", spy)
    validation = ScanValidation(scans=scans, transform=preprocessing.transforms("val"), records=records,
                                roi_size=preprocessing.roi, overlap=0.25, air=preprocessing.air,
                                prompt_mode=prompt_mode)
    validation.case_rows(model, device=torch.device("cpu"), autocast=nullcontext)
    assert (True, prompt_mode) in seen and {mode for _, mode in seen} == {prompt_mode}
