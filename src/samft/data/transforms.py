"""One MONAI dictionary-transform pipeline shared by training, validation and prediction.

Every stage starts with the same deterministic prefix: read the case (``.pkl`` through the safe reader,
NIfTI through nibabel; no label file -> an all-zero mask on the image grid), orient to RAS, resample to
``spacing`` (bilinear image, nearest label), map intensities (brain window or nnU-Net CT normalisation).
Then:

- ``predict`` and ``val``: nothing more; the whole volume (with its label for ``val``) goes to sliding-window
  inference and ``monai.transforms.Invertd`` maps predictions back to the original grid (orientation and
  spacing are invertible). Validation thus scores whole scans exactly as ``samft.predict`` meets them;
  ``crop_around_label`` gives the cheap lesion-centred crop that validation also scores.
- ``train``: pad to at least ``roi_size`` with air, then nnU-Net's patch sampling: with probability
  ``fg_oversample`` the crop is centred on a random lesion voxel (any lesion voxel, so small lesions are kept),
  otherwise it is drawn uniformly over the whole padded volume (air, skull and table included, as whole-scan
  inference meets them); then augmentation: flips on 3 axes and intensity scale and shift, each with
  probability ``aug_prob``, and a small affine with probability ``affine_prob``. Random parameters are drawn
  once per sample and applied to image and label alike (label resampled with nearest neighbour).

The result is one flat ``Compose``: MONAI's cached datasets cache everything before the first random
transform, i.e. the deterministic prefix. There (``train`` and ``val``) the 0/1 label is kept as uint8
(``CompactLabeld``: a quarter of float32's bytes, so a cached head CT costs 5/8 of what it did). The training
crop keeps it so, to the batch (a quarter of the bytes to flip and hand from the loader worker; the training step
casts it on the device; the affine augmentation resamples it to float32); ``crop_around_label`` hands the
validation crop on as float32.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
)
from monai.utils import MetaKeys

from samft.choices import INTENSITIES
from samft.data.preflight import GEOMETRY_ATOL_MM
from samft.data.readers import image_reader_for
from samft.errors import UserError

Stage = Literal["train", "val", "predict"]
STAGES = ("train", "val", "predict")
AUG_ROTATION_DEG = 10.0
AUG_SCALE = 0.1
AUG_INTENSITY_SCALE = 0.1
AUG_SHIFT_HU = 8.0
FG_INDICES = "fg_indices"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's convention, which the readers' affines follow
_KEPT_META = (MetaKeys.AFFINE, MetaKeys.ORIGINAL_AFFINE, MetaKeys.SPATIAL_SHAPE, MetaKeys.SPACE)


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing settings (``data.*``) in one value; ``transforms(stage)`` builds that stage's pipeline."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    roi_size: int | tuple[int, int, int] = 128
    intensity: str = "window"
    window_center: float = 40.0
    window_width: float = 80.0
    norm_stats: Mapping[str, float] | None = None
    fg_oversample: float = 0.33
    aug_prob: float = 0.3
    affine_prob: float = 0.0

    @classmethod
    def from_config(cls, data: Mapping[str, Any], norm_stats: Mapping[str, float] | None) -> Preprocessing:
        """From the `data` config section (a run's resolved config, or the DictConfig) and, for
        `intensity=nnunet`, the training set's foreground statistics. The sampling and augmentation keys default
        when absent (configs saved before they existed), since prediction does not use them."""
        defaults = cls()
        return cls(
            spacing=tuple(data["spacing"]), roi_size=triple(data["roi_size"]), intensity=data["intensity"],
            window_center=data["window_center"], window_width=data["window_width"],
            norm_stats=norm_stats if data["intensity"] == "nnunet" else None,
            fg_oversample=data.get("fg_oversample", defaults.fg_oversample),
            aug_prob=data.get("aug_prob", defaults.aug_prob), affine_prob=data.get("affine_prob", defaults.affine_prob),
        )

    def transforms(self, stage: Stage) -> Compose:
        return build_transforms(stage=stage, **asdict(self))

    @property
    def roi(self) -> tuple[int, int, int]:
        """The patch (and sliding-window) size in voxels of the resampled grid."""
        return triple(self.roi_size)

    @property
    def air(self) -> float:
        """The normalised value of air: padding of crops and sliding windows."""
        return intensity_range(intensity=self.intensity, window_center=self.window_center,
                               window_width=self.window_width, norm_stats=self.norm_stats)[2]


def intensity_range(
    *,
    intensity: str = "window",
    window_center: float = 40.0,
    window_width: float = 80.0,
    norm_stats: Mapping[str, float] | None = None,
) -> tuple[float, float, float, float]:
    """``(a_min, a_max, b_min, b_max)``: HU in ``[a_min, a_max]`` maps linearly to ``[b_min, b_max]``, clipped.

    ``window``: ``[L - W/2, L + W/2] -> [0, 1]``. ``nnunet``: clip to the foreground 0.5/99.5 percentiles,
    then z-score with the foreground mean and std; ``norm_stats`` is stats.json's ``foreground_intensity``.
    ``b_min`` is the value of air after normalisation (used for padding).
    """
    if intensity == "window":
        return window_center - window_width / 2, window_center + window_width / 2, 0.0, 1.0
    if intensity != "nnunet":
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    if not norm_stats:
        raise UserError(
            "data.intensity=nnunet needs foreground (mask) intensity statistics, but the training set has no "
            "lesion voxels; use data.intensity=window"
        )
    low, high = float(norm_stats["percentile_00_5"]), float(norm_stats["percentile_99_5"])
    mean, std = float(norm_stats["mean"]), max(float(norm_stats["std"]), 1e-6)
    return low, high, (low - mean) / std, (high - mean) / std


def build_transforms(
    *,
    stage: Stage,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    roi_size: int | Sequence[int] = 128,
    intensity: str = "window",
    window_center: float = 40.0,
    window_width: float = 80.0,
    norm_stats: Mapping[str, float] | None = None,
    fg_oversample: float = 0.33,
    aug_prob: float = 0.3,
    affine_prob: float = 0.0,
    keys: tuple[str, str] = ("image", "label"),
) -> Compose:
    """The pipeline for one stage, applied to record dicts (``image``, ``label`` file paths, ``ich``, ...).

    Output per sample: ``image`` float32 MetaTensor 1 x R0 x R1 x R2 (R = ``roi_size``; for ``predict`` and
    ``val`` the whole resampled volume), ``label`` of the image's shape in {0, 1} (when the record has one):
    uint8 for ``train`` (float32 with ``affine_prob`` > 0) and ``val`` (a cached whole scan; ``crop_around_label``
    returns it as float32), ``ich`` float32 scalar tensor (when present); other record entries pass through.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    image, label = keys
    both = [image, label]
    roi = triple(roi_size)
    a_min, a_max, b_min, b_max = intensity_range(
        intensity=intensity, window_center=window_center, window_width=window_width, norm_stats=norm_stats
    )
    transforms: list[Any] = [
        LoadCased(image_key=image, label_key=label),
        Orientationd(keys=both, axcodes="RAS", labels=_RAS_LABELS, allow_missing_keys=True),
        # float32, not MONAI's default float64: 1.8x faster on a CPU, the image equal to float32 rounding
        Spacingd(keys=both, pixdim=tuple(spacing), mode=("bilinear", "nearest"), dtype=np.float32,
                 allow_missing_keys=True),
        ScaleIntensityRanged(keys=image, a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True),
        EnsureTyped(keys="ich", data_type="tensor", dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ]
    if stage == "predict":
        return Compose(transforms)
    transforms.append(CompactLabeld(keys=label))
    if stage == "val":
        return Compose(transforms)
    shift = AUG_SHIFT_HU * (b_max - b_min) / (a_max - a_min)
    return Compose([
        *transforms,
        SpatialPadd(keys=image, spatial_size=roi, value=b_min),
        SpatialPadd(keys=label, spatial_size=roi, value=0.0),
        LesionIndicesd(label_key=label),
        ForegroundOversampledCropd(keys=both, roi_size=roi, fg_oversample=fg_oversample),
        *(RandFlipd(keys=both, prob=aug_prob, spatial_axis=axis) for axis in range(3)),
        *([RandAffine32d(
            keys=both, prob=affine_prob, rotate_range=(np.deg2rad(AUG_ROTATION_DEG),) * 3,
            scale_range=(AUG_SCALE,) * 3, mode=("bilinear", "nearest"), padding_mode=("border", "zeros"),
            spatial_size=roi, cache_grid=True,
        )] if affine_prob > 0 else []),
        RandScaleIntensityd(keys=image, factors=AUG_INTENSITY_SCALE, prob=aug_prob),
        RandShiftIntensityd(keys=image, offsets=shift, prob=aug_prob),
    ])


class CompactLabeld(MapTransform):
    """Keep a label as uint8 where that loses nothing (whole values in 0..255, as 0/1 masks are; anything else
    stays as it is): the cached part of the pipeline then holds a quarter of float32's bytes for it.
    ``as_float32`` turns it back where a float32 tensor is handed on."""

    def __init__(self, *, keys: str | Sequence[str]) -> None:
        super().__init__(keys=keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.dtype.is_floating_point and bool(((label >= 0) & (label <= 255) & (label == label.round())).all()):
                d[key] = label.to(torch.uint8)
        return d


def as_float32(label: torch.Tensor) -> torch.Tensor:
    """A label kept compact by ``CompactLabeld`` as float32 again (a float32 label unchanged, not copied)."""
    return label.to(torch.float32) if label.dtype == torch.uint8 else label


class LoadCased(MapTransform):
    """Read ``image`` and ``label`` paths into float32 MetaTensors 1 x X x Y x Z sharing one meta dict.

    A ``None`` label becomes zeros on the image grid; a label whose shape or affine differs from the image's
    raises UserError. A ``.pkl`` image stored without geometry takes its mask's affine. The meta is reduced
    to the geometry keys (plus the file name) so that batches from ``.pkl`` and NIfTI files collate alike.
    """

    def __init__(self, *, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__(keys=[image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self._load = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)

    def _read(self, path: str) -> MetaTensor:
        # a reader passed per call (not registered) lets the reader's UserError through unchanged
        return self._load(path, reader=image_reader_for(path))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_path = str(d[self.image_key])
        image = self._read(image_path)
        label_path = d.get(self.label_key)
        label = None if label_path is None else self._read(str(label_path))
        geometry = image
        if label is not None and image.meta.get("has_geometry", True) is False:
            geometry = label  # a bare .pkl array: the mask's header is the only geometry there is
        d[self.image_key] = cased(image.as_tensor(), geometry.meta, image_path)
        if self.label_key not in d:
            return d
        if label is None:
            values = torch.zeros_like(image.as_tensor())
        else:
            _check_same_grid(image, label, geometry.affine, image_path=image_path, label_path=str(label_path))
            values = label.as_tensor()
        d[self.label_key] = cased(values, geometry.meta, str(label_path or ""))
        return d


def cased(values: torch.Tensor, meta: Mapping[str, Any], path: str) -> MetaTensor:
    """One key as `LoadCased` hands it on: the voxels 1 x X x Y x Z with the geometry of `meta` (a reader's meta
    dict, reduced to the keys every format has) and the file name `path`."""
    return MetaTensor(values, meta={**{k: copy.deepcopy(meta[k]) for k in _KEPT_META}, "filename_or_obj": path})


def _check_same_grid(
    image: MetaTensor, label: MetaTensor, affine: torch.Tensor, *, image_path: str, label_path: str
) -> None:
    if image.shape != label.shape:
        raise UserError(
            f"{label_path}: mask shape {tuple(label.shape[1:])} differs from image {image_path} shape "
            f"{tuple(image.shape[1:])}; masks must be on the image's voxel grid"
        )
    if not torch.allclose(affine, label.affine, atol=GEOMETRY_ATOL_MM):
        raise UserError(
            f"{label_path}: mask affine differs from the affine of image {image_path}; "
            "masks must be on the image's voxel grid (same spacing, origin and orientation)"
        )


def crop_around_label(
    image: torch.Tensor, label: torch.Tensor, roi_size: Sequence[int], *, air: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``roi_size`` crop centred on the label's bounding box (the volume centre when it is empty).

    image, label: C x X x Y x Z (padded with ``air`` / 0 where smaller than the roi) -> C x R0 x R1 x R2 each,
    a uint8 label (the ``val`` stage's) returned as float32.
    """
    roi = np.array(roi_size)
    pad = np.maximum(roi - np.array(label.shape[1:]), 0)
    if pad.any():
        widths = [int(w) for p in pad[::-1] for w in (p // 2, p - p // 2)]
        image = torch.nn.functional.pad(image, widths, value=air)
        label = torch.nn.functional.pad(label, widths, value=0.0)
    shape = np.array(label.shape[1:])
    found = torch.nonzero(label[0] > 0)
    centre = (found.min(0).values + found.max(0).values).cpu().numpy() // 2 if len(found) else shape // 2
    start = np.clip(centre - roi // 2, 0, shape - roi)
    window = (slice(None), *(slice(int(a), int(a + r)) for a, r in zip(start, roi)))
    return image[window], as_float32(label[window])


class LesionIndicesd(MapTransform):
    """``fg_indices``: the flat indices of every lesion voxel (into the label's spatial shape), computed once
    per case so that they are cached with the volume."""

    def __init__(self, *, label_key: str) -> None:
        super().__init__(keys=[label_key])
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[FG_INDICES] = np.flatnonzero(np.asarray(d[self.label_key][0]) > 0)
        return d


class ForegroundOversampledCropd(Randomizable, MapTransform):
    """nnU-Net's patch sampling: with probability ``fg_oversample`` a ``roi_size`` crop centred on a uniform
    lesion voxel (shifted to stay inside the volume), otherwise a crop at a uniform position over the whole
    volume. A case without lesion voxels always gets the uniform crop. The volume must be at least
    ``roi_size`` (pad first); ``fg_indices`` from ``LesionIndicesd``. The crops are views of the input, which
    is never written (the memory cache hands its volumes in uncopied)."""

    def __init__(self, *, keys: Sequence[str], roi_size: Sequence[int], fg_oversample: float) -> None:
        MapTransform.__init__(self, keys=keys, allow_missing_keys=True)
        self.roi = np.array(roi_size)
        self.fg_oversample = fg_oversample
        self._start: np.ndarray | None = None

    def randomize(self, shape: np.ndarray, fg_indices: np.ndarray) -> None:
        room = shape - self.roi
        if len(fg_indices) and self.R.random_sample() < self.fg_oversample:
            centre = np.array(np.unravel_index(fg_indices[self.R.randint(len(fg_indices))], tuple(shape)))
            self._start = np.clip(centre - self.roi // 2, 0, room)
        else:
            self._start = np.array([self.R.randint(r + 1) for r in room])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d[next(iter(self.key_iterator(d)))]
        self.randomize(np.array(first.shape[1:]), d[FG_INDICES])
        crop = SpatialCrop(roi_start=self._start.tolist(), roi_end=(self._start + self.roi).tolist())
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        d.pop(FG_INDICES)
        return d


class RandAffine32d(RandAffined):
    """``RandAffined`` resampling in float32 (MONAI's default float64 doubles the cost on CPU)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        resample_in_float32(self.rand_affine)


def resample_in_float32(rand_affine: Any) -> bool:
    """Make a MONAI ``RandAffine`` resample in float32; returns whether it could.

    ``RandAffined`` takes no dtype argument; MONAI 1.3-1.6 keep it on the ``resampler`` (a ``Resample``) the
    transform builds. A release without that attribute keeps its stock float64 resampling: the same result
    to float32 rounding, slower.
    """
    resampler = getattr(rand_affine, "resampler", None)
    if resampler is None or not hasattr(resampler, "dtype"):
        return False
    resampler.dtype = np.float32
    return True


def triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    values = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(values) != 3:
        raise ValueError(f"roi_size must be an int or 3 ints, got {size!r}")
    return values  # type: ignore[return-value]
