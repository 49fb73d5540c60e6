"""Apply a trained model to whole scans: the training preprocessing, sliding-window inference, and the
inverse transforms back onto the scan's own voxel grid."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd

from samft.data.readers import read_volume
from samft.data.transforms import Preprocessing, intensity_range
from samft.engine.checkpoint import load_checkpoint
from samft.errors import UserError
from samft.model import build_model


@dataclass(frozen=True)
class Prediction:
    """A prediction on the input scan's grid: probabilities X x Y x Z in [0, 1] and the scan's affine."""

    probabilities: np.ndarray
    affine: np.ndarray

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        return (self.probabilities > threshold).astype(np.uint8)


class Predictor:
    """A trained model with the preprocessing of its run.

    `ckpt` is a samft checkpoint (best_model.pth or latest_model.pth); its resolved config rebuilds the model
    and the preprocessing, and the run's stats.json supplies nnU-Net normalisation statistics when used.
    """

    def __init__(self, ckpt: Path, *, device: torch.device, overlap: float = 0.25, sw_batch_size: int = 1) -> None:
        state = load_checkpoint(ckpt)
        config = state.get("config") or {}
        if "model" not in config or "data" not in config:
            raise UserError(f"{ckpt} holds no training config; pass a best_model.pth or latest_model.pth of a run")
        model_cfg, data_cfg = config["model"], config["data"]
        self.prompt_mode = model_cfg.get("prompt_mode", "click")
        self.model = build_model(name=model_cfg["name"], visual_tokens=model_cfg["visual_tokens"])
        self.model.load_state_dict(state["model"])
        self.model.to(device).eval()
        self.device = device
        self.overlap, self.sw_batch_size = overlap, sw_batch_size
        norm_stats = _train_norm_stats(ckpt.parent) if data_cfg["intensity"] == "nnunet" else None
        self.preprocessing = Preprocessing(
            spacing=tuple(data_cfg["spacing"]), roi_size=data_cfg["roi_size"], intensity=data_cfg["intensity"],
            window_center=data_cfg["window_center"], window_width=data_cfg["window_width"], norm_stats=norm_stats,
        )
        self.transforms: Compose = self.preprocessing.transforms("predict")
        self.air = intensity_range(
            intensity=self.preprocessing.intensity, window_center=self.preprocessing.window_center,
            window_width=self.preprocessing.window_width, norm_stats=norm_stats,
        )[2]

    @torch.no_grad()
    def predict(self, image_path: Path, *, points: list[list[float]] | None = None) -> Prediction:
        """Probabilities for one scan (.nii, .nii.gz or .pkl) on its own grid.

        points: None for the prompt-free mode; else clicks [x, y, z, label] in voxel indices of the input scan
        (label 1 inside the lesion, 0 outside), decoded in one window centred on the positive clicks.
        """
        original = read_volume(image_path)  # a corrupt or unsafe file fails here with a UserError naming it
        data = self.transforms({"image": str(image_path)})
        image: MetaTensor = data["image"]
        batch = image.unsqueeze(0).to(self.device)
        if points is None:
            logits = sliding_window_inference(
                batch, roi_size=(self.preprocessing.roi_size,) * 3, sw_batch_size=self.sw_batch_size,
                predictor=self._auto_logits, overlap=self.overlap, mode="gaussian", cval=self.air,
            )
        else:
            logits = self._click_logits(batch, _to_grid(points, image))
        data["pred"] = MetaTensor(torch.sigmoid(logits[0].float()).cpu(), meta=image.meta,
                                  applied_operations=image.applied_operations)
        inverted = Invertd(keys="pred", transform=self.transforms, orig_keys="image", nearest_interp=False)(data)
        probabilities = inverted["pred"][0].numpy().clip(0.0, 1.0)
        if probabilities.shape != original.array.shape:  # cannot happen unless a transform is not invertible
            raise RuntimeError(f"inverted prediction {probabilities.shape} != scan {original.array.shape}")
        return Prediction(probabilities=probabilities, affine=np.asarray(original.affine, dtype=np.float64))

    def _auto_logits(self, window: torch.Tensor) -> torch.Tensor:
        return self.model.segment(window, num_clicks=0).logits[-1]

    def _click_logits(self, volume: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        """One roi window around the positive clicks (padded with air where the volume is smaller)."""
        roi = self.preprocessing.roi_size
        shape = torch.tensor(volume.shape[2:])
        padded_shape = torch.maximum(shape, torch.tensor(roi))
        canvas = volume.new_full((1, 1, *padded_shape.tolist()), self.air)
        canvas[(..., *[slice(0, s) for s in shape.tolist()])] = volume
        positives = clicks[clicks[:, 3] == 1][:, :3]
        centre = (positives if len(positives) else clicks[:, :3]).mean(0)
        start = (centre - roi / 2).round().long().clamp(min=0)
        start = torch.minimum(start, padded_shape - roi)
        window = canvas[(..., *[slice(int(a), int(a) + roi) for a in start])]
        coords = (clicks[:, :3] - start).unsqueeze(0).to(self.device, torch.float32)
        labels = clicks[:, 3].long().unsqueeze(0).to(self.device)
        features = self.model.encode(window)
        low_res = self.model.decode(features, points=(coords, labels))
        window_logits = torch.nn.functional.interpolate(low_res, size=(roi,) * 3, mode="trilinear")
        logits = volume.new_full((1, 1, *padded_shape.tolist()), -20.0)
        logits[(..., *[slice(int(a), int(a) + roi) for a in start])] = window_logits
        return logits[(..., *[slice(0, s) for s in shape.tolist()])]


def _to_grid(points: list[list[float]], image: MetaTensor) -> torch.Tensor:
    """Clicks [x, y, z, label] in voxel indices of the input scan -> N x 4 on the preprocessed grid."""
    array = torch.as_tensor(points, dtype=torch.float64)
    if array.ndim != 2 or array.shape[1] != 4 or not set(array[:, 3].tolist()) <= {0.0, 1.0}:
        raise UserError(f"points must be a list of [x, y, z, label] with label 0 or 1, got {points}")
    original = torch.as_tensor(np.asarray(image.meta["original_affine"]), dtype=torch.float64)
    current = torch.as_tensor(np.asarray(image.affine), dtype=torch.float64)
    homogeneous = torch.cat([array[:, :3], torch.ones(len(array), 1, dtype=torch.float64)], dim=1)
    grid = (torch.linalg.inv(current) @ original @ homogeneous.T).T[:, :3]
    return torch.cat([grid, array[:, 3:]], dim=1)


def _train_norm_stats(run_dir: Path) -> dict[str, Any]:
    stats_path = run_dir / "stats.json"
    if not stats_path.exists():
        raise UserError(f"data.intensity=nnunet needs the run's stats.json beside the checkpoint ({stats_path})")
    return json.loads(stats_path.read_text())["train"]["foreground_intensity"]
