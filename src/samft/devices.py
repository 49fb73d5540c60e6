"""The one rule for turning a device setting (auto | cpu | cuda) into a torch device."""

from __future__ import annotations

import torch

from samft.errors import UserError


def resolve_device(name: str, *, key: str) -> torch.device:
    """auto: cuda when a GPU is visible, else cpu. `key` names the setting in the error for a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA GPU is visible; use {key}=cpu")
    return torch.device(name)
