"""The head CT lesions go into: read once, its brain segmented, its noise fitted, its brain cut into blocks."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samft.data.readers import read_volume
from samft.data.stats import voxel_spacing
from samft.errors import UserError
from samft.synth.brain import PARENCHYMA_HU, brain_blocks, brain_mask
from samft.synth.noise import NoiseModel, estimate_noise


@dataclass(frozen=True)
class Scan:
    """The CT (float32 HU X x Y x Z), its affine, brain mask and noise, and the brain on a coarse grid of
    ``pool`` voxel blocks (``outside``: 1 where a block is not entirely brain) starting at ``origin``."""

    hu: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    noise: NoiseModel
    pool: np.ndarray
    origin: np.ndarray
    outside: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(voxel_spacing(self.affine))

    @property
    def voxel_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def load_scan(ct_path: str | Path, *, sulci_mm: float = 0.0) -> Scan:
    """Read a head CT (``.nii``, ``.nii.gz`` or ``.pkl`` with geometry), segment its brain (``brain_mask``),
    fit its noise. The last scan is kept in memory (train and val calls share it) until its file changes."""
    path = Path(ct_path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    stat = path.stat()
    return _load_scan(str(path.resolve()), stat.st_mtime_ns, stat.st_size, sulci_mm)


@functools.lru_cache(maxsize=1)
def _load_scan(ct_path: str, _mtime_ns: int, _size: int, sulci_mm: float) -> Scan:
    volume = read_volume(ct_path)
    if not volume.has_geometry:
        raise UserError(
            f"{ct_path}: the .pkl has no 'affine' or 'spacing'; lesions are placed by physical size, so save "
            "the scan as a dict with its affine"
        )
    hu = volume.array.astype(np.float32)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    brain = brain_mask(hu, spacing, sulci_mm=sulci_mm)
    brain_ml = brain.sum() * abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    if brain_ml < 100.0:
        raise UserError(
            f"{ct_path}: found {brain_ml:.0f} ml of brain parenchyma ({PARENCHYMA_HU[0]:.0f}-"
            f"{PARENCHYMA_HU[1]:.0f} HU inside the skull); give a non-contrast head CT in Hounsfield units"
        )
    pool = np.maximum(1, np.floor(1.0 / spacing)).astype(int)  # ~1 mm blocks for the placement search
    origin, outside = brain_blocks(brain, pool)
    scan = Scan(hu, volume.affine, brain, estimate_noise(hu, brain), pool, origin, outside)
    for array in (hu, brain, outside, scan.affine):  # shared by every call that gets it from the cache
        array.setflags(write=False)
    return scan
