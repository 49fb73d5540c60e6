"""Helpers on collated batches: size, halves, plain tensors, voxel spacing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["image"])


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two halves of a collated batch along the batch dimension (tensors and lists alike)."""
    half = (batch_size(batch) + 1) // 2
    return {key: value[:half] for key, value in batch.items()}, {key: value[half:] for key, value in batch.items()}


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata: a MetaTensor routes every op through __torch_function__, which slows the model."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def batch_spacing(image: torch.Tensor, default: Sequence[float]) -> torch.Tensor:
    """B x 3 voxel spacing in mm: column norms of a MetaTensor's affine, else `default` for every case."""
    if isinstance(image, MetaTensor):
        affine = image.affine.detach().double().cpu()
        affine = affine.expand(len(image), 4, 4) if affine.dim() == 2 else affine
        return affine[:, :3, :3].norm(dim=1)
    return torch.tensor([list(default)] * len(image), dtype=torch.float64)
