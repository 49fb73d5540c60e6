"""``python -m samft.synth``: the command line of the lesion insertion (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from samft.data.readers import NIFTI_SUFFIXES, volume_stem
from samft.errors import EXIT_USER_ERROR, UserError
from samft.synth.dataset import insert_lesions

log = logging.getLogger("samft.data")

def _mask_files(folder: Path, flag: str) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; point it at a folder of .nii/.nii.gz masks")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))
    if not files:
        raise UserError(f"{flag} {folder} holds no .nii or .nii.gz masks")
    return files


def _check_out(out: Path) -> None:
    """UserError when --out is a file or lies under one (mkdir would fail after the CT is read)."""
    for path in [out, *out.parents]:
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"lies under the file {path}"
                raise UserError(f"--out {out} {where}; pass a folder")
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m samft.synth",
        description="Insert hemorrhage masks into a head CT at blood density; writes train.csv/val.csv, "
        "volumes/*.pkl and masks/*.nii.gz for data=csv.",
    )
    parser.add_argument("--ct", required=True, type=Path, help="head CT in HU (.nii, .nii.gz, or .pkl with affine)")
    parser.add_argument("--masks", required=True, type=Path, help="folder of lesion masks for train.csv")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new or without train/val.csv)")
    parser.add_argument("--val-masks", type=Path, help="folder of lesion masks for val.csv")
    parser.add_argument("--negatives", type=int, help="lesion-free volumes per split (default: a third of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sulci-mm", type=float, default=0.0,
                        help="let lesions cover CSF gaps narrower than this (effaced sulci; default 0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("samft").setLevel(logging.INFO)
    try:
        _check_out(args.out)
        splits = [("train", _mask_files(args.masks, "--masks"))]
        if args.val_masks is not None:
            splits.append(("val", _mask_files(args.val_masks, "--val-masks")))
            both = {volume_stem(p) for p in splits[0][1]} & {volume_stem(p) for p in splits[1][1]}
            if both:
                raise UserError(f"{', '.join(sorted(both)[:5])} in both --masks and --val-masks; a mask may be in "
                                "one split only")
        for split, masks in splits:
            records = insert_lesions(ct_path=args.ct, mask_paths=masks, out_dir=args.out, split=split,
                                     seed=args.seed, negatives=args.negatives, sulci_mm=args.sulci_mm)
            positives = sum(r["ich"] for r in records)
            log.info("%s: %d volumes (%d with a lesion, %d negative, %d masks skipped) in %s", split,
                     len(records), positives, len(records) - positives, len(masks) - positives, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if (args.out / "val.csv").is_file():
        log.info("train with: python -m samft.train data=csv data.train_csv=%s data.val_csv=%s data.mask_dir=%s",
                 args.out / "train.csv", args.out / "val.csv", args.out / "masks")
