"""Segment one whole preprocessed scan: the single inference path of validation and `samft.predict`.

It depends only on the model and MONAI. Reading files, checkpoints and the choice of scans stay with the callers
(`samft.inference.Predictor`, `samft.engine.validation`), so "validation Dice equals evaluate's Dice" holds by
construction: both call `scan_logits` and `to_scan_grid`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd
from monai.utils import TraceKeys

OUTSIDE_LOGIT = -20.0
"""Logit given to voxels outside the click window (probability about 2e-9)."""
CUDA_SW_BATCH_SIZE = 4
"""Sliding windows per forward pass on a GPU by default (one 128^3 window leaves most of a GPU idle)."""


def inference_precision(setting: str, *, device: torch.device, trained: str) -> str:
    """The precision to segment at: `setting` (fp32, bf16, fp16), or for `auto` the run's own (`trained`) on CUDA
    and fp32 elsewhere (autocast on a CPU is slower than fp32 and would change the CPU results)."""
    if setting != "auto":
        return setting
    return trained if device.type == "cuda" else "fp32"


def sw_batch_size_for(setting: int | None, *, device: torch.device) -> int:
    """Sliding windows per forward pass: `setting`, or by default `CUDA_SW_BATCH_SIZE` on CUDA and 1 elsewhere
    (the CPU results stay those of one window at a time)."""
    if setting is not None:
        return int(setting)
    return CUDA_SW_BATCH_SIZE if device.type == "cuda" else 1


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (inference only: a 10-bit mantissa in
    the products, far below a mask threshold's sensitivity); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@torch.no_grad()
def scan_logits(
    model: torch.nn.Module,
    volume: torch.Tensor,
    *,
    roi_size: Sequence[int],
    overlap: float,
    air: float,
    sw_batch_size: int = 1,
    clicks: torch.Tensor | None = None,
    prompt_mode: str = "click",
) -> torch.Tensor:
    """Logits 1 x 1 x X x Y x Z for a preprocessed volume 1 x 1 x X x Y x Z on the model's device.

    clicks None: prompt-free, Gaussian-weighted sliding windows of `roi_size` with `overlap` (air outside the
    volume). clicks N x 4 (`[x, y, z, label]`, voxel indices of `volume`, label 1 inside the lesion, 0 outside):
    for a model that also learned to segment without prompts (`prompt_mode` both or auto, the run's
    model.prompt_mode), the same sliding windows, each window holding a positive click decoded with the clicks
    inside it and the others prompt-free, so the clicked region is blended from every window that sees it and
    the rest of the scan is still segmented; for a click-only model (`click`), one window centred on the
    positive clicks, decoded with them, and `OUTSIDE_LOGIT` beyond it. Along an axis shorter than `roi_size`
    the scan is centred in the window, with air on both sides, as in training.
    """
    roi = tuple(int(r) for r in roi_size)
    if clicks is not None and prompt_mode == "click":
        return _click_window_logits(model, volume, clicks, roi=roi, air=air)
    predictor = _prompt_free_predictor(model) if clicks is None else _click_predictor(model, volume, clicks, roi)
    return sliding_window_inference(
        volume, roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian", cval=air,
        predictor=predictor, with_coord=True,
    )


WindowPredictor = Callable[[torch.Tensor, Sequence[Sequence[slice]]], torch.Tensor]
"""Windows B x 1 x R x R x R and their slices in the padded volume (MONAI's `with_coord`) -> logits of their shape."""


def _prompt_free_logits(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return model.segment(windows, num_clicks=0).logits[-1].float()


def _prompt_free_predictor(model: torch.nn.Module) -> WindowPredictor:
    return lambda windows, _slices: _prompt_free_logits(model, windows)


def _padding_before(shape: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """Voxels of air before the scan along each axis shorter than the window: half the difference (floor), as
    training's SpatialPad and MONAI's sliding window pad it, so the scan's edges lie where training put them."""
    return (torch.maximum(shape, roi) - shape) // 2


def _click_predictor(
    model: torch.nn.Module, volume: torch.Tensor, clicks: torch.Tensor, roi: tuple[int, int, int],
) -> WindowPredictor:
    """Decode each window with the clicks inside it when one of them is positive, else without prompts."""
    shape = torch.tensor(volume.shape[2:])
    roi_t = torch.tensor(roi)
    points = clicks[:, :3] + _padding_before(shape, roi_t)
    positive = clicks[:, 3] == 1

    def predict(windows: torch.Tensor, slices: Sequence[Sequence[slice]]) -> torch.Tensor:
        logits = []
        for window, window_slices in zip(windows.split(1), slices):
            start = torch.tensor([s.start for s in window_slices[2:]])
            inside = ((points >= start) & (points < start + roi_t)).all(dim=1)
            if not bool((inside & positive).any()):
                logits.append(_prompt_free_logits(model, window))
                continue
            coords = (points[inside] - start).unsqueeze(0).to(window.device, torch.float32)
            labels = clicks[inside, 3].long().unsqueeze(0).to(window.device)
            logits.append(model.segment_points(window, coords=coords, labels=labels).float())
        return torch.cat(logits)

    return predict


def _click_window_logits(
    model: torch.nn.Module, volume: torch.Tensor, clicks: torch.Tensor, *, roi: tuple[int, int, int], air: float
) -> torch.Tensor:
    roi_t = torch.tensor(roi)
    shape = torch.tensor(volume.shape[2:])
    padded_shape = torch.maximum(shape, roi_t)
    offset = _padding_before(shape, roi_t)
    scan = (..., *[slice(int(o), int(o) + int(s)) for o, s in zip(offset, shape)])
    canvas = volume.new_full((1, 1, *padded_shape.tolist()), air)
    canvas[scan] = volume
    points = clicks[:, :3] + offset
    positives = points[clicks[:, 3] == 1]
    centre = (positives if len(positives) else points).mean(0)
    start = (centre - roi_t / 2).round().long().clamp(min=0)
    start = torch.minimum(start, padded_shape - roi_t)
    window_slices = (..., *[slice(int(a), int(a) + r) for a, r in zip(start, roi)])
    coords = (points - start).unsqueeze(0).to(volume.device, torch.float32)
    labels = clicks[:, 3].long().unsqueeze(0).to(volume.device)
    window_logits = model.segment_points(canvas[window_slices], coords=coords, labels=labels).float()
    logits = volume.new_full((1, 1, *padded_shape.tolist()), OUTSIDE_LOGIT)
    logits[window_slices] = window_logits
    return logits[scan]


def to_scan_grid(probabilities: torch.Tensor, image: MetaTensor, transform: Compose) -> np.ndarray:
    """Probabilities 1 x X x Y x Z on the preprocessed grid of `image` (the output of a pipeline equal to
    `transform`, holding its applied operations) -> an X0 x Y0 x Z0 array on the scan's own grid, in [0, 1]
    (linear interpolation)."""
    # MONAI inverts only with the transform instance that ran; a sample read back from the disk cache was made by
    # another process's instance of the same pipeline, so the instance check is switched off (TraceKeys.NONE).
    operations = [{**op, TraceKeys.ID: TraceKeys.NONE} for op in image.applied_operations]
    image = MetaTensor(image.as_tensor(), meta=image.meta, applied_operations=operations)
    data = {
        "image": image,
        "pred": MetaTensor(probabilities.detach().float().cpu(), meta=image.meta, applied_operations=operations),
    }
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(data)
    return inverted["pred"][0].numpy().clip(0.0, 1.0)


def clicks_to_grid(points: Sequence[Sequence[float]], image: MetaTensor) -> torch.Tensor:
    """Clicks `[x, y, z, label]` in voxel indices of the original scan -> N x 4 on `image`'s preprocessed grid."""
    array = torch.as_tensor(points, dtype=torch.float64)
    original = torch.as_tensor(np.asarray(image.meta["original_affine"]), dtype=torch.float64)
    current = torch.as_tensor(np.asarray(image.affine), dtype=torch.float64)
    homogeneous = torch.cat([array[:, :3], torch.ones(len(array), 1, dtype=torch.float64)], dim=1)
    grid = (torch.linalg.inv(current) @ original @ homogeneous.T).T[:, :3]
    return torch.cat([grid, array[:, 3:]], dim=1)
