"""Pre-flight check of the data before training: one line per problem, naming the file and the CSV row.

Checked for every sample (each volume read once, several in parallel): the image and mask files exist and
read (``.pkl`` through the restricted unpickler), both are 3-D, they share shape and affine (a
bare ``.pkl`` array has none and takes its mask's),
the image has no NaN or Inf voxels, the mask holds only 0 and 1, the ``ich`` label agrees with the mask
(1 exactly when the mask has foreground). Across samples: duplicate rows (the same image file or
``case_id`` twice; the first is kept) and patients in both train and val (leakage, always an error).
Warnings: intensities that do not look like Hounsfield units and ``.pkl`` images without geometry.
CSV-level problems (missing file, no rows, missing columns) are raised earlier by ``samft.data.sources``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from samft.data.readers import Volume, read_volume
from samft.data.stats import case_summary, summarize_cases, voxel_spacing
from samft.devices import available_cpus
from samft.errors import UserError

GEOMETRY_ATOL_MM = 1e-2
"""Affines of an image and its mask may differ by this much (float32 headers round)."""


@dataclass
class PreflightReport:
    """What survived the check. ``skipped`` items: ``{"case_id", "origin", "split", "reason"}`` (the reason
    lists every problem of the sample, ``"; "``-separated); ``cases`` maps each kept ``case_id`` to its
    ``stats.case_summary``, so that ``stats()`` needs no second read."""

    train: list[dict]
    val: list[dict]
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cases: dict[str, dict] = field(default_factory=dict)

    def stats(self, records: list[dict] | None = None) -> dict:
        """``stats.dataset_stats`` of kept ``records`` (default: train + val) from the summaries in memory."""
        chosen = self.train + self.val if records is None else records
        return summarize_cases([self.cases[r["case_id"]] for r in chosen])

    def lines(self) -> list[str]:
        """The run's warning lines: one per skipped sample, then one per warning."""
        return [f"skipped {s['split']} sample {s['origin']}: {s['reason']}" for s in self.skipped] + self.warnings


@dataclass
class _Outcome:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    case: dict | None = None
    geometry_from: str = ""  # "image", "mask" (a bare .pkl array takes its mask's) or "none" (identity)


def preflight(
    train_records: list[dict],
    val_records: list[dict],
    *,
    on_bad_sample: str = "error",
    hu_range: tuple[float, float] = (-500.0, 3071.0),
    workers: int | None = None,
) -> PreflightReport:
    """Check every sample and return the kept ones.

    ``on_bad_sample="error"``: any problem raises one UserError listing them all (first line a summary).
    ``"skip"``: bad samples go to ``report.skipped`` with their reasons. Patient leakage between train and
    val raises in both modes, and so does a split left empty. ``hu_range=(air, top)``: an image whose
    0.5th intensity percentile is above ``air`` (no air: windowed, normalised or unscaled data) or whose
    99.5th percentile is above ``top`` gets a warning.
    """
    if on_bad_sample not in ("error", "skip"):
        raise UserError(f"data.on_bad_sample is {on_bad_sample!r}; use error or skip")
    if not train_records or not val_records:
        empty = "train" if not train_records else "val"
        raise UserError(f"the {empty} split has no samples; check the CSV or the split settings")

    tagged = [("train", r) for r in train_records] + [("val", r) for r in val_records]
    leaks = _leakage(train_records, val_records)
    duplicates = _duplicates([record for _, record in tagged])
    with ThreadPoolExecutor(max_workers=workers or min(4, available_cpus())) as pool:
        outcomes = list(
            pool.map(
                lambda i: _Outcome([duplicates[i]]) if i in duplicates else _check(tagged[i][1], hu_range),
                range(len(tagged)),
            )
        )

    report = PreflightReport(train=[], val=[])
    bad = [] if on_bad_sample == "skip" else [(r, o) for (_, r), o in zip(tagged, outcomes) if o.problems]
    if leaks or bad:
        lines = leaks + [f"{r['origin']}: {p}" for r, o in bad for p in o.problems]
        head = f"pre-flight check found {len(lines)} problem(s) in {len(tagged)} samples"
        if leaks and not bad:
            fix = "move each patient into one split only"
        elif leaks:
            fix = "fix them (leakage cannot be skipped: move each patient into one split only)"
        else:
            fix = "fix them, or set data.on_bad_sample=skip to leave bad samples out"
        raise UserError("\n  ".join([f"{head}; {fix}:", *lines]))
    for (split, record), outcome in zip(tagged, outcomes):
        report.warnings += [f"{record['origin']}: {w}" for w in outcome.warnings]
        if outcome.problems:
            report.skipped.append(
                {"case_id": record["case_id"], "origin": record["origin"], "split": split,
                 "reason": "; ".join(outcome.problems)}
            )
            continue
        getattr(report, split).append(record)
        report.cases[record["case_id"]] = outcome.case
    report.warnings += _geometry_warnings([(r, o) for (_, r), o in zip(tagged, outcomes) if o.case])
    for split in ("train", "val"):
        if not getattr(report, split):
            lines = [f"{s['origin']}: {s['reason']}" for s in report.skipped if s["split"] == split]
            raise UserError("\n  ".join([f"pre-flight check skipped every {split} sample:", *lines]))
    return report


def _leakage(train: list[dict], val: list[dict]) -> list[str]:
    val_by_patient: dict[str, dict] = {}
    for record in val:
        val_by_patient.setdefault(record["patient_id"], record)
    seen, lines = set(), []
    for record in train:
        patient = record["patient_id"]
        if patient in val_by_patient and patient not in seen:
            seen.add(patient)
            lines.append(
                f"patient_id {patient} is in train ({record['origin']}) and in val "
                f"({val_by_patient[patient]['origin']}): leakage"
            )
    return lines


def _duplicates(records: list[dict]) -> dict[int, str]:
    """``index -> problem`` for every repeat of an image file or ``case_id`` after its first row."""
    first_image: dict[str, dict] = {}
    first_case: dict[str, dict] = {}
    problems = {}
    for index, record in enumerate(records):
        image = os.path.realpath(record["image"])
        if image in first_image:
            problems[index] = f"duplicate row: same image as {first_image[image]['origin']}"
        elif record["case_id"] in first_case:
            problems[index] = (
                f"duplicate case_id {record['case_id']} (also {first_case[record['case_id']]['origin']}); "
                "rename one of the files"
            )
        first_image.setdefault(image, record)
        first_case.setdefault(record["case_id"], record)
    return problems


def _check(record: dict, hu_range: tuple[float, float]) -> _Outcome:
    outcome = _Outcome()
    try:
        image = read_volume(record["image"])
    except UserError as err:
        outcome.problems.append(f"image {err}")
        image = None
    mask = None
    if record["label"] is None:
        if record["ich"] == 1:
            outcome.problems.append("ich=1 but there is no mask file")
    else:
        try:
            mask = read_volume(record["label"])
        except UserError as err:
            outcome.problems.append(f"mask {err}")
    if image is not None:
        outcome.problems += _image_problems(image)
    if mask is not None:
        outcome.problems += _mask_problems(mask, record)
    if image is not None and mask is not None:
        outcome.problems += _pair_problems(image, mask)
    if outcome.problems or image is None:
        return outcome
    outcome.geometry_from = "image" if image.has_geometry else "mask" if mask is not None else "none"
    outcome.case = case_summary(record, image, mask)
    low, high = np.percentile(outcome.case["intensity_sample"], [0.5, 99.5])
    if low > hu_range[0] or high > hu_range[1]:
        outcome.warnings.append(
            f"{record['image']}: intensities p0.5..p99.5 = {low:.0f}..{high:.0f} do not look like Hounsfield "
            "units (air about -1000, bone above 300); check the rescale slope and intercept, or whether the "
            "volume was already windowed or normalised"
        )
    return outcome


def _geometry_warnings(kept: list[tuple[dict, _Outcome]]) -> list[str]:
    """One line per kind of ``.pkl`` image that carries no spacing or affine (bare arrays)."""
    lines = []
    from_mask = [r["image"] for r, o in kept if o.geometry_from == "mask"]
    if from_mask:
        lines.append(
            f"{len(from_mask)} image(s) have no spacing or affine (e.g. {from_mask[0]}): their mask's geometry "
            "is used"
        )
    identity = [r["image"] for r, o in kept if o.geometry_from == "none"]
    if identity:
        lines.append(
            f"{len(identity)} image(s) without mask have no spacing or affine (e.g. {identity[0]}): 1 mm "
            "isotropic voxels assumed; save the .pkl as a dict with 'spacing' or 'affine' for true sizes"
        )
    return lines


def _image_problems(image: Volume) -> list[str]:
    if image.array.dtype.kind != "f":
        return []
    finite = np.isfinite(image.array)
    if finite.all():
        return []
    return [f"image has {finite.size - np.count_nonzero(finite)} NaN or Inf voxel(s)"]


def _mask_problems(mask: Volume, record: dict) -> list[str]:
    binary = (mask.array == 0) | (mask.array == 1)
    if not binary.all():
        others = np.unique(mask.array[~binary])
        shown = ", ".join(f"{v:g}" for v in others[:5]) + (", ..." if others.size > 5 else "")
        return [f"mask {record['label']} holds values other than 0 and 1 ({shown}); save it as a 0/1 mask"]
    lesion = int(np.count_nonzero(mask.array))
    if record["ich"] == 1 and lesion == 0:
        return [f"ich=1 but the mask {record['label']} is empty"]
    if record["ich"] == 0 and lesion > 0:
        return [f"ich=0 but the mask {record['label']} has {lesion} lesion voxel(s)"]
    return []


def _pair_problems(image: Volume, mask: Volume) -> list[str]:
    if image.array.shape != mask.array.shape:
        return [f"image shape {image.array.shape} and mask shape {mask.array.shape} differ"]
    # a bare .pkl array has no geometry of its own: the datamodule gives it the mask's
    if image.has_geometry and not np.allclose(image.affine, mask.affine, atol=GEOMETRY_ATOL_MM):
        return [
            f"image and mask geometry differ: image {_geometry(image)}, mask {_geometry(mask)}; "
            "they must share one voxel grid"
        ]
    return []


def _geometry(volume: Volume) -> str:
    spacing = "x".join(f"{s:.3g}" for s in voxel_spacing(volume.affine))
    origin = ", ".join(f"{o:.1f}" for o in volume.affine[:3, 3])
    return f"spacing {spacing} mm, origin ({origin}), axes {''.join(nib.aff2axcodes(volume.affine))}"
