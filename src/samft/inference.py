"""Apply a trained model to whole scans: the training preprocessing, sliding-window inference, and the
inverse transforms back onto the scan's own voxel grid."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from samft.builders import preprocessing
from samft.choices import DEFAULT_MAX_VOXELS, NONFINITE_POLICIES
from samft.data.readers import Volume, read_volume, volume_meta
from samft.data.stats import voxel_spacing
from samft.data.transforms import LoadCased, cased
from samft.engine.checkpoint import load_checkpoint
from samft.engine.precision import autocast
from samft.errors import UserError
from samft.model import build_model_from_config
from samft.postprocess import load_min_component_ml, remove_small_components
from samft.predict import valid_clicks
from samft.segmentation import (
    allow_tf32,
    clicks_to_grid,
    inference_precision,
    scan_logits,
    sw_batch_size_for,
    to_scan_grid,
)

log = logging.getLogger("samft.inference")


@dataclass(frozen=True)
class Prediction:
    """A prediction on the input scan's grid: probabilities X x Y x Z in [0, 1], the scan's affine, and the run's
    post-processing (predicted components under `min_component_ml` are dropped from the mask, except those holding
    a positive click: `clicked`, voxel indices x, y, z of the scan)."""

    probabilities: np.ndarray
    affine: np.ndarray
    min_component_ml: float = 0.0
    has_geometry: bool = True  # False: a bare array read with the identity (1 mm) affine
    clicked: tuple[tuple[int, int, int], ...] = ()

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        mask = (self.probabilities > threshold).astype(np.uint8)
        return remove_small_components(mask, self.affine, min_ml=self.min_component_ml, keep_at=self.clicked)


class Predictor:
    """A trained model with the preprocessing of its run.

    `ckpt` is a samft checkpoint (best_model.pth or latest_model.pth); its resolved config rebuilds the model
    and the preprocessing, the run's stats.json supplies nnU-Net normalisation statistics when used, and its
    postprocessing.json the post-processing chosen on the validation split (`postprocess=False` skips it).
    `precision` `auto` segments at the run's `hardware.precision` under autocast on CUDA (with TF32 for the fp32
    parts) and in fp32 on a CPU; `sw_batch_size` None: 4 windows per forward pass on CUDA, 1 on a CPU.
    """

    def __init__(
        self, ckpt: Path, *, device: torch.device, overlap: float = 0.25, sw_batch_size: int | None = None,
        postprocess: bool = True, nonfinite: str = "refuse", max_voxels: int = DEFAULT_MAX_VOXELS,
        precision: str = "auto",
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise UserError(f"nonfinite is {nonfinite!r}; use one of {', '.join(NONFINITE_POLICIES)}")
        self.nonfinite, self.max_voxels = nonfinite, max_voxels
        state = load_checkpoint(ckpt)
        config = state.get("config") or {}
        if "model" not in config or "data" not in config:
            raise UserError(f"{ckpt} holds no training config; pass a best_model.pth or latest_model.pth of a run")
        model_cfg, data_cfg = config["model"], config["data"]
        try:
            self.prompt_mode = model_cfg.get("prompt_mode", "click")
            self.model = build_model_from_config(model_cfg, with_checkpoint=False)
            self.model.load_state_dict(state["model"])
            norm_stats = _train_norm_stats(ckpt.parent) if data_cfg["intensity"] == "nnunet" else None
            self.preprocessing = preprocessing(data_cfg, norm_stats)
            self.transforms: Compose = self.preprocessing.transforms("predict")
        except UserError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:  # a damaged or foreign run
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"{ckpt}: its config and weights do not rebuild a model ({type(err).__name__}: "
                            f"{first[:200]}); pass a best_model.pth or latest_model.pth of a samft run") from None
        self.model.to(device).eval()
        self.device = device
        trained = (config.get("hardware") or {}).get("precision", "fp32")
        self.precision = inference_precision(precision, device=device, trained=trained)
        allow_tf32(device)
        self.overlap, self.sw_batch_size = overlap, sw_batch_size_for(sw_batch_size, device=device)
        # the pipeline after its reader: predict reads each scan once and hands the voxels to the rest
        if not isinstance(self.transforms.transforms[0], LoadCased):
            raise RuntimeError("the predict pipeline must start with LoadCased")
        self._after_read = Compose(list(self.transforms.transforms[1:]))
        self.min_component_ml = load_min_component_ml(ckpt.parent) if postprocess else 0.0

    @torch.no_grad()
    def predict(
        self, image_path: Path, *, points: list[list[float]] | None = None, mask_affine: np.ndarray | None = None,
    ) -> Prediction:
        """Probabilities for one scan (.nii, .nii.gz, .pkl or a DICOM series folder) on its own grid.

        points: None for the prompt-free mode; else clicks [x, y, z, label] in voxel indices of the input scan
        (label 1 inside the lesion, 0 outside), decoded as `samft.segmentation.scan_logits` describes.
        mask_affine: the 4 x 4 affine of the scan's mask, used (as training uses it) when the file carries no
        geometry (a bare .pkl array); without it such a scan is read with the identity (1 mm) affine.
        """
        declared = declared_geometry(image_path)
        if declared is not None:  # before the voxels are read: a small .nii.gz may decompress to many GB
            check_scan_size(image_path, *declared, spacing=self.preprocessing.spacing, max_voxels=self.max_voxels)
        volume = read_volume(image_path)  # a corrupt or unsafe file fails here with a UserError naming it
        if not volume.has_geometry and mask_affine is not None:
            volume = Volume(volume.array, np.asarray(mask_affine, dtype=np.float64), True)
        return self.predict_volume(volume, image_path, points=points)

    @torch.no_grad()
    def predict_volume(
        self, volume: Volume, image_path: Path, *, points: list[list[float]] | None = None,
    ) -> Prediction:
        """`predict` for a scan already read (voxels X x Y x Z and affine); `image_path` names it in errors."""
        check_scan_size(image_path, volume.array.shape, volume.affine, spacing=self.preprocessing.spacing,
                        max_voxels=self.max_voxels)
        array = finite_voxels(volume.array, image_path, policy=self.nonfinite)
        if points is not None:
            check_clicks(points, array.shape, image_path)
        voxels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]  # as LoadCased hands them on
        data = self._after_read({"image": cased(voxels, volume_meta(volume), str(image_path))})
        image: MetaTensor = data["image"]
        clicks = None if points is None else _to_grid(points, image)
        if clicks is not None and not self.model.takes_clicks:
            raise UserError(f"points were given for {image_path.name}, but this model takes no clicks "
                            f"(model={type(self.model).__name__}); predict without points")
        with autocast(self.precision, self.device):
            logits = scan_logits(
                self.model, image.as_tensor().unsqueeze(0).to(self.device), roi_size=self.preprocessing.roi,
                overlap=self.overlap, air=self.preprocessing.air, sw_batch_size=self.sw_batch_size, clicks=clicks,
                prompt_mode=self.prompt_mode,
            )
        probabilities = to_scan_grid(torch.sigmoid(logits[0].float()), image, self._after_read)
        if probabilities.shape != array.shape:  # cannot happen unless a transform is not invertible
            raise RuntimeError(f"inverted prediction {probabilities.shape} != scan {array.shape}")
        return Prediction(probabilities=probabilities, affine=np.asarray(volume.affine, dtype=np.float64),
                          min_component_ml=self.min_component_ml, has_geometry=volume.has_geometry,
                          clicked=tuple(positive_voxels(points or [])))


def positive_voxels(points: list[list[float]]) -> list[tuple[int, int, int]]:
    """The voxels x, y, z (nearest) of the positive clicks among `points` ([x, y, z, label] in scan voxels)."""
    return [(round(x), round(y), round(z)) for x, y, z, label in points if label == 1]


def declared_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, 4 x 4 affine) from a NIfTI header without reading its voxels; None for other formats or a header
    nibabel cannot parse (the reader then reports the file)."""
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")) or not Path(path).is_file():
        return None
    import nibabel as nib

    try:
        image = nib.load(path)
        return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
    except Exception:  # damaged headers: read_volume names the problem
        return None


def check_scan_size(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, *, spacing: tuple[float, ...], max_voxels: int,
) -> None:
    """UserError when the scan (`shape`) or its resampling to `spacing` mm holds more than `max_voxels` voxels."""
    voxels = math.prod(shape)
    zooms = voxel_spacing(affine)
    resampled = math.prod(math.ceil(n * z / s) for n, z, s in zip(shape[:3], zooms, spacing))
    if voxels > max_voxels or resampled > max_voxels:
        raise UserError(f"{path}: {' x '.join(map(str, shape))} voxels ({resampled:,} at the model's {list(spacing)} "
                        f"mm) exceed max_voxels={max_voxels:,}; check the file, or raise max_voxels if it is real")


def finite_voxels(array: np.ndarray, path: Path, *, policy: str) -> np.ndarray:
    """The voxels, checked for NaN and Inf: `refuse` raises UserError naming the scan, `zero` sets them to 0."""
    if array.dtype.kind != "f":
        return array
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if not count:
        return array
    if policy != "zero":
        raise UserError(f"{path}: {count:,} voxel(s) are NaN or Inf, which would make the whole prediction NaN; "
                        "repair the scan, or pass nonfinite=zero to set them to 0")
    log.warning("%s: %d NaN or Inf voxel(s) set to 0 (nonfinite=zero)", path, count)
    return np.where(bad, 0, array).astype(array.dtype)


def check_clicks(points: list[list[float]], shape: tuple[int, ...], path: Path) -> None:
    """UserError unless `points` are [x, y, z, label] rows with finite voxel indices inside `shape`."""
    if not valid_clicks(points):
        raise UserError(f"points for {path.name} are {str(points)[:80]}; expected a non-empty list of [x, y, z, "
                        "label] with finite voxel coordinates and label 0 or 1")
    for click in points:
        if any(not 0 <= c <= n - 1 for c, n in zip(click[:3], shape)):
            raise UserError(f"{path.name}: the click {click} lies outside the scan (shape {tuple(shape)}); give voxel "
                            f"indices from 0 to {', '.join(str(n - 1) for n in shape)} per axis")


def _to_grid(points: list[list[float]], image: MetaTensor) -> torch.Tensor:
    """Clicks [x, y, z, label] in voxel indices of the input scan -> N x 4 on the preprocessed grid."""
    array = torch.as_tensor(points, dtype=torch.float64)
    if array.ndim != 2 or array.shape[1] != 4 or not set(array[:, 3].tolist()) <= {0.0, 1.0}:
        raise UserError(f"points must be a list of [x, y, z, label] with label 0 or 1, got {points}")
    return clicks_to_grid(points, image)


def _train_norm_stats(run_dir: Path) -> dict[str, Any]:
    stats_path = run_dir / "stats.json"
    if not stats_path.exists():
        raise UserError(f"data.intensity=nnunet needs the run's stats.json beside the checkpoint ({stats_path})")
    return json.loads(stats_path.read_text())["train"]["foreground_intensity"]
