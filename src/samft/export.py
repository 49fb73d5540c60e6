"""`sam_encoder.pth`: the trained image encoder and representation head, for a BLIP-2-style model.

The file holds `image_encoder_state_dict` (the key the predecessor documented), `representation_head_state_dict`,
the `architecture` needed to rebuild both, and a `format_version`. `load_encoder` rebuilds a module that maps
CT crops B x 1 x 128 x 128 x 128 to visual tokens B x N x visual_tokens, which a Q-Former consumes as
`encoder_hidden_states` (see the README's BLIP-2 section).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from samft.engine.checkpoint import save_checkpoint, unwrap
from samft.errors import UserError

FORMAT_VERSION = 1


class VisualTokenEncoder(nn.Module):
    """Image encoder + representation head: B x 1 x S x S x S -> B x N x visual_tokens (N = (S/16)^3)."""

    def __init__(self, *, image_encoder: nn.Module, representation_head: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.representation_head = representation_head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.representation_head(self.image_encoder(image))


def save_encoder(model: nn.Module, path: Path, *, model_name: str, visual_tokens: int) -> None:
    """Write the encoder export of a trained SAM model atomically."""
    model = unwrap(model)
    save_checkpoint(
        {
            "format_version": FORMAT_VERSION,
            "architecture": {"model_name": model_name, "visual_tokens": visual_tokens},
            "image_encoder_state_dict": model.image_encoder.state_dict(),
            "representation_head_state_dict": model.representation_head.state_dict(),
        },
        path,
    )


def load_encoder(path: str | Path, *, map_location: str | torch.device = "cpu") -> VisualTokenEncoder:
    """Rebuild the exported encoder (in eval mode) from `sam_encoder.pth`."""
    from samft.model import build_model

    if not Path(path).is_file():
        raise UserError(f"encoder export {path} does not exist; pass the sam_encoder.pth of a run")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zips, foreign pickles (UnpicklingError: refused globals), bad tensors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read encoder export {path} ({type(err).__name__}: {first}); pass the "
                        "sam_encoder.pth that samft.train wrote") from None
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{path} is not a samft encoder export of format {FORMAT_VERSION} (found {version!r})")
    try:
        arch = payload["architecture"]
        model = build_model(name=arch["model_name"], visual_tokens=arch["visual_tokens"])
        encoder = VisualTokenEncoder(image_encoder=model.image_encoder,
                                     representation_head=model.representation_head)
        encoder.image_encoder.load_state_dict(payload["image_encoder_state_dict"])
        encoder.representation_head.load_state_dict(payload["representation_head_state_dict"])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a missing entry or weights of another shape
        detail = f"missing entry {err}" if isinstance(err, KeyError) else str(err).strip().splitlines()[0]
        raise UserError(f"{path} is a damaged samft encoder export ({detail}); export it again from its run") from None
    return encoder.eval()
