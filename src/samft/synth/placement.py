"""A mask's lesion moved onto the CT grid by physical size: occupancy, random orientation, placement search."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from samft.data.readers import load_nifti
from samft.synth.brain import bbox
from samft.synth.scan import Scan

MAX_ROTATION_DEG = 15.0
ORIENTATIONS = 4
"""Draws of flips, rotation and sub-voxel phase tried before a lesion is reported as not fitting (on the real
masks a fit, when there is one, came within three)."""
PSF_MM = 0.5
"""Gaussian sigma of the in-plane blur of a lesion's edge (a standard head kernel)."""


@dataclass(frozen=True)
class Lesion:
    """A mask's lesion: its bounding box ``crop`` (uint8, mask voxel order), the centroid in crop voxel
    coordinates, the mask's voxel-to-mm matrix (3 x 3) and the volume in mm^3."""

    crop: np.ndarray
    centre: np.ndarray
    linear: np.ndarray
    volume_mm3: float


def read_lesion(path: Path) -> Lesion | None:
    """The lesion of a mask file (every non-zero voxel); None for an empty mask."""
    array, affine = load_nifti(path)
    lesion = np.asarray(array) != 0
    if not lesion.any():
        return None
    lo, hi = bbox(lesion)
    crop = lesion[tuple(slice(a, b) for a, b in zip(lo, hi))]
    linear = affine[:3, :3]
    return Lesion(
        crop.astype(np.uint8), np.argwhere(crop).mean(axis=0), linear,
        float(crop.sum() * abs(np.linalg.det(linear))),
    )


def lesion_occupancy(lesion: Lesion, ct_linear: np.ndarray, turn: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Fraction of each CT voxel covered by the lesion moved by ``turn`` (3 x 3, in mm space about its
    centroid): float32 box ``x x y x z`` on the CT grid with the centroid at a sub-voxel ``phase``.

    The CT voxels the lesion can touch are found by pushing points of every lesion voxel (no further apart
    than the CT's finest spacing) onto the grid and growing them by a voxel; each of those averages
    nearest-neighbour samples of the mask on a sub-grid at least twice as fine as the mask's finest
    spacing (2-10 per axis). Work grows with the lesion's volume, not with the spread of its components.
    """
    to_ct = np.linalg.solve(ct_linear, turn @ lesion.linear)  # mask voxel steps -> CT voxel steps
    ct_spacing, mask_spacing = np.linalg.norm(ct_linear, axis=0), np.linalg.norm(lesion.linear, axis=0)
    within = np.ceil(mask_spacing / ct_spacing.min()).astype(int) + 1
    size = np.array(lesion.crop.shape)[:, None]
    reach = to_ct @ ((size - 1) / 2.0 + size * _sub_grid(np.full(3, 2), ends=True) - lesion.centre[:, None])
    margin = np.array([*np.ceil(3.0 * PSF_MM / ct_spacing[:2]).astype(int) + 2, 2])
    centre = margin + 0.5 - reach.min(axis=1) + phase
    shape = np.ceil(centre + reach.max(axis=1) + 0.5).astype(int) + margin
    touched = np.zeros(shape, dtype=bool)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    voxels = centre + (np.argwhere(lesion.crop) - lesion.centre) @ to_ct.T
    for corner in (to_ct @ _sub_grid(within, ends=True)).T:
        touched.flat[np.rint(voxels + corner).astype(np.int64) @ strides] = True
    candidates = np.argwhere(ndimage.binary_dilation(touched, structure=np.ones((3, 3, 3), dtype=bool)))
    # mask voxel (in the crop padded by one empty voxel) of each candidate's sub-samples
    to_mask = np.linalg.inv(to_ct)
    base = (lesion.centre + 1.0)[:, None] + to_mask @ (candidates - centre).T
    steps = np.clip(np.ceil(2.0 * ct_spacing / mask_spacing.min()), 2, 10).astype(int)
    offsets = to_mask @ _sub_grid(steps, ends=False)
    padded = np.pad(lesion.crop, 1)
    total = np.zeros(len(candidates), dtype=np.float32)
    for shift in offsets.T:
        total += ndimage.map_coordinates(padded, base + shift[:, None], order=0, prefilter=False)
    occupancy = np.zeros(shape, dtype=np.float32)
    occupancy[tuple(candidates.T)] = total / offsets.shape[1]
    return occupancy


def _sub_grid(steps: np.ndarray, *, ends: bool) -> np.ndarray:
    """Regular points in a voxel (offsets from its centre, 3 x prod(steps)): ``steps`` per axis, at cell
    centres, or spanning the faces when ``ends``."""
    axes = [np.linspace(-0.5, 0.5, n) if ends else (np.arange(n) + 0.5) / n - 0.5 for n in steps]
    return np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)


def top_voxels(occupancy: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the ``count`` voxels of highest occupancy (ties in array order): a binary lesion whose
    volume is the source volume however the partial volumes fall."""
    count = min(count, int(np.count_nonzero(occupancy)))
    chosen = np.zeros(occupancy.size, dtype=bool)
    chosen[np.argsort(-occupancy.ravel(), kind="stable")[:count]] = True
    return chosen.reshape(occupancy.shape)


def placements(scan: Scan, label: np.ndarray) -> np.ndarray:
    """Where ``label`` (a bool box, cropped to its voxels) fits in the brain: box origins (N x 3 voxels).

    The search runs on ``scan.pool`` blocks (a block of the lesion counts when any voxel is lesion, a block
    of the brain when all voxels are brain), so every origin found keeps every lesion voxel in the brain;
    counting the lesion blocks outside the brain at every origin is one FFT correlation.
    """
    pool = scan.pool
    padded = np.pad(label, [(0, -n % p) for n, p in zip(label.shape, pool)])
    blocks = padded.reshape(*(x for n, p in zip(padded.shape, pool) for x in (n // p, p))).any(axis=(1, 3, 5))
    if any(b > o for b, o in zip(blocks.shape, scan.outside.shape)):
        return np.empty((0, 3), dtype=int)
    hits = signal.fftconvolve(scan.outside, blocks[::-1, ::-1, ::-1].astype(np.float32), mode="valid")
    return scan.origin + pool * np.argwhere(hits < 0.5)


def _turn(rng: np.random.Generator) -> tuple[np.ndarray, float, str]:
    """Random flips of the mm axes and a rotation of at most ``MAX_ROTATION_DEG`` about a random axis:
    (3 x 3 matrix, angle in degrees, flipped axes as text)."""
    flips = rng.random(3) < 0.5
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = float(rng.uniform(0.0, MAX_ROTATION_DEG))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    theta = np.deg2rad(angle)
    rotation = np.eye(3) + np.sin(theta) * cross + (1.0 - np.cos(theta)) * cross @ cross
    return rotation @ np.diag(np.where(flips, -1.0, 1.0)), angle, "".join(np.array(list("xyz"))[flips])


@dataclass(frozen=True)
class Insertion:
    """A placed lesion: occupancy box, its origin in the CT, the written (binary) lesion, and what was drawn."""

    occupancy: np.ndarray
    origin: np.ndarray
    label: np.ndarray
    angle: float
    flips: str


def place_lesion(scan: Scan, lesion: Lesion, rng: np.random.Generator) -> Insertion | None:
    """Draw orientations until the lesion fits in the brain (None after ``ORIENTATIONS`` draws)."""
    count = max(1, round(lesion.volume_mm3 / scan.voxel_mm3))
    for _ in range(ORIENTATIONS):
        turn, angle, flips = _turn(rng)
        occupancy = lesion_occupancy(lesion, scan.affine[:3, :3], turn, rng.random(3))
        label = top_voxels(occupancy, count)
        lo, hi = bbox(label)
        origins = placements(scan, label[tuple(slice(a, b) for a, b in zip(lo, hi))])
        if len(origins):
            return Insertion(occupancy, origins[rng.integers(len(origins))] - lo, label, angle, flips)
    return None
