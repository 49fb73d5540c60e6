"""Brain parenchyma of a head CT, and the box and block helpers the placement search uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

PARENCHYMA_HU = (15.0, 60.0)


def brain_mask(
    hu: np.ndarray, spacing: Sequence[float], *, margin_mm: float = 1.5, sulci_mm: float = 0.0
) -> np.ndarray:
    """Brain parenchyma of a head CT: bool ``X x Y x Z`` from HU ``X x Y x Z`` and voxel spacing in mm.

    Soft tissue of 15-60 HU (after a 0.6 mm smoothing), cut loose from scalp and muscle by a 2 mm opening,
    largest connected component, in-slice islands under 3 cm^2 dropped (spinal cord, skull-base fragments),
    eroded by ``margin_mm``. CSF and ventricles (< 15 HU), bone, air and fresh blood (> 60 HU) are outside;
    ``sulci_mm > 0`` takes in CSF gaps narrower than that (sulci a bleed would efface; not bone).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    smooth = ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma=0.6 / spacing)
    tissue = (smooth >= PARENCHYMA_HU[0]) & (smooth <= PARENCHYMA_HU[1])
    ball = _ellipsoid(2.0, spacing)
    labels, _ = ndimage.label(ndimage.binary_erosion(tissue, structure=ball))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    if sizes.max() == 0:
        return np.zeros(tissue.shape, dtype=bool)
    brain = ndimage.binary_dilation(labels == sizes.argmax(), structure=ball) & tissue
    slice_axis = int(np.argmax(spacing))
    pixel_mm2 = float(np.prod(np.delete(spacing, slice_axis)))
    for index in range(brain.shape[slice_axis]):
        plane = np.take(brain, index, axis=slice_axis)
        islands, _ = ndimage.label(plane)
        area = np.bincount(islands.ravel()) * pixel_mm2
        area[0] = 0.0
        np.moveaxis(brain, slice_axis, 0)[index] = (area >= 300.0)[islands]
    if sulci_mm > 0:
        brain = ndimage.binary_closing(brain, structure=_ellipsoid(sulci_mm / 2.0, spacing)) & (smooth < 100.0)
    if margin_mm <= 0:
        return brain
    return ndimage.binary_erosion(brain, structure=_ellipsoid(margin_mm, spacing), border_value=0)


def _ellipsoid(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """A ball of ``radius_mm`` on the voxel grid (at least the centre voxel along coarse axes)."""
    half = np.floor(radius_mm / spacing).astype(int)
    grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s / radius_mm) ** 2 for g, s in zip(grid, spacing)) <= 1.0


def brain_blocks(brain: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The brain's bounding box cut into ``pool`` blocks: (box origin, float32 1 where a block is not all brain)."""
    lo, hi = bbox(brain)
    box = brain[tuple(slice(a, b) for a, b in zip(lo, hi))]
    box = np.pad(box, [(0, -n % p) for n, p in zip(box.shape, pool)])
    blocks = box.reshape(*(x for n, p in zip(box.shape, pool) for x in (n // p, p))).all(axis=(1, 3, 5))
    return lo, (~blocks).astype(np.float32)


def bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower (inclusive) and upper (exclusive) index corners of the non-zero voxels (some must exist)."""
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
             for axis in range(mask.ndim)]
    return np.array([s[0] for s in spans]), np.array([s[-1] + 1 for s in spans])
