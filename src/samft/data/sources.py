"""Data sources: turn the users' layouts into train and val lists of sample records.

Every layout of the README's "Data formats" section becomes the same records, which the pre-flight check
(``samft.data.preflight``) and the data module (``samft.data.datamodule``) take. A record is a plain dict::

    {"image": str, "label": str | None, "ich": 0 | 1, "patient_id": str, "case_id": str, "origin": str}

``label=None`` means "no mask file: the mask is empty". Sources check what they can see without opening
volumes (files, columns, cells); everything that needs the voxels is ``samft.data.preflight``'s job, and
records whose files are missing are still returned so that the pre-flight check reports them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from samft.data.readers import NIFTI_SUFFIXES, read_volume, volume_stem
from samft.errors import UserError

CSV_COLUMNS = ("path", "ich", "patient_id")
CT_ICH_CSV = "hemorrhage_diagnosis_raw_ct.csv"
CT_ICH_COLUMNS = ("PatientNumber", "No_Hemorrhage")


def csv_records(
    train_csv: str | Path, val_csv: str | Path, mask_dir: str | Path
) -> tuple[list[dict], list[dict]]:
    """Records from the predecessor's CSVs (columns ``path,ich,patient_id``; one row per volume).

    ``path`` points to the image (``.pkl``, ``.nii``/``.nii.gz``, or a DICOM series folder); a relative path
    resolves against the CSV's folder. The mask of image ``{stem}.pkl`` (or of the series folder ``{stem}``)
    is ``{mask_dir}/{stem}.nii`` or ``{stem}.nii.gz``.
    A row with ``ich=0`` and no mask file gets ``label=None``: an empty mask (a negative scan). A row with
    ``ich=1`` and no mask file keeps the expected ``{stem}.nii`` path, which the pre-flight check reports as
    missing. Raises UserError for a missing or empty CSV, missing columns, malformed cells, a missing
    ``mask_dir`` or a stem with both ``.nii`` and ``.nii.gz`` masks (all such rows listed).
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise UserError(f"data.mask_dir {mask_dir} is not a folder; point it at the folder of .nii masks")
    return _csv_split(Path(train_csv), mask_dir), _csv_split(Path(val_csv), mask_dir)


def _csv_split(csv_path: Path, mask_dir: Path) -> list[dict]:
    table = _read_csv(csv_path, CSV_COLUMNS)
    records, problems = [], []
    for index, row in table.iterrows():
        origin = f"{csv_path} line {index + 2}"  # line 1 is the header
        path, ich, patient = row["path"].strip(), _binary(row["ich"]), row["patient_id"].strip()
        bad = [
            f"ich is {row['ich']!r}, expected 0 or 1" if ich is None else "",
            "path is empty" if not path else "",
            "patient_id is empty" if not patient else "",
        ]
        if any(bad):
            problems.append(f"{origin}: " + "; ".join(b for b in bad if b))
            continue
        image = Path(path) if Path(path).is_absolute() else csv_path.parent / path
        stem = volume_stem(image)
        masks = _existing_masks(mask_dir, stem)
        if len(masks) > 1:
            problems.append(f"{origin}: both {masks[0]} and {masks[1]} exist; keep one")
            continue
        records.append(
            {"image": str(image), "label": _label(masks, mask_dir, stem, ich), "ich": ich,
             "patient_id": patient, "case_id": stem, "origin": origin}
        )
    _raise_all(problems, f"{csv_path} has {len(problems)} malformed row(s)")
    return records


def ct_ich_records(
    root: str | Path, *, val_fraction: float, seed: int, split_file: str | Path | None = None
) -> tuple[list[dict], list[dict]]:
    """Records from the PhysioNet CT-ICH layout, split by patient.

    ``root/ct_scans/NNN.nii`` (one scan per patient), ``root/masks/NNN.nii`` and
    ``root/hemorrhage_diagnosis_raw_ct.csv`` (one row per slice; ``ich=1`` when any slice of the patient has
    ``No_Hemorrhage=0``). The scans present define the samples (the release lacks scans of patients 59-65
    that the CSV may list). The split comes from ``split_file`` (see ``split_records``) or is drawn with
    ``seed``, stratified by ``ich``, ``val_fraction`` of the patients going to val.
    """
    root = Path(root)
    scan_dir, mask_dir, csv_path = root / "ct_scans", root / "masks", root / CT_ICH_CSV
    for folder in (scan_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f"data.root {root} has no {folder.name}/ folder; point it at the CT-ICH release")
    table = _read_csv(csv_path, CT_ICH_COLUMNS)
    numbers = pd.to_numeric(table["PatientNumber"], errors="coerce")
    no_hem = pd.to_numeric(table["No_Hemorrhage"], errors="coerce")
    bad = [f"{csv_path} line {i + 2}" for i in table.index[numbers.isna() | ~no_hem.isin([0, 1])]]
    _raise_all(bad, f"{csv_path}: PatientNumber must be a number and No_Hemorrhage 0 or 1")
    ich_by_patient = (no_hem == 0).groupby(numbers.astype(int)).any()

    records, problems = [], []
    for scan in _nifti_files(scan_dir):
        stem = volume_stem(scan)
        if not stem.isdigit():
            problems.append(f"{scan}: expected a numeric name like 049.nii")
            continue
        if int(stem) not in ich_by_patient.index:
            problems.append(f"{scan}: patient {int(stem)} has no rows in {csv_path.name}")
            continue
        ich = int(ich_by_patient[int(stem)])
        label = _label(_existing_masks(mask_dir, stem), mask_dir, stem, ich)
        records.append(
            {"image": str(scan), "label": label, "ich": ich, "patient_id": stem, "case_id": stem,
             "origin": f"ct_scans/{scan.name} (patient {int(stem)})"}
        )
    _raise_all(problems, f"{scan_dir}: {len(problems)} scan(s) cannot be matched to {csv_path.name}")
    if not records:
        raise UserError(f"{scan_dir} holds no .nii scans; point data.root at the CT-ICH release")
    return split_records(records, val_fraction=val_fraction, seed=seed, split_file=split_file)


def nifti_folder_records(
    image_dir: str | Path,
    label_dir: str | Path,
    *,
    val_fraction: float,
    seed: int,
    split_file: str | Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """Records from plain folders: ``image_dir/{name}.nii[.gz]`` with its mask ``label_dir/{name}.nii[.gz]``.

    Every image needs a mask (a missing one is reported by the pre-flight check); ``ich`` is 1 when the
    mask has foreground (so the masks are read once here). Each file is its own patient unless
    ``split_file`` says otherwise; the split is drawn as in ``split_records``.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for key, folder in (("data.image_dir", image_dir), ("data.label_dir", label_dir)):
        if not folder.is_dir():
            raise UserError(f"{key} {folder} is not a folder")
    images = _nifti_files(image_dir)
    if not images:
        raise UserError(f"data.image_dir {image_dir} holds no .nii or .nii.gz files")
    labels = []
    for image in images:
        stem = volume_stem(image)
        labels.append(Path(_label(_existing_masks(label_dir, stem), label_dir, stem, ich=1)))
    with ThreadPoolExecutor(max_workers=4) as pool:
        positive = list(pool.map(_has_foreground, labels))
    records = [
        {"image": str(image), "label": str(label), "ich": int(pos), "patient_id": volume_stem(image),
         "case_id": volume_stem(image), "origin": str(image)}
        for image, label, pos in zip(images, labels, positive)
    ]
    return split_records(records, val_fraction=val_fraction, seed=seed, split_file=split_file)


def split_records(
    records: list[dict], *, val_fraction: float, seed: int, split_file: str | Path | None = None
) -> tuple[list[dict], list[dict]]:
    """Split records by ``patient_id``: from ``split_file`` or drawn with ``seed``.

    ``split_file`` is JSON ``{"train": [patient ids], "val": [patient ids]}``; numeric ids match with or
    without leading zeros (``49`` = ``"049"``). Every patient must be listed exactly once. Without it,
    patients are shuffled with ``seed`` separately for ``ich`` 0 and 1 and ``val_fraction`` of each group
    (at least one patient overall) goes to val.
    """
    patients: dict[str, int] = {}
    for record in records:
        patients[record["patient_id"]] = max(patients.get(record["patient_id"], 0), record["ich"])
    if split_file is not None:
        val_ids = _read_split_file(Path(split_file), set(patients))
    else:
        if not 0.0 < val_fraction < 1.0 or len(patients) < 2:
            raise UserError(
                f"cannot split {len(patients)} patient(s) with data.val_fraction={val_fraction}; "
                "give 0 < val_fraction < 1 and at least two patients, or a data.split_file"
            )
        rng = random.Random(seed)
        val_ids = set()
        for ich in (0, 1):
            group = sorted(p for p, v in patients.items() if v == ich)
            rng.shuffle(group)
            val_ids.update(group[: round(val_fraction * len(group))])
        if not val_ids:
            val_ids.add(rng.choice(sorted(patients)))
        if len(val_ids) == len(patients):
            val_ids.remove(rng.choice(sorted(val_ids)))
    train = [r for r in records if r["patient_id"] not in val_ids]
    val = [r for r in records if r["patient_id"] in val_ids]
    return train, val


def _read_split_file(path: Path, patients: set[str]) -> set[str]:
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"data.split_file {path}: cannot read it as JSON ({err})") from err
    if not isinstance(split, dict) or not {"train", "val"} <= set(split) or not all(
        isinstance(split[k], list) for k in ("train", "val")
    ):
        raise UserError(f'data.split_file {path}: expected {{"train": [patient ids], "val": [patient ids]}}')
    canonical = {_canonical_id(p): p for p in patients}
    assigned: dict[str, list[str]] = {}
    unknown = []
    for part in ("train", "val"):
        for raw in split[part]:
            patient = canonical.get(_canonical_id(raw))
            if patient is None:
                unknown.append(str(raw))
            else:
                assigned.setdefault(patient, []).append(part)
    problems = [f"unknown patient id(s): {', '.join(unknown)}"] if unknown else []
    twice = sorted(p for p, parts in assigned.items() if len(parts) > 1)
    if twice:
        problems.append(f"listed more than once: {', '.join(twice)}")
    missing = sorted(patients - set(assigned))
    if missing:
        problems.append(f"not listed in train or val: {', '.join(missing)}")
    if problems:
        raise UserError(f"data.split_file {path}: " + "; ".join(problems))
    return {p for p, parts in assigned.items() if parts == ["val"]}


def _canonical_id(value: object) -> str:
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _read_csv(path: Path, columns: Iterable[str]) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the CSV is empty; it needs a header {','.join(columns)} and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot parse the CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(table.columns) or 'none'})"
        )
    if table.empty:
        raise UserError(f"{path}: the CSV has a header but no rows")
    return table


def _binary(value: str) -> int | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def _existing_masks(folder: Path, stem: str) -> list[Path]:
    """The mask files ``{stem}.nii`` and ``{stem}.nii.gz`` in ``folder``, their suffix in lower or upper case."""
    names = [f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES]
    names += [f"{stem}{suffix.upper()}" for suffix in NIFTI_SUFFIXES]
    return [folder / name for name in dict.fromkeys(names) if (folder / name).is_file()]


def _label(masks: list[Path], folder: Path, stem: str, ich: int) -> str | None:
    """The first existing mask; else None (empty mask) for a negative, the expected ``.nii`` path otherwise."""
    if masks:
        return str(masks[0])
    return None if ich == 0 else str(folder / f"{stem}.nii")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))


def _has_foreground(label: Path) -> bool:
    """Whether a mask has any non-zero voxel; False for a missing or unreadable file (pre-flight reports it)."""
    try:
        return bool(np.any(read_volume(label).array))
    except UserError:
        return False


def _raise_all(problems: list[str], summary: str) -> None:
    if problems:
        raise UserError("\n  ".join([summary + ":", *problems]))
