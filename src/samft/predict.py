"""`python -m samft.predict`: NIfTI masks for new scans, on each scan's own grid (same shape and affine)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from samft.cli import exit_on_user_error, run_entry
from samft.errors import UserError

log = logging.getLogger("samft.predict")
SCAN_SUFFIXES = (".nii", ".nii.gz", ".pkl", ".pickle")


@dataclass(frozen=True)
class Job:
    image: Path
    mask_out: Path
    prob_out: Path | None
    points: list[list[float]] | None


def scan_stem(path: Path) -> str:
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_inputs(source: Path) -> list[Path]:
    """The scans named by `input`: one file, every scan in a folder, or the `path` column of a CSV."""
    if source.suffix == ".csv":
        import pandas as pd

        table = pd.read_csv(source)
        if "path" not in table.columns:
            raise UserError(f"{source}: a CSV input needs a 'path' column (found {', '.join(table.columns)})")
        return [(source.parent / p).resolve() if not Path(p).is_absolute() else Path(p) for p in table["path"]]
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.name.endswith(SCAN_SUFFIXES))
        if not scans:
            raise UserError(f"input folder {source} holds no .nii, .nii.gz or .pkl scans")
        return scans
    if not source.exists():
        raise UserError(f"input {source} does not exist; pass a scan, a folder of scans or a CSV")
    return [source]


def plan_jobs(*, source: Path, output: Path, points_file: Path | None, probabilities: bool) -> list[Job]:
    scans = list_inputs(source)
    points = json.loads(points_file.read_text()) if points_file else {}
    single_file = output.name.endswith((".nii", ".nii.gz"))
    if single_file and len(scans) != 1:
        raise UserError(f"output={output} names one file but input has {len(scans)} scans; pass a folder")
    jobs = []
    for scan in scans:
        mask_out = output if single_file else output / f"{scan_stem(scan)}_mask.nii.gz"
        prob_out = mask_out.with_name(mask_out.name.replace("_mask", "").replace(".nii", "_prob.nii", 1))
        jobs.append(Job(scan, mask_out, prob_out if probabilities else None, points.get(scan.name)))
    return jobs


def run_predictions(cfg: DictConfig) -> list[str]:
    """Predict every input; returns one failure line per scan that could not be processed."""
    import nibabel as nib
    import numpy as np
    from tqdm import tqdm

    from samft.devices import resolve_device
    from samft.inference import Predictor

    device = resolve_device(cfg.device, key="device")
    jobs = plan_jobs(source=Path(cfg.input), output=Path(cfg.output),
                     points_file=Path(cfg.points) if cfg.points else None, probabilities=cfg.probabilities)
    predictor = Predictor(Path(cfg.ckpt), device=device, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size)
    if predictor.prompt_mode == "click" and any(job.points is None for job in jobs):
        log.warning("this model was trained with click prompts (model.prompt_mode=click): its prompt-free masks "
                    "are weaker; pass points=<clicks.json> or train with model.prompt_mode=both or auto")
    failures = []
    for job in tqdm(jobs, desc="predict", unit="scan"):
        try:
            prediction = predictor.predict(job.image, points=job.points)
        except UserError as err:
            failures.append(f"{job.image}: {err}")
            log.error("%s: %s", job.image, err)
            continue
        job.mask_out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(prediction.mask(cfg.threshold), prediction.affine), job.mask_out)
        if job.prob_out is not None:
            nib.save(nib.Nifti1Image(prediction.probabilities.astype(np.float32), prediction.affine), job.prob_out)
        log.info("%s -> %s", job.image, job.mask_out)
    return failures


@hydra.main(config_path="../../conf", config_name="predict", version_base="1.3")
def _hydra_predict(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: _predict_all(cfg))


def _predict_all(cfg: DictConfig) -> None:
    failures = run_predictions(cfg)
    if failures:
        raise UserError(f"{len(failures)} scan(s) failed: " + " | ".join(failures))


def main() -> None:
    run_entry(_hydra_predict)


if __name__ == "__main__":
    main()
