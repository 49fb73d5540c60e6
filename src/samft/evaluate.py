"""`python -m samft.evaluate`: per-case Dice, HD95 (mm), lesion volumes (ml) and detection on each scan's grid."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from samft.cli import exit_on_user_error, run_entry
from samft.errors import UserError

log = logging.getLogger("samft.evaluate")


def case_metrics(pred, truth, affine) -> dict[str, float | bool]:
    """pred, truth: X x Y x Z {0,1} arrays on one grid with `affine` (mm). HD95 is NaN when either is empty."""
    import numpy as np
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    p = torch.as_tensor(pred > 0)[None, None].float()
    t = torch.as_tensor(truth > 0)[None, None].float()
    dice = DiceMetric(include_background=True, ignore_empty=False, reduction="none")(p, t).item()
    hd95 = math.nan
    if p.any() and t.any():
        metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        hd95 = metric(p, t, spacing=spacing.tolist()).item()
    return {
        "dice": dice, "hd95_mm": hd95,
        "pred_volume_ml": float(p.sum()) * voxel_ml, "true_volume_ml": float(t.sum()) * voxel_ml,
        "detected": bool(p.any()), "positive": bool(t.any()),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    positives = [r for r in rows if r["positive"]]
    negatives = [r for r in rows if not r["positive"]]
    finite_hd = [r["hd95_mm"] for r in positives if math.isfinite(r["hd95_mm"])]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "n_cases": len(rows), "n_positive": len(positives), "n_negative": len(negatives),
        "dice_positive_mean": mean([r["dice"] for r in positives]),
        "hd95_mm_mean": mean(finite_hd),
        "volume_abs_error_ml_mean": mean([abs(r["pred_volume_ml"] - r["true_volume_ml"]) for r in positives]),
        "sensitivity": mean([float(r["detected"]) for r in positives]),
        "specificity": mean([float(not r["detected"]) for r in negatives]),
    }


def evaluate_cases(cfg: DictConfig) -> dict[str, Any]:
    import nibabel as nib  # noqa: F401  (fail early when missing)
    import pandas as pd
    import torch
    from tqdm import tqdm

    from samft.data.readers import read_volume
    from samft.inference import Predictor

    ckpt = Path(cfg.ckpt)
    records = _records(cfg, ckpt)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    predictor = Predictor(ckpt, device=device, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size)
    points = json.loads(Path(cfg.points).read_text()) if cfg.points else {}
    rows = []
    for record in tqdm(records, desc="evaluate", unit="scan"):
        image = Path(record["image"])
        prediction = predictor.predict(image, points=points.get(image.name))
        pred = prediction.mask(cfg.threshold)
        truth = read_volume(record["label"]).array if record["label"] else pred * 0
        rows.append({"case_id": record["case_id"], **case_metrics(pred, truth, prediction.affine)})
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(output / "per_case.csv", index=False)
    summary = summarize(rows)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def _records(cfg: DictConfig, ckpt: Path) -> list[dict[str, Any]]:
    from samft.data import sources
    from samft.data.records import source_records
    from samft.engine.checkpoint import load_checkpoint

    if cfg.input:
        if not cfg.mask_dir:
            raise UserError("evaluate with input=<csv> needs mask_dir=<folder of masks>")
        return sources.csv_records(Path(cfg.input), Path(cfg.input), Path(cfg.mask_dir))[0]
    config = load_checkpoint(ckpt)["config"]
    from omegaconf import OmegaConf

    return source_records(OmegaConf.create(config["data"]), seed=config["seed"])[1]


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def _hydra_evaluate(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: evaluate_cases(cfg))


def main() -> None:
    run_entry(_hydra_evaluate)


if __name__ == "__main__":
    main()
