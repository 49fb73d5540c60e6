"""`python -m samft.predict`: masks for new scans on each scan's own grid: NIfTI (same shape and affine), or a
DICOM Segmentation referencing the source series (`output_format=dicom_seg`, for DICOM series inputs)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from samft.cli import exit_on_user_error, run_entry
from samft.errors import UserError

log = logging.getLogger("samft.predict")
SCAN_SUFFIXES = (".nii", ".nii.gz", ".pkl", ".pickle")
OUTPUT_FORMATS = ("nifti", "dicom_seg")
OUTPUT_SUFFIXES = {"nifti": (".nii", ".nii.gz"), "dicom_seg": (".dcm",)}


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
    return name if path.is_dir() else path.stem  # a DICOM series folder keeps its whole name (UIDs hold dots)


def list_inputs(source: Path) -> list[Path]:
    """The scans named by `input`: one file or DICOM series folder; the scan files in a folder and every DICOM
    series folder under it (at any depth: patient/study/series layouts); or the `path` column of a CSV."""
    from samft.data.dicom import is_series_folder

    if source.suffix == ".csv":
        import pandas as pd

        table = pd.read_csv(source)
        if "path" not in table.columns:
            raise UserError(f"{source}: a CSV input needs a 'path' column (found {', '.join(table.columns)})")
        return [(source.parent / p).resolve() if not Path(p).is_absolute() else Path(p) for p in table["path"]]
    if is_series_folder(source):
        return [source]
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(SCAN_SUFFIXES))
        scans += sorted(Path(folder) for folder, _, _ in os.walk(source) if is_series_folder(folder))
        if not scans:
            raise UserError(
                f"input folder {source} holds no .nii, .nii.gz or .pkl scans, DICOM files or DICOM series folders"
            )
        return scans
    if not source.exists():
        raise UserError(f"input {source} does not exist; pass a scan, a DICOM series folder, a folder of them or a CSV")
    return [source]


def output_stem(scan: Path, source: Path) -> str:
    """The output name of a scan: its stem; a series folder found under the input folder is named by its path
    there (`patient1/study/CT` -> `patient1_study_CT`), so equally named series of different patients differ."""
    if scan.is_dir() and source.is_dir() and scan != source and scan.is_relative_to(source):
        return "_".join(scan.relative_to(source).parts)
    return scan_stem(scan)


def plan_jobs(
    *, source: Path, output: Path, points_file: Path | None, probabilities: bool, output_format: str = "nifti"
) -> list[Job]:
    """One job per input scan. `output_format=dicom_seg` needs every input to be a DICOM series folder."""
    if output_format not in OUTPUT_FORMATS:
        raise UserError(f"output_format is {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    scans = list_inputs(source)
    if output_format == "dicom_seg":
        not_series = [str(s) for s in scans if not s.is_dir()]
        if not_series:
            raise UserError(
                f"output_format=dicom_seg needs DICOM series inputs (a SEG references its source slices), but "
                f"{not_series[0]}{f' and {len(not_series) - 1} more' if len(not_series) > 1 else ''} is not a "
                "series folder; use output_format=nifti for these"
            )
    points = json.loads(points_file.read_text()) if points_file else {}
    single_file = output.name.endswith(OUTPUT_SUFFIXES[output_format])
    other = next((f for f, ends in OUTPUT_SUFFIXES.items() if f != output_format and output.name.endswith(ends)), None)
    if other is not None:
        raise UserError(f"output={output} names a {other} file, but output_format={output_format}; name a "
                        f"{' or '.join(OUTPUT_SUFFIXES[output_format])} file or a folder, or set output_format={other}")
    if single_file and len(scans) != 1:
        raise UserError(f"output={output} names one file but input has {len(scans)} scans; pass a folder")
    jobs = []
    for scan in scans:
        if output_format == "dicom_seg":
            mask_out = output if single_file else output / f"{output_stem(scan, source)}_seg.dcm"
            prob_out = mask_out.with_name(mask_out.name[: -len(".dcm")] + "_prob.dcm")
        else:
            mask_out = output if single_file else output / f"{output_stem(scan, source)}_mask.nii.gz"
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
    output_format = cfg.get("output_format", "nifti")
    jobs = plan_jobs(source=Path(cfg.input), output=Path(cfg.output),
                     points_file=Path(cfg.points) if cfg.points else None, probabilities=cfg.probabilities,
                     output_format=output_format)
    predictor = Predictor(Path(cfg.ckpt), device=device, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
                          postprocess=cfg.postprocess)
    if predictor.prompt_mode == "click" and any(job.points is None for job in jobs):
        log.warning("this model was trained with click prompts (model.prompt_mode=click): its prompt-free masks "
                    "are weaker; pass points=<clicks.json> or train with model.prompt_mode=both or auto")
    failures = []
    for job in tqdm(jobs, desc="predict", unit="scan"):
        try:
            prediction = predictor.predict(job.image, points=job.points)
            if output_format == "dicom_seg":
                _write_segmentations(job, prediction, ckpt=Path(cfg.ckpt), threshold=cfg.threshold)
        except UserError as err:
            failures.append(f"{job.image}: {err}")
            log.error("%s: %s", job.image, err)
            continue
        if output_format == "nifti":
            job.mask_out.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(prediction.mask(cfg.threshold), prediction.affine), job.mask_out)
            if job.prob_out is not None:
                probabilities = prediction.probabilities.astype(np.float32)
                nib.save(nib.Nifti1Image(probabilities, prediction.affine), job.prob_out)
        log.info("%s -> %s", job.image, job.mask_out)
    return failures


def _write_segmentations(job: Job, prediction, *, ckpt: Path, threshold: float) -> None:
    """The binary SEG, and the FRACTIONAL (probability) SEG when asked for, of one series."""
    from samft.dicom_seg import write_segmentation

    write_segmentation(series_folder=job.image, mask=prediction.mask(threshold), affine=prediction.affine,
                       output=job.mask_out, checkpoint=ckpt)
    if job.prob_out is not None:
        write_segmentation(series_folder=job.image, mask=prediction.probabilities, affine=prediction.affine,
                           output=job.prob_out, checkpoint=ckpt, fractional=True)


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
