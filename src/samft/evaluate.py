"""`python -m samft.evaluate`: per-case Dice, HD95 (mm), lesion volumes (ml) and detection on each scan's grid.

The masks scored come from a samft checkpoint (`ckpt=`) or from a folder of mask files written by any tool
(`pred_dir=`: nnU-Net, another samft run's `samft.predict`, `samft.baseline`); both go through one scoring loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import MISSING, DictConfig

from samft.choices import DEFAULT_MAX_VOXELS
from samft.cli import exit_on_user_error, run_entry
from samft.config import ModelToolConfig
from samft.errors import UserError
from samft.predict import check_model_tool, checked_entry

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("samft.evaluate")
BRAIN_WINDOW_HU = (0.0, 80.0)  # overlays: level 40, width 80, where blood (50-90 HU) stands out
PREDICTION_NAMES = ("{stem}.nii.gz", "{stem}.nii", "{stem}_mask.nii.gz")
"""The file names of a scan's prediction in `pred_dir`, tried for the scan's stem (`samft.predict` writes the
last). nnU-Net names its outputs after the case without the `_0000` channel suffix, so that stem is tried too."""
NNUNET_CHANNEL = "_0000"
GRID_ATOL_MM = 1e-3
"""A prediction file is on the mask's grid when every corner voxel lands within this distance (mm)."""


@dataclass
class EvaluateConfig(ModelToolConfig):
    """`conf/evaluate.yaml`'s keys (see there)."""

    ckpt: str | None = None
    pred_dir: str | None = None
    input: str | None = None
    mask_dir: str | None = None
    output: str = MISSING
    click_from_label: bool = False


@dataclass(frozen=True)
class Case:
    """One scan to score: the scan (HU, X x Y x Z), its true mask ({0,1} uint8, same shape), the affine the
    metrics use (the mask's header; without a mask file, the scan's own) and the affine the model reads the scan
    with (the scan's own; for a bare array without geometry, its mask's), as training reads them."""

    case_id: str
    image: Path
    label: Path | None
    scan: np.ndarray
    scan_has_geometry: bool
    truth: np.ndarray
    affine: np.ndarray
    scan_affine: np.ndarray


PredictFn = Callable[[Case], "tuple[np.ndarray, str]"]
"""A case -> (the predicted {0,1} mask X x Y x Z on the case's grid, the mode written to per_case.csv)."""


def evaluate_cases(cfg: DictConfig) -> dict[str, Any]:
    """Score the masks of `cfg.ckpt` or of the files in `cfg.pred_dir` (exactly one) against the true masks.
    Scans that cannot be scored are listed in per_case.csv and summary.json, and end it with one UserError."""
    cfg = check_model_tool(cfg, EvaluateConfig, tool="evaluate")
    if bool(cfg.ckpt) == bool(cfg.pred_dir):
        raise UserError("give exactly one of ckpt=<run>/best_model.pth (predict with a samft model) or "
                        f"pred_dir=<folder of mask files> (score masks any tool wrote); got ckpt={cfg.ckpt}, "
                        f"pred_dir={cfg.pred_dir}")
    if cfg.pred_dir and (cfg.points or cfg.click_from_label):
        raise UserError("points= and click_from_label= prompt a samft model (ckpt=); the masks in pred_dir are "
                        "already made: drop them")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir() or any(p.exists() and not p.is_dir() for p in output.parents):
        raise UserError(f"output {output} is under a file or is one; choose a folder")
    records = _records(cfg)
    if cfg.pred_dir:
        predict = folder_predictions(Path(cfg.pred_dir), records, max_voxels=cfg.max_voxels)
    else:
        predict = checkpoint_predictions(cfg)
    summary = score_cases(records, predict, output=output, max_voxels=cfg.max_voxels)
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        raise UserError(f"{len(summary['failed'])} of {len(records)} scan(s) could not be scored (listed in "
                        f"{output / 'per_case.csv'}): " + " | ".join(summary["failed"][:10]))
    return summary


def score_cases(
    records: list[dict[str, Any]], predict: PredictFn, *, output: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict[str, Any]:
    """The one scoring loop: per_case.csv, summary.json and overlays/<case>.png under `output`. A scan that
    cannot be read or predicted is a row with mode `failed` and its `error`; the summary covers the others and
    lists the failures under `failed`."""
    import pandas as pd
    from tqdm import tqdm

    from samft.engine.plots import save_overlay
    from samft.scoring import case_metrics, summarize

    (output / "overlays").mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for record in tqdm(records, desc="evaluate", unit="scan"):
        try:
            case = load_case(record, max_voxels=max_voxels)
            pred, mode = predict(case)
        except UserError as err:
            log.error("%s: %s", record["image"], err)
            failed.append({"case_id": record["case_id"], "mode": "failed", "error": str(err)})
            continue
        rows.append({"case_id": case.case_id, "mode": mode, **case_metrics(pred, case.truth, case.affine)})
        save_overlay(case.scan, case.truth, pred, output / "overlays" / f"{case.case_id}.png",
                     title=f"{case.case_id}: Dice {rows[-1]['dice']:.2f}", display_range=BRAIN_WINDOW_HU)
    pd.DataFrame(rows + failed, columns=None if rows or not failed else ["case_id", "mode", "error"]).to_csv(
        output / "per_case.csv", index=False)
    summary = {**(summarize(rows) if rows else {"n_cases": 0}), "failed": [f"{f['case_id']}: {f['error']}"
                                                                           for f in failed]}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_case(record: dict[str, Any], *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Case:
    """Read a record's scan and true mask (an empty mask when `label` is None). The model reads the scan on its
    own geometry or, for a bare array without any, on its mask's, exactly as training's `LoadCased` does."""
    import numpy as np

    from samft.data.preflight import GEOMETRY_ATOL_MM
    from samft.data.readers import read_volume

    image = Path(record["image"])
    check_declared_size(image, max_voxels)
    scan = read_volume(image)
    if record["label"] is None:
        return Case(record["case_id"], image, None, scan.array, scan.has_geometry,
                    np.zeros(scan.array.shape, dtype=np.uint8), scan.affine, scan.affine)
    label = Path(record["label"])
    check_declared_size(label, max_voxels)
    mask = read_volume(label)
    if mask.array.shape != scan.array.shape:
        raise UserError(f"{label} has shape {mask.array.shape} but its scan {image} has {scan.array.shape}; "
                        "a mask must be on its scan's voxel grid")
    if scan.has_geometry and mask.has_geometry and not np.allclose(scan.affine, mask.affine, atol=GEOMETRY_ATOL_MM):
        raise UserError(f"{label}: mask affine differs from the affine of its scan {image}; masks must be on the "
                        "scan's voxel grid (same spacing, origin and orientation), as training requires")
    return Case(record["case_id"], image, label, scan.array, scan.has_geometry,
                (mask.array > 0).astype(np.uint8), mask.affine, scan.affine if scan.has_geometry else mask.affine)


def check_declared_size(path: Path, max_voxels: int) -> None:
    """UserError when a NIfTI header declares more than `max_voxels` voxels, before they are read."""
    import math

    from samft.inference import declared_geometry

    declared = declared_geometry(path)
    if declared is not None and math.prod(declared[0]) > max_voxels:
        raise UserError(f"{path}: {' x '.join(map(str, declared[0]))} voxels exceed max_voxels={max_voxels:,}; "
                        "check the file, or raise max_voxels if it is real")


def checkpoint_predictions(cfg: DictConfig) -> PredictFn:
    """Masks from a samft checkpoint: prompt-free, or with clicks from `cfg.points` / the label's innermost voxel."""
    from samft.data.readers import Volume
    from samft.devices import resolve_device
    from samft.inference import Predictor
    from samft.predict import read_points
    from samft.scoring import interior_click

    device = resolve_device(cfg.device, key="device")
    points = read_points(Path(cfg.points)) if cfg.points else {}
    predictor = Predictor(Path(cfg.ckpt), device=device, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
                          postprocess=cfg.postprocess, nonfinite=cfg.nonfinite, max_voxels=cfg.max_voxels,
                          precision=cfg.precision)

    def predict(case: Case) -> tuple[np.ndarray, str]:
        clicks = points.get(case.image.name)
        if clicks is None and cfg.click_from_label and case.truth.any():
            clicks = [interior_click(case.truth, case.affine)]
        # the scan as it was read for scoring, on the geometry training gives it (no second read)
        volume = Volume(case.scan, case.scan_affine, case.scan_has_geometry or case.label is not None)
        prediction = predictor.predict_volume(volume, case.image, points=clicks)
        return prediction.mask(cfg.threshold), "click" if clicks else "auto"

    return predict


def prediction_candidates(pred_dir: Path, case_id: str) -> list[Path]:
    """The paths in `pred_dir` that may hold the prediction for the scan `<case_id>.pkl|.nii|.nii.gz`, in order."""
    stems = [case_id]
    if case_id.endswith(NNUNET_CHANNEL) and len(case_id) > len(NNUNET_CHANNEL):
        stems.append(case_id[: -len(NNUNET_CHANNEL)])
    return [pred_dir / name.format(stem=stem) for stem in stems for name in PREDICTION_NAMES]


def match_predictions(pred_dir: Path, records: list[dict[str, Any]]) -> dict[str, Path]:
    """case_id -> its prediction file. Raises one UserError listing every scan without one, or with several."""
    if not pred_dir.is_dir():
        raise UserError(f"pred_dir {pred_dir} is not a folder; point it at the folder of predicted masks")
    if any(r["label"] and Path(r["label"]).parent.resolve() == pred_dir.resolve() for r in records):
        raise UserError(f"pred_dir {pred_dir} is the mask_dir: it holds the true masks, not predictions")
    found, missing, ambiguous = {}, [], []
    for record in records:
        candidates = prediction_candidates(pred_dir, record["case_id"])
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            missing.append(f"{record['image']} (looked for {', '.join(p.name for p in candidates)})")
        elif len(existing) > 1:
            ambiguous.append(f"{record['image']} ({' and '.join(p.name for p in existing)})")
        else:
            found[record["case_id"]] = existing[0]
    for problems, what in ((missing, "have no prediction"), (ambiguous, "have several predictions; keep one")):
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise UserError(f"{len(problems)} scan(s) {what} in pred_dir {pred_dir}: " + "; ".join(shown))
    return found


def folder_predictions(
    pred_dir: Path, records: list[dict[str, Any]], *, max_voxels: int = DEFAULT_MAX_VOXELS,
) -> PredictFn:
    """Masks read from files (non-zero = lesion), each checked against its case's grid before it is scored."""
    import numpy as np

    from samft.data.readers import read_volume

    files = match_predictions(pred_dir, records)  # every file is found before the first scan is scored

    def predict(case: Case) -> tuple[np.ndarray, str]:
        path = files[case.case_id]
        check_declared_size(path, max_voxels)
        prediction = read_volume(path)
        reference = case.label or case.image
        if prediction.array.shape != case.truth.shape:
            raise UserError(f"prediction {path} has shape {prediction.array.shape} but {reference} has "
                            f"{case.truth.shape}; write each mask on its scan's voxel grid")
        # a bare .pkl scan tells a tool nothing about its geometry (samft.predict writes the identity there)
        if case.scan_has_geometry:
            check_same_grid(prediction.affine, case.affine, shape=case.truth.shape, pred_path=path,
                            reference_path=reference)
        values = prediction.array
        if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
            raise UserError(f"prediction {path} holds fractional values (probabilities?); pred_dir takes masks "
                            "(non-zero = lesion): threshold it first")
        return (values != 0).astype(np.uint8), "file"

    return predict


def check_same_grid(affine: np.ndarray, reference: np.ndarray, *, shape: tuple[int, ...], pred_path: Path,
                    reference_path: Path) -> None:
    """UserError unless the two 4 x 4 affines put every corner of a `shape` grid within GRID_ATOL_MM."""
    import numpy as np

    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    distance = float(np.linalg.norm(((np.asarray(affine) - np.asarray(reference)) @ corners)[:3], axis=0).max())
    if distance > GRID_ATOL_MM:
        raise UserError(f"prediction {pred_path} is not on the grid of {reference_path}: their affines place "
                        f"voxels up to {distance:.3g} mm apart; write the mask with its scan's affine")


def _records(cfg: DictConfig) -> list[dict[str, Any]]:
    from samft.data import sources
    from samft.data.records import source_records
    from samft.engine.checkpoint import load_checkpoint

    if cfg.input or cfg.pred_dir:
        if not cfg.input or not cfg.mask_dir:
            need = "pred_dir= needs input=<csv of scans> and" if cfg.pred_dir else "input=<csv> needs"
            raise UserError(f"evaluate with {need} mask_dir=<folder of true masks>")
        return sources.csv_records(Path(cfg.input), Path(cfg.input), Path(cfg.mask_dir))[0]
    config = load_checkpoint(Path(cfg.ckpt))["config"]
    from omegaconf import OmegaConf

    return source_records(OmegaConf.create(config["data"]), seed=config["seed"])[1]


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def _hydra_evaluate(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: evaluate_cases(cfg))


def main() -> None:
    run_entry(checked_entry(_hydra_evaluate, EvaluateConfig, tool="evaluate"))


if __name__ == "__main__":
    main()
