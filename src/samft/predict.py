"""`python -m samft.predict`: masks for new scans on each scan's own grid: NIfTI (same shape and affine), or a
DICOM Segmentation referencing the source series (`output_format=dicom_seg`, for DICOM series inputs)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import MISSING, DictConfig

from samft.choices import MODEL_TOOL_CHOICES, MODEL_TOOL_RANGES
from samft.cli import exit_on_user_error, run_entry
from samft.config import ModelToolConfig, refuse_unknown_overrides, validate_tool
from samft.errors import UserError

log = logging.getLogger("samft.predict")
OUTPUT_FORMATS = ("nifti", "dicom_seg")
OUTPUT_SUFFIXES = {"nifti": (".nii", ".nii.gz"), "dicom_seg": (".dcm",)}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class PredictConfig(ModelToolConfig):
    """`conf/predict.yaml`'s keys (see there)."""

    ckpt: str = MISSING
    input: str = MISSING
    output: str = MISSING
    output_format: str = "nifti"
    probabilities: bool = False


def check_model_tool(cfg: DictConfig, schema: type, *, tool: str) -> DictConfig:
    """The typed, checked config of predict or evaluate: one UserError naming the key, before any work."""
    typed = validate_tool(cfg, schema, tool=tool, choices=MODEL_TOOL_CHOICES, ranges=MODEL_TOOL_RANGES)
    if not typed.overlap < 1:
        raise UserError(f"config key 'overlap' is {typed.overlap}; it must be >= 0 and < 1 (a sliding-window "
                        "overlap fraction)")
    if not DEVICE_PATTERN.match(typed.device):
        raise UserError(f"config key 'device' is {typed.device!r}; use auto, cpu, cuda or cuda:<index>")
    return typed


def checked_entry(hydra_main: Callable[[], None], schema: type, *, tool: str) -> Callable[[], None]:
    """`hydra_main` preceded by the check of the command line's keys against `schema`."""

    def entry() -> None:
        refuse_unknown_overrides(sys.argv[1:], schema, tool=tool)
        hydra_main()

    return entry


@dataclass(frozen=True)
class Job:
    image: Path
    mask_out: Path
    prob_out: Path | None
    points: list[list[float]] | None


def list_inputs(source: Path) -> list[Path]:
    """The scans named by `input`: one file or DICOM series folder; the scan files in a folder and every DICOM
    series folder under it (at any depth: patient/study/series layouts); or the `path` column of a CSV."""
    from samft.data.dicom import is_series_folder
    from samft.data.readers import VOLUME_SUFFIXES

    if source.suffix.lower() == ".csv":
        from samft.data.sources import _read_csv

        table = _read_csv(source, ("path",))  # missing, empty, unparsable and header-only CSVs: one line
        empty = [str(index + 2) for index, cell in enumerate(table["path"]) if not cell.strip()]
        if empty:
            raise UserError(f"{source}: the 'path' cell is empty on line(s) {', '.join(empty[:10])}; give each row "
                            "a scan path")
        paths = [Path(cell.strip()) for cell in table["path"]]
        return [p if p.is_absolute() else (source.parent / p).resolve() for p in paths]
    if is_series_folder(source):
        return [source]
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
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
    from samft.data.readers import volume_stem

    if scan.is_dir() and source.is_dir() and scan != source and scan.is_relative_to(source):
        return "_".join(scan.relative_to(source).parts)
    return volume_stem(scan)


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
    points = read_points(points_file) if points_file else {}
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
    unmatched = sorted(set(points) - {job.image.name for job in jobs})
    if unmatched:
        log.warning("points names %d file(s) that are not inputs (e.g. %s); those clicks are not used",
                    len(unmatched), unmatched[0])
    check_outputs(jobs, source=source, output=output, single_file=single_file)
    return jobs


def read_points(path: Path) -> dict[str, list[list[float]]]:
    """The points JSON: {"<scan file name>": [[x, y, z, label], ...]} with finite coordinates and label 0 or 1.
    Anything else (missing, unparsable, another shape) is one UserError naming the file and the entry."""
    try:
        points = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"points file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"points file {path} is not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(points, dict):
        raise UserError(f"points file {path} holds a {type(points).__name__}; expected an object "
                        '{"<scan file name>": [[x, y, z, label], ...]}')
    for name, clicks in points.items():
        if not valid_clicks(clicks):
            raise UserError(f"points file {path}: the entry for {name!r} is {str(clicks)[:80]}; expected a non-empty "
                            "list of [x, y, z, label] with finite voxel coordinates and label 0 or 1")
    return points


def valid_clicks(clicks: Any) -> bool:
    """Whether `clicks` is a non-empty list of [x, y, z, label]: finite numbers, label 0 or 1."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    return isinstance(clicks, list) and bool(clicks) and all(
        isinstance(c, list) and len(c) == 4 and all(number(v) for v in c) and c[3] in (0, 1) for c in clicks)


def check_outputs(jobs: list[Job], *, source: Path, output: Path, single_file: bool) -> None:
    """Refuse, before any inference, outputs that would overwrite each other or an input, outputs inside the
    input folder (a later run would read them as scans), and an output folder under a file."""
    written: dict[Path, Path] = {}
    for job in jobs:
        for path in (job.mask_out, job.prob_out):
            if path is None:
                continue
            key = path.resolve()
            if key in written:
                raise UserError(f"{written[key]} and {job.image} would both be written to {path} (same output "
                                "name); rename one or predict them into different output folders")
            written[key] = job.image
    inputs = {job.image.resolve() for job in jobs} | {source.resolve()}
    for path in written:
        for scan in inputs:
            if path == scan or scan.is_dir() and path.is_relative_to(scan):
                raise UserError(f"output {output} would write {path} {'over' if path == scan else 'inside'} the "
                                f"input {scan}; choose an output outside the inputs")
    folder = output.parent if single_file else output
    if source.is_file() and source.suffix.lower() == ".csv":  # a batch: masks are not mixed into a scan folder
        holding = next((job.image for job in jobs if job.image.resolve().parent == folder.resolve()), None)
        if holding is not None:
            raise UserError(f"output folder {folder} holds input scans (e.g. {holding.name}); write the masks to "
                            "another folder")
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output {output}: {parent} is a file, not a folder; choose another output")
            break


def run_predictions(cfg: DictConfig) -> list[str]:
    """Predict every input; returns one failure line per scan that could not be processed."""
    import nibabel as nib
    import numpy as np
    from tqdm import tqdm

    from samft.devices import resolve_device
    from samft.inference import Predictor

    cfg = check_model_tool(cfg, PredictConfig, tool="predict")
    device = resolve_device(cfg.device, key="device")
    output_format = cfg.output_format
    jobs = plan_jobs(source=Path(cfg.input), output=Path(cfg.output),
                     points_file=Path(cfg.points) if cfg.points else None, probabilities=cfg.probabilities,
                     output_format=output_format)
    predictor = Predictor(Path(cfg.ckpt), device=device, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
                          postprocess=cfg.postprocess, nonfinite=cfg.nonfinite, max_voxels=cfg.max_voxels,
                          precision=cfg.precision)
    without_geometry = []
    if predictor.prompt_mode == "click" and any(job.points is None for job in jobs):
        log.warning("this model was trained with click prompts (model.prompt_mode=click): its prompt-free masks "
                    "are weaker; pass points=<clicks.json> or train with model.prompt_mode=both or auto")
    failures = []
    for job in tqdm(jobs, desc="predict", unit="scan"):
        try:
            prediction = predictor.predict(job.image, points=job.points)
            if not prediction.has_geometry:
                without_geometry.append(job.image.name)
            if output_format == "dicom_seg":
                _write_segmentations(job, prediction, ckpt=Path(cfg.ckpt), threshold=cfg.threshold)
            else:
                write_atomically(job.mask_out, lambda tmp, p=prediction: nib.save(
                    nib.Nifti1Image(p.mask(cfg.threshold), p.affine), tmp))
                if job.prob_out is not None:
                    probabilities = prediction.probabilities.astype(np.float32)
                    write_atomically(job.prob_out, lambda tmp, p=prediction, v=probabilities: nib.save(
                        nib.Nifti1Image(v, p.affine), tmp))
        except UserError as err:
            failures.append(f"{job.image}: {err}")
            log.error("%s: %s", job.image, err)
            continue
        except OSError as err:  # a full disk or a folder without write permission: this scan fails, not the batch
            failures.append(f"{job.image}: cannot write {job.mask_out} ({err.strerror or err})")
            log.error("%s: cannot write %s (%s)", job.image, job.mask_out, err)
            continue
        log.info("%s -> %s", job.image, job.mask_out)
    if without_geometry:
        log.warning("%d scan(s) carry no geometry (bare .pkl arrays, e.g. %s): read with 1 mm voxels (the identity "
                    "affine), as training reads a negative scan without a mask", len(without_geometry),
                    without_geometry[0])
    return failures


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path` (same suffix), then rename it onto `path`: an interrupted
    run leaves the previous file or none, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_segmentations(job: Job, prediction, *, ckpt: Path, threshold: float) -> None:
    """The binary SEG, and the FRACTIONAL (probability) SEG when asked for, of one series."""
    from samft.dicom_seg import write_segmentation

    write_atomically(job.mask_out, lambda tmp: write_segmentation(
        series_folder=job.image, mask=prediction.mask(threshold), affine=prediction.affine, output=tmp,
        checkpoint=ckpt))
    if job.prob_out is not None:
        prob_out = job.prob_out
        write_atomically(prob_out, lambda tmp: write_segmentation(
            series_folder=job.image, mask=prediction.probabilities, affine=prediction.affine, output=tmp,
            checkpoint=ckpt, fractional=True))


@hydra.main(config_path="../../conf", config_name="predict", version_base="1.3")
def _hydra_predict(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: _predict_all(cfg))


def _predict_all(cfg: DictConfig) -> None:
    failures = run_predictions(cfg)
    if failures:
        raise UserError(f"{len(failures)} scan(s) failed: " + " | ".join(failures))


def main() -> None:
    run_entry(checked_entry(_hydra_predict, PredictConfig, tool="predict"))


if __name__ == "__main__":
    main()
