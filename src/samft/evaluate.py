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
BRAIN_WINDOW_HU = (0.0, 80.0)  # overlays: level 40, width 80, where blood (50-90 HU) stands out
SIZE_BANDS_ML = (("under 1 ml", 0.0, 1.0), ("1-10 ml", 1.0, 10.0), ("over 10 ml", 10.0, float("inf")))


def case_metrics(pred, truth, affine) -> dict[str, float | bool]:
    """pred, truth: X x Y x Z {0,1} arrays on one grid with `affine` (mm). HD95 is NaN when either is empty.

    `detected`: on a scan with a lesion, the prediction overlaps it; on one without, anything is predicted (a
    false alarm), so sensitivity and specificity count hits, not any voxel anywhere.
    """
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
        "detected": bool((p * t).any()) if t.any() else bool(p.any()), "positive": bool(t.any()),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases, and the same per true lesion-size band (`by_size`)."""
    summary = _means(rows)
    summary["by_size"] = {
        name: _means([r for r in rows if r["positive"] and low <= r["true_volume_ml"] < high])
        for name, low, high in SIZE_BANDS_ML
    }
    return summary


def interior_click(truth) -> list[float] | None:
    """The click a reader would give: the lesion voxel farthest from the lesion border, as [x, y, z, 1]."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    if not truth.any():
        return None
    depth = distance_transform_edt(truth > 0)
    return [*map(float, np.unravel_index(int(depth.argmax()), truth.shape)), 1.0]


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
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
    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from samft.data.readers import read_volume
    from samft.devices import resolve_device
    from samft.engine.plots import save_overlay
    from samft.inference import Predictor

    ckpt = Path(cfg.ckpt)
    records = _records(cfg, ckpt)
    device = resolve_device(cfg.device, key="device")
    predictor = Predictor(ckpt, device=device, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size)
    points = json.loads(Path(cfg.points).read_text()) if cfg.points else {}
    output = Path(cfg.output)
    (output / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    for record in tqdm(records, desc="evaluate", unit="scan"):
        image = Path(record["image"])
        scan = read_volume(image).array
        truth = (read_volume(record["label"]).array > 0).astype(np.uint8) if record["label"] else np.zeros_like(
            scan, dtype=np.uint8)
        clicks = points.get(image.name)
        if clicks is None and cfg.click_from_label and truth.any():
            clicks = [interior_click(truth)]
        prediction = predictor.predict(image, points=clicks)
        pred = prediction.mask(cfg.threshold)
        rows.append({"case_id": record["case_id"], "mode": "click" if clicks else "auto",
                     **case_metrics(pred, truth, prediction.affine)})
        save_overlay(scan, truth, pred, output / "overlays" / f"{record['case_id']}.png",
                     title=f"{record['case_id']}: Dice {rows[-1]['dice']:.2f}", display_range=BRAIN_WINDOW_HU)
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
