"""Mixed precision: the autocast context and the gradient scaler chosen by `precision`."""

from __future__ import annotations

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """Autocast for bf16/fp16 on `device`; a disabled context for fp32."""
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision], enabled=precision != "fp32")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling is needed only for fp16 (bf16 has fp32's exponent range); disabled it is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
