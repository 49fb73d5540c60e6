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
from monai.transforms import Compose

from samft.data.readers import read_volume
from samft.data.transforms import Preprocessing
from samft.engine.checkpoint import load_checkpoint
from samft.errors import UserError
from samft.model import build_model_from_config
from samft.postprocess import load_min_component_ml, remove_small_components
from samft.segmentation import clicks_to_grid, scan_logits, to_scan_grid


@dataclass(frozen=True)
class Prediction:
    """A prediction on the input scan's grid: probabilities X x Y x Z in [0, 1], the scan's affine, and the run's
    post-processing (predicted components under `min_component_ml` are dropped from the mask)."""

    probabilities: np.ndarray
    affine: np.ndarray
    min_component_ml: float = 0.0

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        mask = (self.probabilities > threshold).astype(np.uint8)
        return remove_small_components(mask, self.affine, min_ml=self.min_component_ml)


class Predictor:
    """A trained model with the preprocessing of its run.

    `ckpt` is a samft checkpoint (best_model.pth or latest_model.pth); its resolved config rebuilds the model
    and the preprocessing, the run's stats.json supplies nnU-Net normalisation statistics when used, and its
    postprocessing.json the post-processing chosen on the validation split (`postprocess=False` skips it).
    """

    def __init__(
        self, ckpt: Path, *, device: torch.device, overlap: float = 0.25, sw_batch_size: int = 1,
        postprocess: bool = True,
    ) -> None:
        state = load_checkpoint(ckpt)
        config = state.get("config") or {}
        if "model" not in config or "data" not in config:
            raise UserError(f"{ckpt} holds no training config; pass a best_model.pth or latest_model.pth of a run")
        model_cfg, data_cfg = config["model"], config["data"]
        self.prompt_mode = model_cfg.get("prompt_mode", "click")
        self.model = build_model_from_config(model_cfg, with_checkpoint=False)
        self.model.load_state_dict(state["model"])
        self.model.to(device).eval()
        self.device = device
        self.overlap, self.sw_batch_size = overlap, sw_batch_size
        norm_stats = _train_norm_stats(ckpt.parent) if data_cfg["intensity"] == "nnunet" else None
        self.preprocessing = Preprocessing.from_config(data_cfg, norm_stats)
        self.transforms: Compose = self.preprocessing.transforms("predict")
        self.min_component_ml = load_min_component_ml(ckpt.parent) if postprocess else 0.0

    @torch.no_grad()
    def predict(self, image_path: Path, *, points: list[list[float]] | None = None) -> Prediction:
        """Probabilities for one scan (.nii, .nii.gz or .pkl) on its own grid.

        points: None for the prompt-free mode; else clicks [x, y, z, label] in voxel indices of the input scan
        (label 1 inside the lesion, 0 outside), decoded in one window centred on the positive clicks.
        """
        original = read_volume(image_path)  # a corrupt or unsafe file fails here with a UserError naming it
        data = self.transforms({"image": str(image_path)})
        image: MetaTensor = data["image"]
        clicks = None if points is None else _to_grid(points, image)
        if clicks is not None and not self.model.takes_clicks:
            raise UserError(f"points were given for {image_path.name}, but this model takes no clicks "
                            f"(model={type(self.model).__name__}); predict without points")
        logits = scan_logits(
            self.model, image.as_tensor().unsqueeze(0).to(self.device), roi_size=self.preprocessing.roi,
            overlap=self.overlap, air=self.preprocessing.air, sw_batch_size=self.sw_batch_size, clicks=clicks,
        )
        probabilities = to_scan_grid(torch.sigmoid(logits[0].float()), image, self.transforms)
        if probabilities.shape != original.array.shape:  # cannot happen unless a transform is not invertible
            raise RuntimeError(f"inverted prediction {probabilities.shape} != scan {original.array.shape}")
        return Prediction(probabilities=probabilities, affine=np.asarray(original.affine, dtype=np.float64),
                          min_component_ml=self.min_component_ml)


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
