"""DICOM CT series: one folder of single-frame DICOM files is one scan.

The headers are read with pydicom and checked here (one series, CT, one orientation, one matrix and pixel
spacing, evenly spaced slices along the slice normal, no gantry tilt); the slices are ordered by their
position along the normal (never by file name), and the voxel-to-world affine is built from the headers in the
readers' convention (RAS as nibabel defines it, oblique orientations kept). The pixels are decoded by
SimpleITK through GDCM (every transfer syntax, compressed ones included), each slice with its own rescale
slope and intercept, so the voxels are Hounsfield units. Every problem a user can cause is one ``UserError``
line naming the folder and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from samft.errors import UserError

log = logging.getLogger(__name__)

SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.02
"""A slice gap may differ from the mean gap by the larger of these (1 %, 0.02 mm: scanners round positions, to
0.01 mm for example); more is a missing slice or mixed spacing, refused."""
TILT_TOL_DEG = 0.1
"""The slice step may deviate from the slice normal by this angle (rounding); more is gantry tilt, refused."""
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"})
"""Objects that may sit beside a series (for example a SEG written next to it) and are not slices."""
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """A checked series: ``datasets`` (headers, no pixels) and ``files`` in slice order, the RAS ``affine``
    (4 x 4, mm) and the volume ``shape`` ``(columns, rows, slices)`` = X x Y x Z of ``read_series``."""

    folder: Path
    files: tuple[Path, ...]
    datasets: tuple[Dataset, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a file in the DICOM file format (the ``DICM`` marker after the 128-byte preamble)."""
    try:
        with path.open("rb") as file:
            head = file.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (sub-folders are not searched), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))


def is_series_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder that directly holds at least one DICOM file."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and is_dicom_file(p) for p in path.iterdir())


def scan_series(folder: str | Path, *, series_uid: str | None = None) -> DicomSeries:
    """Read and check the headers of the one CT series in ``folder`` (or the series ``series_uid``).

    Raises UserError for: no DICOM files, an unreadable file, several series (named by SeriesInstanceUID),
    a modality other than CT, multi-frame files, missing geometry attributes, mixed orientations, matrix
    sizes or pixel spacings, two slices at one position, uneven slice spacing (a missing slice), gantry tilt.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: a DICOM series must be a folder of .dcm files")
    files = dicom_files(folder)
    if not files:
        raise UserError(f"{folder}: the folder holds no DICOM files (files with the DICM marker)")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        ds = _read_header(path)
        if str(ds.get("SOPClassUID", "")) == _MEDIA_DIRECTORY or ds.get("Modality") in NON_IMAGE_MODALITIES:
            log.debug("%s: not a slice (%s), ignored", path, ds.get("Modality", "DICOMDIR"))
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise UserError(f"{folder}: the folder holds no image slices (only {', '.join(p.name for p in files[:3])})")
    if series_uid is not None:
        if series_uid not in series:
            raise UserError(f"{folder}: no series {series_uid}; the folder holds {_describe(series)}")
        slices = series[series_uid]
    elif len(series) > 1:
        raise UserError(
            f"{folder}: the folder holds {len(series)} series ({_describe(series)}); put each series into its "
            "own folder"
        )
    else:
        slices = next(iter(series.values()))
    return _check_geometry(folder, slices)


def read_series(folder: str | Path, *, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The series as ``(X x Y x Z array in HU, 4 x 4 RAS affine)``, X = columns, Y = rows, Z = slices in
    position order. Integer rescales give int16 (int32 when out of range); others float32."""
    series = scan_series(folder, series_uid=series_uid)
    return read_pixels(series), series.affine


def read_pixels(series: DicomSeries) -> np.ndarray:
    """Decode the slices of a checked series (``X x Y x Z``, rescale slope and intercept applied per slice)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])  # our order: ITK reads the files as listed
    reader.SetOutputPixelType(sitk.sitkFloat32)  # exact for integer HU, and GDCM rescales each file itself
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own geometry warnings: ours are checked above
    try:
        image = reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"{series.folder}: cannot decode the DICOM pixel data ({first})") from err
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK gives slices x rows x columns
    if array.shape != series.shape:
        raise UserError(f"{series.folder}: decoded {array.shape} voxels, the headers say {series.shape}")
    return _narrow(array, series.datasets)


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types for damaged files
        raise UserError(f"{path}: cannot read it as DICOM ({type(err).__name__}: {err})") from err


def _describe(series: dict[str, list[tuple[Path, Dataset]]], shown: int = 5) -> str:
    """The series by SeriesInstanceUID with modality, description and file count (the first ``shown``)."""
    parts = []
    for uid, slices in list(series.items())[:shown]:
        ds = slices[0][1]
        description = f" '{ds.SeriesDescription}'" if ds.get("SeriesDescription") else ""
        parts.append(f"{uid or '<no SeriesInstanceUID>'} ({ds.get('Modality', '?')}{description}, {len(slices)} files)")
    if len(series) > shown:
        parts.append(f"... and {len(series) - shown} more")
    return "; ".join(parts)


def _check_geometry(folder: Path, slices: list[tuple[Path, Dataset]]) -> DicomSeries:
    first = slices[0][1]
    modality = first.get("Modality", "")
    if modality != "CT":
        raise UserError(
            f"{folder}: the series is {modality or 'of no modality'}, not CT; samft segments CT scans only"
        )
    for path, ds in slices:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise UserError(
                f"{path}: multi-frame (enhanced) DICOM is not supported; convert the series to single-frame "
                "files (for example with dcm2niix to NIfTI)"
            )
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                               "Columns") if ds.get(k) is None]
        if missing:
            raise UserError(f"{path}: the slice lacks {', '.join(missing)}; samft needs the slice geometry")
    if len(slices) < 2:
        raise UserError(f"{folder}: the series has one slice; a 3-D scan needs at least two")

    orientation = _floats(first.ImageOrientationPatient, 6, slices[0][0], "ImageOrientationPatient")
    pixel_spacing = _floats(first.PixelSpacing, 2, slices[0][0], "PixelSpacing")
    for path, ds in slices[1:]:
        if not np.allclose(_floats(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient"),
                           orientation, atol=1e-4):
            raise UserError(f"{folder}: the slices have different orientations (e.g. {path.name}); not one volume")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or not np.allclose(
            _floats(ds.PixelSpacing, 2, path, "PixelSpacing"), pixel_spacing, rtol=1e-4
        ):
            raise UserError(f"{folder}: the slices differ in matrix size or pixel spacing (e.g. {path.name})")
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (column index), along a column (row index)
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise UserError(f"{folder}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")

    positions = np.array([_floats(ds.ImagePositionPatient, 3, p, "ImagePositionPatient") for p, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    along = positions @ normal
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        i = int(np.argmax(gaps < 1e-3))
        raise UserError(
            f"{folder}: {slices[i][0].name} and {slices[i + 1][0].name} lie at the same position; the folder "
            "mixes acquisitions or holds duplicate files (keep one)"
        )
    mean_gap = (along[-1] - along[0]) / (len(slices) - 1)
    uneven = np.abs(gaps - mean_gap) > max(SPACING_RTOL * mean_gap, SPACING_ATOL_MM)
    if uneven.any():
        shown = ", ".join(
            f"{gaps[i]:.2f} mm after {slices[i][0].name}" for i in np.flatnonzero(uneven)[:3]
        )
        raise UserError(
            f"{folder}: uneven slice spacing (median {np.median(gaps):.2f} mm; {shown}): a slice is missing or "
            "the series mixes spacings; add the missing file, or resample the series (e.g. dcm2niix) and pass "
            "the NIfTI"
        )
    step = (positions[-1] - positions[0]) / (len(slices) - 1)  # mm per slice, in LPS
    tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), -1.0, 1.0))))
    if tilt > TILT_TOL_DEG:
        raise UserError(
            f"{folder}: the slices are sheared by {tilt:.1f} degrees (gantry tilt "
            f"{first.get('GantryDetectorTilt', 'not recorded')}); correct it (e.g. dcm2niix, which resamples "
            "tilted series) and pass the NIfTI"
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]  # PixelSpacing is (between rows, between columns)
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return DicomSeries(
        folder=folder,
        files=tuple(p for p, _ in slices),
        datasets=tuple(ds for _, ds in slices),
        affine=_LPS_TO_RAS @ lps,
        shape=(int(first.Columns), int(first.Rows), len(slices)),
    )


def _floats(value: Sequence[float], n: int, path: Path, name: str) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise UserError(f"{path}: {name} is {value!r}; expected {n} numbers")
    return array


def _narrow(array: np.ndarray, datasets: Sequence[Dataset]) -> np.ndarray:
    """float32 HU -> int16 (or int32) when every slice's slope and intercept are whole numbers."""
    whole = all(
        float(ds.get("RescaleSlope", 1) or 1).is_integer() and float(ds.get("RescaleIntercept", 0) or 0).is_integer()
        for ds in datasets
    )
    if not whole:
        return array.astype(np.float32, copy=False)
    low, high = float(array.min()), float(array.max())
    dtype = np.int16 if low >= -(2**15) and high < 2**15 else np.int32
    return np.rint(array).astype(dtype)
