"""Safe volume readers: restricted unpickling of ``.pkl`` volumes, NIfTI through nibabel, DICOM CT series
(folders; see ``samft.data.dicom``), and MONAI readers for each.

A data file never runs code: ``.pkl`` files go through an unpickler that rebuilds numpy arrays and plain
containers only and refuses every other global (``os.system``, ``builtins.eval``, torch, ...) with a
``UserError`` naming the file and the refused global. Every reader returns the voxels as ``X x Y x Z`` and a
4 x 4 voxel-to-world affine in mm (RAS as nibabel defines it; oblique affines are kept as they are).
"""

from __future__ import annotations

import _codecs
import logging
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from monai.data import ImageReader, NibabelReader
from monai.utils import MetaKeys, SpaceKeys

from samft.errors import UserError

# With pydicom installed (for DICOM series), every MONAI LoadImage() tries to register nvImageCodec's GPU
# DICOM decoder and warns, once per pipeline, that it is absent. samft decodes DICOM through SimpleITK instead.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin", category=UserWarning)
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

PICKLE_SUFFIXES = (".pkl", ".pickle")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + PICKLE_SUFFIXES
"""Suffixes of the volume files samft reads, matched in any case (``.NII.GZ`` too)."""
DICOM_SUFFIX = ".dcm"
IMAGE_KEYS = ("image", "img", "volume", "data", "ct")
"""Keys under which a dict-shaped ``.pkl`` may hold its image, tried in this order."""


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy pickles use, as numpy 1 (``numpy.core``) and 2 (``numpy._core``) name them."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 rebuilds arrays from a buffer
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_pickle_globals(),
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _codecs.encode,  # protocol <= 2 stores bytes as latin-1 text
    **{(mod, t.__name__): t for mod in ("builtins", "__builtin__") for t in (set, frozenset, bytearray)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; any other global is refused before it is imported."""

    def __init__(self, file: Any, *, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UserError(
                f"{self._path}: refused to unpickle the global '{module}.{name}'; a .pkl volume may hold "
                "only numpy arrays and plain containers (re-save it as a numpy array or a dict of arrays)"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(f"{self._path}: refused a persistent reference in the pickle; re-save it with numpy")


class Volume(NamedTuple):
    """A read volume: voxels ``X x Y x Z``, the 4 x 4 affine, and whether the file carried geometry at all
    (a bare ``.pkl`` array does not: it gets the identity, 1 mm, affine)."""

    array: np.ndarray
    affine: np.ndarray
    has_geometry: bool


def volume_format(path: str | Path) -> str:
    """``"pickle"`` or ``"nifti"`` from the file name, ``"dicom"`` for a folder; anything else is a UserError."""
    name = str(path).lower()
    if name.endswith(PICKLE_SUFFIXES):
        return "pickle"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if Path(path).is_dir():
        return "dicom"
    if name.endswith(DICOM_SUFFIX):
        raise UserError(f"{path}: a DICOM file is one slice; pass the folder that holds the series")
    raise UserError(f"{path}: unsupported volume format; use .pkl, .nii, .nii.gz or a DICOM series folder")


def volume_stem(path: str | Path) -> str:
    """A volume's name without its format suffix: the one rule for case ids, mask names and output names.

    A suffix of ``VOLUME_SUFFIXES`` is dropped whatever its case and the rest keeps its own, so
    ``CT_001.nii.gz`` -> ``CT_001`` and ``ct_001.NII`` -> ``ct_001`` (two different cases, as on the disk). A
    folder (a DICOM series) keeps its whole name, since series UIDs hold dots; any other file loses its last
    suffix.
    """
    path = Path(path)
    lowered = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lowered.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name if path.is_dir() else path.stem


def read_volume(path: str | Path) -> Volume:
    """Read a ``.pkl``, ``.nii`` or ``.nii.gz`` volume (3-D; a singleton 4th axis is dropped) or a folder
    holding one DICOM CT series."""
    kind = volume_format(path)
    if kind == "pickle":
        return _read_pickle(Path(path))
    if kind == "dicom":
        from samft.data.dicom import read_series  # pydicom and SimpleITK load only when a series is read

        return Volume(*read_series(path), True)
    array, affine = load_nifti(path)
    return Volume(array, affine, True)


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read NIfTI with nibabel: ``(X x Y x Z array, scaling applied; 4 x 4 affine from the header)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as err:  # nibabel, gzip and numpy raise many types for damaged files
        raise UserError(f"{path}: cannot read it as NIfTI ({type(err).__name__}: {err})") from err
    return _as_3d(array, path), affine


def _read_pickle(path: Path) -> Volume:
    """Read a ``.pkl`` volume safely. Accepted forms: a numpy array; a dict with the array under one of
    ``IMAGE_KEYS`` and optionally ``"affine"`` (4 x 4) or ``"spacing"`` (3 positive mm values). Without either
    the affine is the identity and ``has_geometry`` is False."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with path.open("rb") as file:
            obj = _RestrictedUnpickler(file, path=path).load()
    except UserError:
        raise
    except Exception as err:  # a corrupt pickle can fail with almost any exception type
        raise UserError(f"{path}: cannot read it as a pickle ({type(err).__name__}: {err})") from err
    return _unpack(obj, path)


def _unpack(obj: Any, path: Path) -> Volume:
    if isinstance(obj, np.ndarray):
        return Volume(_as_3d(_numeric(obj, path), path), np.eye(4), False)
    if not isinstance(obj, dict):
        raise UserError(
            f"{path}: the pickle holds a {type(obj).__name__}; expected a numpy array or a dict with the "
            f"image under one of {', '.join(IMAGE_KEYS)}"
        )
    key = next((k for k in IMAGE_KEYS if k in obj), None)
    if key is None:
        raise UserError(
            f"{path}: the dict has keys {sorted(map(str, obj))}, none of {', '.join(IMAGE_KEYS)} (the image)"
        )
    array = _as_3d(_numeric(obj[key], path), path)
    if obj.get("affine") is not None:
        return Volume(array, _affine(obj["affine"], path), True)
    if obj.get("spacing") is not None:
        return Volume(array, np.diag([*_spacing(obj["spacing"], path), 1.0]), True)
    return Volume(array, np.eye(4), False)


def _numeric(value: Any, path: Path) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise UserError(f"{path}: the image is {kind}; expected a numeric numpy array")
    return value


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise UserError(f"{path}: the volume has shape {tuple(array.shape)}; expected a 3-D volume (X, Y, Z)")
    return array


def _spacing(value: Any, path: Path) -> list[float]:
    try:
        spacing = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        spacing = np.empty(0)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise UserError(f"{path}: 'spacing' is {value!r}; expected three positive mm values")
    return spacing.tolist()


def _affine(value: Any, path: Path) -> np.ndarray:
    try:
        affine = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        affine = np.empty(0)
    if (
        affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or not np.allclose(affine[3], [0, 0, 0, 1])
        or abs(np.linalg.det(affine[:3, :3])) < 1e-9
    ):
        raise UserError(f"{path}: 'affine' is not an invertible 4 x 4 matrix with last row 0 0 0 1")
    return affine


class _VolumeReader(ImageReader):
    """A MONAI reader over ``Volume`` values: subclasses say which paths they take and how one is read."""

    def _accepts(self, name: str) -> bool:
        raise NotImplementedError

    def _read_one(self, path: Path) -> Volume:
        raise NotImplementedError

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return bool(names) and all(self._accepts(str(n)) for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> Volume | list[Volume]:
        names = [data] if isinstance(data, (str, Path)) else list(data)
        if not self.verify_suffix(names):
            raise ValueError(f"{type(self).__name__} cannot read {names}")
        volumes = [self._read_one(Path(n)) for n in names]
        return volumes[0] if len(volumes) == 1 else volumes

    def get_data(self, img: Volume | list[Volume]) -> tuple[np.ndarray, dict]:
        """``(X x Y x Z array, meta)``; several volumes are stacked as ``C x X x Y x Z`` (same geometry)."""
        volumes = [img] if isinstance(img, Volume) else list(img)
        first = volumes[0]
        for other in volumes[1:]:
            if other.array.shape != first.array.shape or not np.allclose(other.affine, first.affine):
                raise ValueError("stacked volumes must share their shape and affine")
        meta = {**volume_meta(first), MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(volumes) == 1 else 0}
        array = first.array if len(volumes) == 1 else np.stack([v.array for v in volumes])
        return array, meta


def volume_meta(volume: Volume) -> dict[str, Any]:
    """The MONAI meta of a volume as the samft readers give it: its affine (also as the original affine), the
    X x Y x Z shape, RAS space and ``has_geometry``."""
    return {
        MetaKeys.AFFINE: volume.affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: volume.affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(volume.array.shape),
        MetaKeys.SPACE: SpaceKeys.RAS,
        "has_geometry": volume.has_geometry,
    }


class PickleVolumeReader(_VolumeReader):
    """MONAI reader for ``.pkl`` volumes (restricted unpickling, affine from the file or the identity).

    Use it so that a refused or broken ``.pkl`` surfaces as its own ``UserError``: per call
    (``LoadImage()(path, reader=image_reader_for(path))``) or registered::

        loader = LoadImaged(keys=["image", "label"], image_only=True)   # auto-selects readers by suffix
        loader.register(PickleVolumeReader())                          # .pkl here, .nii/.nii.gz -> nibabel

    (``LoadImaged(reader=PickleVolumeReader())`` reads both formats too, but MONAI then tries every reader in
    turn and folds a refusal into a generic RuntimeError.) The meta dict carries ``affine``,
    ``original_affine``, ``spatial_shape`` and ``has_geometry`` (False: the file had no spacing or affine).
    """

    def _accepts(self, name: str) -> bool:
        return name.lower().endswith(PICKLE_SUFFIXES)

    def _read_one(self, path: Path) -> Volume:
        return _read_pickle(path)


class DicomSeriesReader(_VolumeReader):
    """MONAI reader for DICOM CT series folders (``samft.data.dicom``): the same checks, HU voxels and RAS
    affine as ``read_volume``, with the meta keys of ``PickleVolumeReader``. Pass it per call
    (``image_reader_for``) so that a refused series surfaces as its own ``UserError``."""

    def _accepts(self, name: str) -> bool:
        return Path(name).is_dir()

    def _read_one(self, path: Path) -> Volume:
        from samft.data.dicom import read_series

        return Volume(*read_series(path), True)


def image_reader_for(path: str | Path) -> ImageReader:
    """The MONAI reader for one path: ``PickleVolumeReader`` for ``.pkl``, ``NibabelReader`` for NIfTI,
    ``DicomSeriesReader`` for a folder."""
    kind = volume_format(path)
    if kind == "pickle":
        return PickleVolumeReader()
    return DicomSeriesReader() if kind == "dicom" else NibabelReader()
