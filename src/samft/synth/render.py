"""One output volume: the scan with extra scanner-like noise, the lesion painted at blood density, shifted."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from samft.synth.brain import bbox
from samft.synth.noise import NoiseModel
from samft.synth.placement import PSF_MM, Insertion
from samft.synth.scan import Scan

MAX_SHIFT_MM = 4.0
EXTRA_NOISE = 0.5
"""Std of the noise added to every output volume, relative to the scan's own noise."""


def _paint(scan: Scan, image: np.ndarray, mask: np.ndarray, insertion: Insertion, blood_hu: float,
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


class Variation:
    """What sets output volumes apart besides the lesion: extra scanner-like noise (``EXTRA_NOISE`` times the
    scan's) over the head and an in-plane shift of at most ``MAX_SHIFT_MM`` that keeps the brain in view.

    The noise comes from two unit fields a bit larger than the head's box, drawn once: each volume gets the
    sum of two random windows of them with a random sign (the same spectrum, a new pattern; far cheaper than
    a new draw per volume).
    """

    PAD = 64

    def __init__(self, scan: Scan, seed: int) -> None:
        reach = np.floor(MAX_SHIFT_MM / scan.spacing[:2]).astype(int)
        brain_lo, brain_hi = bbox(scan.brain)
        self.shift_lo = -np.minimum(reach, brain_lo[:2])
        self.shift_hi = np.minimum(reach, np.array(scan.hu.shape[:2]) - brain_hi[:2])
        self.air = float(scan.hu.min())
        lo, hi = bbox(scan.hu > self.air)
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


def render(scan: Scan, variation: Variation, rng: np.random.Generator,
            lesion: tuple[Insertion, float] | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
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
    return (shift_volume(image.astype(np.int16), (*shift, 0), variation.air), shift_volume(mask, (*shift, 0), False),
            shift)


def shift_volume(array: np.ndarray, shift: Sequence[int], fill: float) -> np.ndarray:
    """``array`` moved by whole voxels; what moves in is ``fill``."""
    out = np.full_like(array, fill)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, array.shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, array.shape))
    out[dst] = array[src]
    return out
