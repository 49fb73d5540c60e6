"""One split of the semi-synthetic data set: a volume per mask plus negatives, the CSVs and the manifest."""

from __future__ import annotations

import csv
import logging
import pickle
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from samft.data.readers import volume_stem
from samft.errors import UserError
from samft.synth.placement import ORIENTATIONS, place_lesion, read_lesion
from samft.synth.render import Variation, render
from samft.synth.scan import load_scan

log = logging.getLogger("samft.data")

BLOOD_HU = (50.0, 90.0)
SPLITS = ("train", "val")
MANIFEST_COLUMNS = (
    "stem", "ich", "status", "source_ml", "written_ml", "blood_hu", "shift_x", "shift_y", "rotation_deg", "flips",
    "note",
)


def insert_lesions(
    *,
    ct_path: str | Path,
    mask_paths: Sequence[str | Path],
    out_dir: str | Path,
    split: str,
    seed: int = 0,
    negatives: int | None = None,
    sulci_mm: float = 0.0,
) -> list[dict]:
    """Write one ``split`` (train or val) of a semi-synthetic data set into ``out_dir``; returns its records.

    One volume per mask (its lesion inserted into the scan at ``ct_path``; a mask whose lesion does not fit
    in the brain in ``ORIENTATIONS`` orientations is skipped, logged as a warning and listed in
    ``{split}_lesions.csv``) and ``negatives`` lesion-free volumes (default: half the inserted ones, rounded
    up: a third of the split); ``sulci_mm``: see ``brain_mask``. The records are those that
    ``samft.data.sources.csv_records`` returns for the written CSV.
    """
    if split not in SPLITS:
        raise UserError(f"split is {split!r}; use train or val")
    if seed < 0:
        raise UserError(f"seed is {seed}; use a non-negative integer")
    if negatives is not None and negatives < 0:
        raise UserError(f"negatives is {negatives}; use 0 or more")
    out_dir = Path(out_dir)
    paths = [Path(p) for p in mask_paths]
    if not paths:
        raise UserError(f"no masks given for the {split} split")
    stems = [volume_stem(p) for p in paths]
    _check_names(out_dir, split, stems)
    scan = load_scan(ct_path, sulci_mm=sulci_mm)
    variation = Variation(scan, seed)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows, manifest = [], []
    for index, (path, stem) in enumerate(zip(paths, stems)):
        if index and index % 25 == 0:
            log.info("%s: %d of %d masks done", split, index, len(paths))
        rng = _rng(seed, stem)
        lesion = read_lesion(path)
        insertion = None if lesion is None else place_lesion(scan, lesion, rng)
        if insertion is None:
            note = "the mask is empty" if lesion is None else (
                f"its {lesion.volume_mm3 / 1000:.1f} ml lesion does not fit inside the brain parenchyma in "
                f"{ORIENTATIONS} orientations")
            log.warning("skipped %s: %s", path, note)
            manifest.append({"stem": stem, "ich": 1, "status": "skipped", "note": note,
                             "source_ml": "" if lesion is None else round(lesion.volume_mm3 / 1000, 4)})
            continue
        blood_hu = float(rng.uniform(*BLOOD_HU))
        image, mask, shift = render(scan, variation, rng, (insertion, blood_hu))
        _save(out_dir, stem, image, mask, scan.affine)
        rows.append((stem, 1))
        manifest.append({
            "stem": stem, "ich": 1, "status": "inserted", "source_ml": round(lesion.volume_mm3 / 1000, 4),
            "written_ml": round(np.count_nonzero(mask) * scan.voxel_mm3 / 1000, 4), "blood_hu": round(blood_hu, 2),
            "shift_x": shift[0], "shift_y": shift[1], "rotation_deg": round(insertion.angle, 2),
            "flips": insertion.flips, "note": "",
        })
    count = (len(rows) + 1) // 2 if negatives is None else negatives
    if not rows and not count:
        raise UserError(f"no lesion of the {len(paths)} {split} mask(s) fits in the brain of {ct_path}; see the "
                        "warnings above")
    for index in range(count):
        stem = _negative_stem(split, index)
        rng = _rng(seed, stem)
        image, mask, shift = render(scan, variation, rng, None)
        _save(out_dir, stem, image, mask, scan.affine)
        rows.append((stem, 0))
        manifest.append({"stem": stem, "ich": 0, "status": "negative", "shift_x": shift[0], "shift_y": shift[1]})
    _write_csv(out_dir / f"{split}_lesions.csv", MANIFEST_COLUMNS, [[m.get(c, "") for c in MANIFEST_COLUMNS]
                                                                     for m in manifest])
    _write_csv(out_dir / f"{split}.csv", ("path", "ich", "patient_id"),
               [(f"volumes/{stem}.pkl", ich, stem) for stem, ich in rows])
    return [
        {"image": str(out_dir / "volumes" / f"{stem}.pkl"), "label": str(out_dir / "masks" / f"{stem}.nii.gz"),
         "ich": ich, "patient_id": stem, "case_id": stem, "origin": f"{out_dir / f'{split}.csv'} line {line}"}
        for line, (stem, ich) in enumerate(rows, start=2)
    ]


def _rng(seed: int, stem: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stem.encode())]))


def _negative_stem(split: str, index: int) -> str:
    return f"{split}_neg{index:03d}"


def _check_names(out_dir: Path, split: str, stems: list[str]) -> None:
    """Refuse to overwrite a split, duplicate stems, and stems already used by the other split (leakage)."""
    if (out_dir / f"{split}.csv").exists():
        raise UserError(f"{out_dir / f'{split}.csv'} exists; write into a new --out folder")
    twice = sorted(stem for stem, n in Counter(stems).items() if n > 1)
    if twice:
        raise UserError(f"mask names repeat ({', '.join(twice[:5])}); each mask needs its own file name")
    negative = [s for s in stems if s.startswith(tuple(f"{p}_neg" for p in SPLITS))]
    if negative:
        raise UserError(f"mask name {negative[0]} is reserved for negatives; rename the mask")
    other = out_dir / f"{SPLITS[1 - SPLITS.index(split)]}.csv"
    if other.exists():
        with open(other, newline="") as f:
            used = {row["patient_id"] for row in csv.DictReader(f)} & set(stems)
        if used:
            raise UserError(f"{', '.join(sorted(used)[:5])} already in {other}; a mask may be in one split only")


def _save(out_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> None:
    """``volumes/{stem}.pkl`` ({"image": int16 HU, "affine"}) and ``masks/{stem}.nii.gz`` (uint8), as the demo."""
    with open(out_dir / "volumes" / f"{stem}.pkl", "wb") as f:
        pickle.dump({"image": image, "affine": affine}, f, protocol=4)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), out_dir / "masks" / f"{stem}.nii.gz")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
