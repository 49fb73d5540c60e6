"""Insert real hemorrhage shapes into a head CT: a semi-synthetic ICH data set in the users' format.

``python -m samft.data.insert_lesions --ct scan.nii.gz --masks masks/ --out data/ [--val-masks val/]``

Each mask's lesion (its non-zero voxels, all components together) is moved into the scan by physical
size: sampled through both affines onto the CT grid (a partial-volume occupancy per CT voxel), randomly
flipped, rotated (at most 15 degrees) and placed so that every lesion voxel lies inside the scan's brain
parenchyma (``brain_mask``). The written mask is the ``K`` voxels of highest occupancy, ``K`` = the source
volume over the CT voxel volume, so it keeps the lesion's volume in ml to within half a CT voxel. The
lesion is painted at blood density (one HU per lesion, uniform in 50-90) with the occupancy, blurred by the
scanner's point spread, as mixing weight, and noise shaped like the scan's (``estimate_noise``) tops the
noise up where the scan's own noise was mixed away. Every output volume, negatives included, is the scan
with a small in-plane shift and extra scanner-like noise, so that shift and noise do not tell the classes
apart.

Output (as ``samft.data.demo`` writes it): ``{split}.csv`` (``path,ich,patient_id``; one patient per
volume, its stem), ``volumes/{stem}.pkl`` (``{"image": int16 HU, "affine": 4 x 4}``), ``masks/{stem}.nii.gz``
(uint8 {0,1}, the CT's affine; empty for negatives) and ``{split}_lesions.csv`` (per mask: placement,
volumes, blood HU, or why it was skipped). A volume's random draws come from ``SeedSequence([seed,
crc32(stem)])`` (the shared noise fields from the seed alone), so it does not depend on the other masks given.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import pickle
import sys
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft
from scipy import ndimage, signal

from samft.data.readers import NIFTI_SUFFIXES, load_nifti, read_volume
from samft.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("samft.data")

PARENCHYMA_HU = (15.0, 60.0)
BLOOD_HU = (50.0, 90.0)
MAX_ROTATION_DEG = 15.0
ORIENTATIONS = 4
"""Draws of flips, rotation and sub-voxel phase tried before a lesion is reported as not fitting (on the real
masks a fit, when there is one, came within three)."""
MAX_SHIFT_MM = 4.0
EXTRA_NOISE = 0.5
"""Std of the noise added to every output volume, relative to the scan's own noise."""
PSF_MM = 0.5
"""Gaussian sigma of the in-plane blur of a lesion's edge (a standard head kernel)."""
HIGHPASS_SIGMA = 1.5
"""Voxels; the in-plane residual ``hu - gaussian(hu)`` keeps the noise and drops most of the anatomy."""
SPLITS = ("train", "val")
MANIFEST_COLUMNS = (
    "stem", "ich", "status", "source_ml", "written_ml", "blood_hu", "shift_x", "shift_y", "rotation_deg", "flips",
    "note",
)


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


@dataclass(frozen=True)
class NoiseModel:
    """Scanner noise as Gaussian-filtered white noise within each slice: ``sigma`` HU, filter sigmas ``corr``
    (voxels, axes 0 and 1); slices independent."""

    sigma: float
    corr: tuple[float, float]

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Noise of std ``sigma`` (float32, ``shape`` = X x Y x Z), periodic within each slice."""
        white = rng.standard_normal(shape, dtype=np.float32)
        response = _gaussian_response(shape[0], self.corr[0])[:, None] * _gaussian_response(shape[1], self.corr[1])
        spectrum = scipy.fft.rfft2(white, axes=(0, 1)) * response[:, : shape[1] // 2 + 1, None]
        noise = scipy.fft.irfft2(spectrum, s=shape[:2], axes=(0, 1))
        return (noise * (self.sigma / np.sqrt(np.mean(response**2)))).astype(np.float32)


def _gaussian_response(n: int, sigma: float) -> np.ndarray:
    """Frequency response (length ``n``, FFT order) of a Gaussian filter of ``sigma`` voxels."""
    f = np.fft.fftfreq(n)
    return np.exp(-2.0 * np.pi**2 * sigma**2 * f**2)


def estimate_noise(hu: np.ndarray, brain: np.ndarray) -> NoiseModel:
    """Fit a ``NoiseModel`` to the parenchyma of a scan (``hu``, ``brain``: X x Y x Z).

    The in-plane high-pass residual is measured well inside the brain (its std and its lag-1 correlation
    along axes 0 and 1, outliers beyond 4 robust stds dropped: vessels, sulci); the filter sigmas are those
    whose model residual has the same correlations, and ``sigma`` is the residual std over the model's
    residual-to-noise gain.
    """
    shape = hu.shape[:2]
    highpass = 1.0 - (_gaussian_response(shape[0], HIGHPASS_SIGMA)[:, None]
                      * _gaussian_response(shape[1], HIGHPASS_SIGMA))
    spectrum = scipy.fft.rfft2(np.asarray(hu, dtype=np.float32), axes=(0, 1))
    residual = scipy.fft.irfft2(spectrum * highpass[:, : shape[1] // 2 + 1, None], s=shape, axes=(0, 1))
    inner = ndimage.binary_erosion(brain, structure=np.ones((9, 9, 1), dtype=bool))
    values = residual[inner]
    if values.size < 1000:
        raise UserError(f"only {values.size} voxels of brain parenchyma to measure the noise; is it a head CT?")
    robust = 1.4826 * np.median(np.abs(values - np.median(values)))
    inner &= np.abs(residual) < 4.0 * robust
    lags = []
    for axis in (0, 1):
        pair = inner & np.roll(inner, -1, axis=axis)
        lags.append(float(np.corrcoef(residual[pair], np.roll(residual, -1, axis=axis)[pair])[0, 1]))
    std = float(residual[inner].std())
    # model residual spectra on a 64 x 64 grid for filter sigmas 0..3 voxels along each axis
    f = np.fft.fftfreq(64)
    sigmas = np.linspace(0.0, 3.0, 61)
    power = np.exp(-4.0 * np.pi**2 * sigmas[:, None] ** 2 * f[None, :] ** 2)  # sigma x frequency
    hp = (1.0 - np.exp(-2.0 * np.pi**2 * HIGHPASS_SIGMA**2 * (f[:, None] ** 2 + f[None, :] ** 2))) ** 2
    total = np.einsum("af,fg,bg->ab", power, hp, power)
    cos = np.cos(2.0 * np.pi * f)
    lag0 = np.einsum("af,fg,bg->ab", power * cos, hp, power) / total
    lag1 = np.einsum("af,fg,bg->ab", power, hp, power * cos) / total
    a, b = np.unravel_index(np.argmin((lag0 - lags[0]) ** 2 + (lag1 - lags[1]) ** 2), total.shape)
    gain = total[a, b] / (power[a].sum() * power[b].sum())
    return NoiseModel(sigma=std / float(np.sqrt(gain)), corr=(float(sigmas[a]), float(sigmas[b])))


@dataclass(frozen=True)
class _Scan:
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
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def load_scan(ct_path: str | Path, *, sulci_mm: float = 0.0) -> _Scan:
    """Read a head CT (``.nii``, ``.nii.gz`` or ``.pkl`` with geometry), segment its brain (``brain_mask``),
    fit its noise. The last scan is kept in memory (train and val calls share it) until its file changes."""
    path = Path(ct_path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    stat = path.stat()
    return _load_scan(str(path.resolve()), stat.st_mtime_ns, stat.st_size, sulci_mm)


@functools.lru_cache(maxsize=1)
def _load_scan(ct_path: str, _mtime_ns: int, _size: int, sulci_mm: float) -> _Scan:
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
    origin, outside = _brain_blocks(brain, pool)
    scan = _Scan(hu, volume.affine, brain, estimate_noise(hu, brain), pool, origin, outside)
    for array in (hu, brain, outside, scan.affine):  # shared by every call that gets it from the cache
        array.setflags(write=False)
    return scan


def _brain_blocks(brain: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The brain's bounding box cut into ``pool`` blocks: (box origin, float32 1 where a block is not all brain)."""
    lo, hi = _bbox(brain)
    box = brain[tuple(slice(a, b) for a, b in zip(lo, hi))]
    box = np.pad(box, [(0, -n % p) for n, p in zip(box.shape, pool)])
    blocks = box.reshape(*(x for n, p in zip(box.shape, pool) for x in (n // p, p))).all(axis=(1, 3, 5))
    return lo, (~blocks).astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower (inclusive) and upper (exclusive) index corners of the non-zero voxels (some must exist)."""
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
             for axis in range(mask.ndim)]
    return np.array([s[0] for s in spans]), np.array([s[-1] + 1 for s in spans])


@dataclass(frozen=True)
class _Lesion:
    """A mask's lesion: its bounding box ``crop`` (uint8, mask voxel order), the centroid in crop voxel
    coordinates, the mask's voxel-to-mm matrix (3 x 3) and the volume in mm^3."""

    crop: np.ndarray
    centre: np.ndarray
    linear: np.ndarray
    volume_mm3: float


def _read_lesion(path: Path) -> _Lesion | None:
    """The lesion of a mask file (every non-zero voxel); None for an empty mask."""
    array, affine = load_nifti(path)
    lesion = np.asarray(array) != 0
    if not lesion.any():
        return None
    lo, hi = _bbox(lesion)
    crop = lesion[tuple(slice(a, b) for a, b in zip(lo, hi))]
    linear = affine[:3, :3]
    return _Lesion(
        crop.astype(np.uint8), np.argwhere(crop).mean(axis=0), linear,
        float(crop.sum() * abs(np.linalg.det(linear))),
    )


def _occupancy(lesion: _Lesion, ct_linear: np.ndarray, turn: np.ndarray, phase: np.ndarray) -> np.ndarray:
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


def _top_voxels(occupancy: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the ``count`` voxels of highest occupancy (ties in array order): a binary lesion whose
    volume is the source volume however the partial volumes fall."""
    count = min(count, int(np.count_nonzero(occupancy)))
    chosen = np.zeros(occupancy.size, dtype=bool)
    chosen[np.argsort(-occupancy.ravel(), kind="stable")[:count]] = True
    return chosen.reshape(occupancy.shape)


def _placements(scan: _Scan, label: np.ndarray) -> np.ndarray:
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
class _Insertion:
    """A placed lesion: occupancy box, its origin in the CT, the written (binary) lesion, and what was drawn."""

    occupancy: np.ndarray
    origin: np.ndarray
    label: np.ndarray
    angle: float
    flips: str


def _insert(scan: _Scan, lesion: _Lesion, rng: np.random.Generator) -> _Insertion | None:
    """Draw orientations until the lesion fits in the brain (None after ``ORIENTATIONS`` draws)."""
    count = max(1, round(lesion.volume_mm3 / scan.voxel_mm3))
    for _ in range(ORIENTATIONS):
        turn, angle, flips = _turn(rng)
        occupancy = _occupancy(lesion, scan.affine[:3, :3], turn, rng.random(3))
        label = _top_voxels(occupancy, count)
        lo, hi = _bbox(label)
        origins = _placements(scan, label[tuple(slice(a, b) for a, b in zip(lo, hi))])
        if len(origins):
            return _Insertion(occupancy, origins[rng.integers(len(origins))] - lo, label, angle, flips)
    return None


def _paint(scan: _Scan, image: np.ndarray, mask: np.ndarray, insertion: _Insertion, blood_hu: float,
           noise_sigma: float, rng: np.random.Generator) -> None:
    """Blend the lesion into ``image`` (float32 X x Y x Z, in place) and set its voxels in ``mask``.

    Mixing weight ``w``: the occupancy blurred by the in-plane point spread; ``image <- (1 - w) image +
    w blood + sqrt(1 - (1 - w)^2) noise`` (noise of ``noise_sigma``, the image's), which keeps the noise
    variance of the image where the lesion replaces tissue.
    """
    sigma = [*(PSF_MM / scan.spacing[:2]), 0.0]
    weight = ndimage.gaussian_filter(insertion.occupancy, sigma=sigma, mode="constant")
    noise = NoiseModel(noise_sigma, scan.noise.corr).sample(rng, weight.shape)
    lo = np.maximum(insertion.origin, 0)
    hi = np.minimum(insertion.origin + np.array(weight.shape), image.shape)
    inside = tuple(slice(a, b) for a, b in zip(lo, hi))
    box = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, insertion.origin))
    w, n = weight[box], noise[box]
    image[inside] = (1.0 - w) * image[inside] + w * blood_hu + np.sqrt(1.0 - (1.0 - w) ** 2) * n
    mask[inside] |= insertion.label[box]


class _Variation:
    """What sets output volumes apart besides the lesion: extra scanner-like noise (``EXTRA_NOISE`` times the
    scan's) over the head and an in-plane shift of at most ``MAX_SHIFT_MM`` that keeps the brain in view.

    The noise comes from two unit fields a bit larger than the head's box, drawn once: each volume gets the
    sum of two random windows of them with a random sign (the same spectrum, a new pattern; far cheaper than
    a new draw per volume).
    """

    PAD = 64

    def __init__(self, scan: _Scan, seed: int) -> None:
        reach = np.floor(MAX_SHIFT_MM / scan.spacing[:2]).astype(int)
        brain_lo, brain_hi = _bbox(scan.brain)
        self.shift_lo = -np.minimum(reach, brain_lo[:2])
        self.shift_hi = np.minimum(reach, np.array(scan.hu.shape[:2]) - brain_hi[:2])
        self.air = float(scan.hu.min())
        lo, hi = _bbox(scan.hu > self.air)
        self.head = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.tissue = (scan.hu[self.head] > self.air).astype(np.float32)
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"noise bank")]))
        unit = NoiseModel(sigma=1.0, corr=scan.noise.corr)
        shape = (*(n + self.PAD for n in self.tissue.shape[:2]), self.tissue.shape[2])
        self.fields = [unit.sample(rng, shape) for _ in range(2)]
        self.sigma = EXTRA_NOISE * scan.noise.sigma

    def add(self, image: np.ndarray, rng: np.random.Generator) -> None:
        """Add a new draw to ``image`` (X x Y x Z float32, in place) over the head."""
        nx, ny = self.tissue.shape[:2]
        (ax, ay), (bx, by) = rng.integers(0, self.PAD + 1, size=(2, 2))
        noise = self.fields[1][bx:bx + nx, by:by + ny] * np.float32(rng.choice([-1.0, 1.0]))
        noise += self.fields[0][ax:ax + nx, ay:ay + ny]
        noise *= self.tissue
        noise *= np.float32(self.sigma / np.sqrt(2.0))
        image[self.head] += noise

    def shift(self, rng: np.random.Generator) -> tuple[int, int]:
        """A random in-plane shift in voxels (axes 0 and 1)."""
        return int(rng.integers(self.shift_lo[0], self.shift_hi[0] + 1)), int(
            rng.integers(self.shift_lo[1], self.shift_hi[1] + 1))


def _render(scan: _Scan, variation: _Variation, rng: np.random.Generator,
            lesion: tuple[_Insertion, float] | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One output volume: the scan with extra noise, the lesion (insertion, blood HU) if any, shifted:
    (int16 HU X x Y x Z, bool mask X x Y x Z, shift in voxels along axes 0 and 1)."""
    image = scan.hu.copy()
    variation.add(image, rng)
    mask = np.zeros(image.shape, dtype=bool)
    if lesion is not None:
        _paint(scan, image, mask, *lesion, float(np.hypot(scan.noise.sigma, variation.sigma)), rng)
    shift = variation.shift(rng)
    np.rint(image, out=image)
    np.clip(image, np.iinfo(np.int16).min, np.iinfo(np.int16).max, out=image)
    return (_shift(image.astype(np.int16), (*shift, 0), variation.air), _shift(mask, (*shift, 0), False),
            shift)


def _shift(array: np.ndarray, shift: Sequence[int], fill: float) -> np.ndarray:
    """``array`` moved by whole voxels; what moves in is ``fill``."""
    out = np.full_like(array, fill)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, array.shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, array.shape))
    out[dst] = array[src]
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


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
    stems = [_stem(p) for p in paths]
    _check_names(out_dir, split, stems)
    scan = load_scan(ct_path, sulci_mm=sulci_mm)
    variation = _Variation(scan, seed)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows, manifest = [], []
    for index, (path, stem) in enumerate(zip(paths, stems)):
        if index and index % 25 == 0:
            log.info("%s: %d of %d masks done", split, index, len(paths))
        rng = _rng(seed, stem)
        lesion = _read_lesion(path)
        insertion = None if lesion is None else _insert(scan, lesion, rng)
        if insertion is None:
            note = "the mask is empty" if lesion is None else (
                f"its {lesion.volume_mm3 / 1000:.1f} ml lesion does not fit inside the brain parenchyma in "
                f"{ORIENTATIONS} orientations")
            log.warning("skipped %s: %s", path, note)
            manifest.append({"stem": stem, "ich": 1, "status": "skipped", "note": note,
                             "source_ml": "" if lesion is None else round(lesion.volume_mm3 / 1000, 4)})
            continue
        blood_hu = float(rng.uniform(*BLOOD_HU))
        image, mask, shift = _render(scan, variation, rng, (insertion, blood_hu))
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
        image, mask, shift = _render(scan, variation, rng, None)
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
        prog="python -m samft.data.insert_lesions",
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
            both = {_stem(p) for p in splits[0][1]} & {_stem(p) for p in splits[1][1]}
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


if __name__ == "__main__":
    main()
