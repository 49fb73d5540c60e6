"""One MONAI dictionary-transform pipeline shared by training, validation and prediction.

Every stage starts with the same deterministic prefix: read the case (``.pkl`` through the safe reader,
NIfTI through nibabel; no label file -> an all-zero mask on the image grid), orient to RAS, resample to
``spacing`` (bilinear image, nearest label), map intensities (brain window or nnU-Net CT normalisation).
Then:

- ``predict``: nothing more; the whole volume goes to sliding-window inference and ``monai.transforms.Invertd``
  maps predictions back to the original grid (orientation and spacing are invertible).
- ``val``: pad to at least ``roi_size`` with air, then one ``roi_size`` crop centred on the bounding box of
  the lesion(s), or on the volume centre when the mask is empty (also deterministic, so it is cached).
- ``train``: pad as for ``val``, then random crops biased towards lesions (``pos_neg_ratio`` positive :
  1 negative; any lesion voxel can be a centre, so small lesions are kept; an empty mask gives a random
  crop inside the head) and augmentation, each with probability ``aug_prob``: flips on 3 axes, a small
  affine, intensity scale and shift. Random parameters are drawn once per sample and applied to image and
  label alike (label resampled with nearest neighbour).

The result is one flat ``Compose``: MONAI's cached datasets cache everything before the first random
transform, i.e. the deterministic prefix.
"""

from __future__ import annotations

import copy
import warnings
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
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
)
from monai.utils import MetaKeys

from samft.data.preflight import GEOMETRY_ATOL_MM
from samft.data.readers import image_reader_for
from samft.errors import UserError

Stage = Literal["train", "val", "predict"]
STAGES = ("train", "val", "predict")
INTENSITIES = ("window", "nnunet")
AUG_ROTATION_DEG = 10.0
AUG_SCALE = 0.1
AUG_INTENSITY_SCALE = 0.1
AUG_SHIFT_HU = 8.0
FG_INDICES, BG_INDICES = "fg_indices", "bg_indices"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's convention, which the readers' affines follow
_KEPT_META = (MetaKeys.AFFINE, MetaKeys.ORIGINAL_AFFINE, MetaKeys.SPATIAL_SHAPE, MetaKeys.SPACE)


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing settings (``data.*``) in one value; ``transforms(stage)`` builds that stage's pipeline."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    roi_size: int = 128
    intensity: str = "window"
    window_center: float = 40.0
    window_width: float = 80.0
    norm_stats: Mapping[str, float] | None = None
    pos_neg_ratio: float = 1.0
    aug_prob: float = 0.3

    def transforms(self, stage: Stage) -> Compose:
        return build_transforms(stage=stage, **asdict(self))


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
    pos_neg_ratio: float = 1.0,
    aug_prob: float = 0.3,
    keys: tuple[str, str] = ("image", "label"),
) -> Compose:
    """The pipeline for one stage, applied to record dicts (CONTRACT.md) holding file paths.

    Output per sample: ``image`` float32 MetaTensor 1 x R0 x R1 x R2 (R = ``roi_size``; for ``predict`` the
    whole resampled volume), ``label`` float32 1 x R0 x R1 x R2 in {0, 1} (when the record has one),
    ``ich`` float32 scalar tensor (when present); other record entries pass through unchanged.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    image, label = keys
    both = [image, label]
    roi = _triple(roi_size)
    a_min, a_max, b_min, b_max = intensity_range(
        intensity=intensity, window_center=window_center, window_width=window_width, norm_stats=norm_stats
    )
    transforms: list[Any] = [
        LoadCased(image_key=image, label_key=label),
        Orientationd(keys=both, axcodes="RAS", labels=_RAS_LABELS, allow_missing_keys=True),
        Spacingd(keys=both, pixdim=tuple(spacing), mode=("bilinear", "nearest"), allow_missing_keys=True),
        ScaleIntensityRanged(keys=image, a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True),
        EnsureTyped(keys="ich", data_type="tensor", dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ]
    if stage == "predict":
        return Compose(transforms)
    transforms += [
        SpatialPadd(keys=image, spatial_size=roi, value=b_min),
        SpatialPadd(keys=label, spatial_size=roi, value=0.0),
    ]
    if stage == "val":
        return Compose([*transforms, CropAroundLabeld(keys=both, label_key=label, roi_size=roi)])
    shift = AUG_SHIFT_HU * (b_max - b_min) / (a_max - a_min)
    return Compose([
        *transforms,
        # negative centres inside the head (above air) when air has its own value, as with the window
        CropCentresd(label_key=label, image_key=image if intensity == "window" else None, image_threshold=b_min),
        PosNegCropd(
            keys=both, label_key=label, spatial_size=roi, pos=pos_neg_ratio, neg=1.0, num_samples=1,
            fg_indices_key=FG_INDICES, bg_indices_key=BG_INDICES,
        ),
        *(RandFlipd(keys=both, prob=aug_prob, spatial_axis=axis) for axis in range(3)),
        RandAffine32d(
            keys=both, prob=aug_prob, rotate_range=(np.deg2rad(AUG_ROTATION_DEG),) * 3,
            scale_range=(AUG_SCALE,) * 3, mode=("bilinear", "nearest"), padding_mode=("border", "zeros"),
            spatial_size=roi, cache_grid=True,
        ),
        RandScaleIntensityd(keys=image, factors=AUG_INTENSITY_SCALE, prob=aug_prob),
        RandShiftIntensityd(keys=image, offsets=shift, prob=aug_prob),
    ])


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
        meta = {k: copy.deepcopy(geometry.meta[k]) for k in _KEPT_META}
        d[self.image_key] = MetaTensor(image.as_tensor(), meta={**meta, "filename_or_obj": image_path})
        if self.label_key not in d:
            return d
        if label is None:
            values = torch.zeros_like(image.as_tensor())
        else:
            _check_same_grid(image, label, geometry.affine, image_path=image_path, label_path=str(label_path))
            values = label.as_tensor()
        label_meta = {**copy.deepcopy(meta), "filename_or_obj": str(label_path or "")}
        d[self.label_key] = MetaTensor(values, meta=label_meta)
        return d


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


class CropAroundLabeld(MapTransform):
    """Crop ``roi_size`` around the centre of the label's bounding box (the volume centre if it is empty).

    The window is shifted to stay inside the volume, which must be at least ``roi_size`` (pad first).
    """

    def __init__(self, *, keys: Sequence[str], label_key: str, roi_size: Sequence[int]) -> None:
        super().__init__(keys=keys, allow_missing_keys=True)
        self.label_key, self.roi_size = label_key, tuple(roi_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        shape = np.array(label.shape[1:])
        found = torch.nonzero(label[0] > 0)
        centre = (found.min(0).values + found.max(0).values).numpy() // 2 if len(found) else shape // 2
        roi = np.array(self.roi_size)
        start = np.clip(centre - roi // 2, 0, np.maximum(shape - roi, 0))
        crop = SpatialCrop(roi_start=start.tolist(), roi_end=(start + roi).tolist())
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class CropCentresd(MapTransform):
    """Candidate centres for lesion-biased crops, computed once (so they are cached with the volume):
    ``fg_indices`` every lesion voxel (small lesions included), ``bg_indices`` an evenly strided subset of at
    most ``max_background`` voxels outside the lesion and above ``image_threshold`` (inside the head; every
    voxel if there is none), both flat indices into the label's spatial shape."""

    def __init__(
        self, *, label_key: str, image_key: str | None, image_threshold: float, max_background: int = 20_000
    ) -> None:
        super().__init__(keys=[label_key])
        self.label_key, self.image_key = label_key, image_key
        self.image_threshold, self.max_background = image_threshold, max_background

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key][0] > 0
        background = ~label
        if self.image_key is not None:
            inside = background & (d[self.image_key][0] > self.image_threshold)
            background = inside if inside.any() else background
        bg = np.flatnonzero(background.numpy())
        d[FG_INDICES] = np.flatnonzero(label.numpy())
        d[BG_INDICES] = bg[:: max(1, -(-len(bg) // self.max_background))]
        return d


class RandAffine32d(RandAffined):
    """``RandAffined`` resampling in float32 (MONAI's default float64 doubles the cost on CPU)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rand_affine.resampler.dtype = np.float32


class PosNegCropd(RandCropByPosNegLabeld):
    """``RandCropByPosNegLabeld`` without its warning for every case without a lesion (expected here: such
    cases fall back to negative crops)."""

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> list[dict[Hashable, Any]]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Num foregrounds")  # "... unable to generate class balanced"
            return super().__call__(data, lazy=lazy)


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    values = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(values) != 3:
        raise ValueError(f"roi_size must be an int or 3 ints, got {size!r}")
    return values  # type: ignore[return-value]
