"""Model registry, checkpoint loading (local file or Hugging Face URL), freezing and parameter groups."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from torch import nn

from samft.errors import UserError
from samft.model.decoder import MaskDecoder3D, TwoWayTransformer
from samft.model.encoder import ImageEncoder3D
from samft.model.heads import PresenceHead, RefinementHead, RepresentationHead
from samft.model.prompt_encoder import PromptEncoder3D
from samft.model.sam3d import SamMed3D
from samft.model.unet import UNetSegmenter, UNetSpec

RELEASED_CHECKPOINT_URL = "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"
SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
_HF_URL = re.compile(r"https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_MAX_KEYS_SHOWN = 4


@dataclass(frozen=True)
class SamMed3DSpec:
    """Every hyperparameter of a SAM-Med3D variant."""

    img_size: int
    patch_size: int
    encoder_dim: int
    encoder_depth: int
    encoder_heads: int
    mlp_ratio: float
    window_size: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_dim: int
    attention_downsample_rate: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int


REGISTRY: dict[str, SamMed3DSpec] = {
    # The released SAM-Med3D (sam_med3d_turbo.pth): ViT-B encoder, 100.5 M parameters.
    "sam_med3d": SamMed3DSpec(
        img_size=128, patch_size=16, encoder_dim=768, encoder_depth=12, encoder_heads=12, mlp_ratio=4.0,
        window_size=14, global_attn_indexes=(2, 5, 8, 11), prompt_dim=384, mask_in_chans=16,
        decoder_depth=2, decoder_heads=8, decoder_mlp_dim=2048, attention_downsample_rate=2,
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
    ),
    # The same classes and input (128^3, an 8^3 token grid), small widths and depth. Its windowed blocks use a
    # window of the grid itself: the released window of 14 pads the grid to 14^3 and spends 5/6 of the attention
    # on padding tokens, which the released weights need but a model trained from scratch does not (3x faster).
    "sam_med3d_tiny": SamMed3DSpec(
        img_size=128, patch_size=16, encoder_dim=96, encoder_depth=4, encoder_heads=4, mlp_ratio=4.0,
        window_size=8, global_attn_indexes=(1, 3), prompt_dim=48, mask_in_chans=16,
        decoder_depth=2, decoder_heads=4, decoder_mlp_dim=192, attention_downsample_rate=2,
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64,
    ),
}


def build_sam(
    spec: SamMed3DSpec, *, visual_tokens: int = 256, gradient_checkpointing: bool = False, refine: bool = False,
    refine_full_resolution: bool = False, refine_norm: str = "instance", refine_crop: int | None = None,
    refine_crop_lesion_share: float = 0.67, refine_cell_mlp: int = 0,
) -> SamMed3D:
    """A randomly initialised SamMed3D with the given hyperparameters (`refine`: add a `RefinementHead`, at full
    resolution with `refine_full_resolution`, its UNet normalised by `refine_norm`, trained on boxes of edge
    `refine_crop`, with a per-voxel stage of `refine_cell_mlp` hidden units; see `SamMed3D`)."""
    encoder = ImageEncoder3D(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        dim=spec.encoder_dim,
        depth=spec.encoder_depth,
        num_heads=spec.encoder_heads,
        mlp_ratio=spec.mlp_ratio,
        out_chans=spec.prompt_dim,
        window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes,
        gradient_checkpointing=gradient_checkpointing,
    )
    transformer = TwoWayTransformer(
        depth=spec.decoder_depth,
        dim=spec.prompt_dim,
        num_heads=spec.decoder_heads,
        mlp_dim=spec.decoder_mlp_dim,
        downsample_rate=spec.attention_downsample_rate,
    )
    representation_head = RepresentationHead(in_channels=encoder.out_chans, dim=visual_tokens)
    return SamMed3D(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder3D(
            dim=spec.prompt_dim, grid_size=encoder.grid_size, img_size=spec.img_size,
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder3D(
            dim=spec.prompt_dim,
            transformer=transformer,
            num_multimask_outputs=spec.num_multimask_outputs,
            iou_head_depth=spec.iou_head_depth,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        representation_head=representation_head,
        ich_head=PresenceHead(dim=visual_tokens),
        refiner=RefinementHead(full_resolution=refine_full_resolution, norm=refine_norm,
                               cell_mlp=refine_cell_mlp) if refine else None,
        refine_crop=refine_crop, refine_crop_lesion_share=refine_crop_lesion_share,
    )


def build_model(
    *,
    name: str,
    visual_tokens: int = 256,
    gradient_checkpointing: bool = False,
    checkpoint: str | Path | None = None,
    freeze_encoder: bool = False,
    refine: bool = False,
    refine_full_resolution: bool = False,
    refine_norm: str = "instance",
    refine_crop: int | None = None,
    refine_crop_lesion_share: float = 0.67,
    refine_cell_mlp: int = 0,
    unet: UNetSpec | None = None,
) -> SamMed3D | UNetSegmenter:
    """The registered model `name`, its weights loaded from `checkpoint` (path or Hugging Face URL).

    `refine`: SAM models get a refinement head (`refine_full_resolution`: with the CT's every voxel in and out,
    see `RefinementHead`; `refine_norm`, `refine_crop`, `refine_crop_lesion_share`, `refine_cell_mlp`: see
    `build_sam`). `unet`: the
    U-Net's architecture (name="unet").
    """
    if name == "unet":
        return _build_unet(unet or UNetSpec(), checkpoint=checkpoint, freeze_encoder=freeze_encoder)
    if name not in REGISTRY:
        raise UserError(f"model.name={name!r} is not one of {sorted([*REGISTRY, 'unet'])}")
    model = build_sam(REGISTRY[name], visual_tokens=visual_tokens, gradient_checkpointing=gradient_checkpointing,
                      refine=refine, refine_full_resolution=refine_full_resolution, refine_norm=refine_norm,
                      refine_crop=refine_crop, refine_crop_lesion_share=refine_crop_lesion_share,
                      refine_cell_mlp=refine_cell_mlp)
    if checkpoint is not None:
        load_weights(model, checkpoint, model_name=name)
    if freeze_encoder:
        model.freeze_encoder()
    return model


def build_model_from_config(model: Mapping[str, Any], *, with_checkpoint: bool = True) -> SamMed3D | UNetSegmenter:
    """The model of a `model` config section (a run's resolved config, or the DictConfig); `with_checkpoint=False`
    skips `model.checkpoint` (the weights come from a run's own checkpoint instead)."""
    unet = model.get("unet") or {}
    spec = UNetSpec(**{
        **unet, "channels": tuple(unet.get("channels", UNetSpec.channels)),
        "strides": tuple(tuple(s) if isinstance(s, Sequence) else s for s in unet.get("strides", UNetSpec.strides)),
    })
    return build_model(
        name=model["name"], visual_tokens=model.get("visual_tokens", 256),
        gradient_checkpointing=model.get("gradient_checkpointing", False),
        checkpoint=model.get("checkpoint") if with_checkpoint else None,
        freeze_encoder=model.get("freeze_encoder", False) if with_checkpoint else False,
        refine=model.get("refine", False), refine_full_resolution=model.get("refine_full_resolution", False),
        refine_norm=model.get("refine_norm", "instance"), refine_crop=model.get("refine_crop"),
        refine_crop_lesion_share=model.get("refine_crop_lesion_share", 0.67),
        refine_cell_mlp=model.get("refine_cell_mlp", 0), unet=spec,
    )


def _build_unet(spec: UNetSpec, *, checkpoint: str | Path | None, freeze_encoder: bool) -> UNetSegmenter:
    """The MONAI U-Net baseline (trained from scratch; it has no pretrained encoder to freeze)."""
    if freeze_encoder:
        raise UserError("model=unet has no pretrained encoder to freeze; set model.freeze_encoder=false")
    model = UNetSegmenter(spec)
    if checkpoint is not None:
        load_weights(model, checkpoint, model_name="unet")
    return model


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local file for `checkpoint`: the path itself, or a Hugging Face URL downloaded once into its cache."""
    text = str(checkpoint)
    if not text.startswith(("http://", "https://")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"model.checkpoint file not found: {path}; pass an existing .pth file or the URL "
                            f"{RELEASED_CHECKPOINT_URL}")
        return path
    match = _HF_URL.fullmatch(text)
    if match is None:
        raise UserError(f"model.checkpoint URL {text} is not a Hugging Face file URL "
                        "(https://huggingface.co/<owner>/<repo>/resolve/<revision>/<file>); "
                        "download it yourself and pass the local path")
    try:
        local = huggingface_hub.hf_hub_download(match["repo"], match["file"], revision=match["rev"])
    except Exception as exc:  # network, offline mode, missing file: all end in the same advice
        raise UserError(f"could not download model.checkpoint {text} ({type(exc).__name__}); without network, "
                        f"fetch the file elsewhere and pass it as model.checkpoint=/path/to/{match['file']}") from exc
    return Path(local)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file, with DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes removed.

    Accepts the released format ({"model_state_dict": ...}), our checkpoints ({"model": ...}) and bare state dicts.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = f"it pickles a {refused[1]} object" if refused else f"not a readable torch file, {type(exc).__name__}"
        raise UserError(f"cannot read checkpoint {path} as a weights-only torch file ({reason}); save only "
                        "tensors, e.g. torch.save({'model_state_dict': model.state_dict()}, path)") from exc
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of weights")
    for key in ("model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} has no state dict: expected tensors under 'model_state_dict' or "
                        f"'model' or at the top level, found keys {sorted(obj)[:_MAX_KEYS_SHOWN]}")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def load_weights(model: nn.Module, checkpoint: str | Path, *, model_name: str) -> None:
    """Load `checkpoint` strictly: all of the model, or all of its SAM parts when the file holds only those.

    The released checkpoint has only the SAM parts; the heads then keep their initialisation.
    """
    path = resolve_checkpoint(checkpoint)
    state = read_state_dict(path)
    expected = model.state_dict()
    sam_keys = {k for k in expected if k.split(".")[0] in SAM_PARTS}
    head_keys = expected.keys() - sam_keys
    target = set(expected) if head_keys & state.keys() else sam_keys
    missing = sorted(target - state.keys())
    unexpected = sorted(state.keys() - target)
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in sorted(target & state.keys())
             if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"checkpoint {path} does not fit model.name={model_name}: "
                        f"{_listing('missing', missing)}; {_listing('unexpected', unexpected)}; "
                        f"{_listing('wrong shape (checkpoint vs model)', wrong)}")
    model.load_state_dict(state, strict=False)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, encoder_lr_mult: float) -> list[dict]:
    """Optimiser groups over the trainable parameters: image encoder at lr * encoder_lr_mult, the rest at lr.

    Biases, norms and position tables (pos_embed, rel_pos_*) get no weight decay. Empty groups are left out.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoder" if name.startswith("image_encoder.") else "rest"
        decay = param.ndim >= 2 and "pos_embed" not in name and ".rel_pos_" not in name
        groups.setdefault((part, decay), []).append(param)
    return [
        {
            "name": f"{part}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": lr * (encoder_lr_mult if part == "encoder" else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(groups.items())
    ]


def _strip_prefixes(key: str) -> str:
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_KEYS_SHOWN]) + (f", ... (+{len(items) - _MAX_KEYS_SHOWN})"
                                                   if len(items) > _MAX_KEYS_SHOWN else "")
    return f"{len(items)} {label}" + (f" [{shown}]" if items else "")
