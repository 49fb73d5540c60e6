"""Scanner noise: a per-slice Gaussian-filtered white-noise model, sampled and fitted to a scan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from samft.errors import UserError

HIGHPASS_SIGMA = 1.5
"""Voxels; the in-plane residual ``hu - gaussian(hu)`` keeps the noise and drops most of the anatomy."""


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
