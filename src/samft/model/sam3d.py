"""SAM-Med3D composed from its parts, with the heads and the click-driven `segment` API."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samft.model.decoder import MaskDecoder3D
from samft.model.encoder import ImageEncoder3D
from samft.model.head_crop import Box, sample_box
from samft.model.heads import PresenceHead, RefinementHead, RepresentationHead
from samft.model.layers import trilinear_resize
from samft.model.prompt_encoder import PromptEncoder3D
from samft.model.prompts import NO_CLICK, correction_click, first_click


@dataclass
class SegmentOutput:
    """What `segment` returns.

    logits: one B x 1 x S x S x S full-resolution logit volume per click round (one round in auto mode).
    ich_logit: B ICH-presence logits, or None for a model without that head.
    features: B x C x g x g x g image-encoder features.
    prompt_free: B x 1 x S x S x S logits decoded without any prompt, when asked for beside click rounds.
    box: in training with `model.refine_crop`, the box of each crop the logits cover (B x 1 x size^3 then);
    the loss compares them with `box.crop(label)`.
    """

    logits: list[torch.Tensor]
    ich_logit: torch.Tensor | None
    features: torch.Tensor
    prompt_free: torch.Tensor | None = None
    box: Box | None = None


class SamMed3D(nn.Module):
    """Image encoder + prompt encoder + mask decoder (the released state-dict layout) + our heads.

    `refiner` (optional) turns the decoder's S/4 logits into full-resolution ones (`RefinementHead`); without it
    the S/4 logits are upsampled trilinearly, as in the official model. `refine_crop` (training only): the head
    refines a box of that edge in each crop (`sample_box`, a uniformly drawn lesion voxel inside it with
    probability `refine_crop_lesion_share`), and the loss is taken there; validation and prediction refine the
    whole crop.
    """

    takes_clicks = True
    exports_encoder = True
    # parameters without a gradient in some steps (extra mask tokens, IoU head, unused prompt embeddings)
    has_unused_parameters = True
    # submodules only the ICH-presence loss trains (frozen when model.ich_loss_weight=0)
    ich_heads = ("ich_head", "representation_head")

    def __init__(
        self,
        *,
        image_encoder: ImageEncoder3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        representation_head: RepresentationHead,
        ich_head: PresenceHead,
        refiner: RefinementHead | None = None,
        refine_crop: int | None = None,
        refine_crop_lesion_share: float = 0.67,
    ) -> None:
        super().__init__()
        if refine_crop is not None and refiner is None:
            raise ValueError("refine_crop needs a refinement head")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.representation_head = representation_head
        self.ich_head = ich_head
        self.refiner = refiner
        self.refine_crop = refine_crop
        self.refine_crop_lesion_share = refine_crop_lesion_share
        self.img_size = image_encoder.img_size
        self.encoder_frozen = False

    def freeze_encoder(self) -> None:
        """No gradients for the image encoder: its parameters stop requiring them, `encode` runs it under
        no_grad (no activations kept) and it stays in eval mode (see `train`)."""
        self.image_encoder.requires_grad_(False)
        self.encoder_frozen = True
        self.image_encoder.eval()

    def train(self, mode: bool = True) -> SamMed3D:
        super().train(mode)
        if self.encoder_frozen:
            self.image_encoder.eval()
        return self

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image B x 1 x S x S x S -> features B x C x g x g x g (S = img_size, g = S / patch size)."""
        size, chans = self.img_size, self.image_encoder.in_chans
        if image.ndim != 5 or image.shape[1] != chans or tuple(image.shape[2:]) != (size,) * 3:
            raise ValueError(f"expected image B x {chans} x {size} x {size} x {size}, got {tuple(image.shape)}")
        if self.encoder_frozen:
            with torch.no_grad():
                return self.image_encoder(image)
        return self.image_encoder(image)

    def decode(
        self,
        features: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Low-resolution mask logits B x 1 x S/4 x S/4 x S/4.

        points: coords B x N x 3 (float voxel indices of the S^3 input) and labels B x N (1 positive,
        0 negative, -1 padding); mask_prompt: B x 1 x S/4 x S/4 x S/4 logits (e.g. the previous round's).
        """
        self._check_decode_inputs(features, points, mask_prompt)
        sparse, dense = self.prompt_encoder(batch_size=features.shape[0], points=points, mask_prompt=mask_prompt)
        masks, _ = self.mask_decoder(
            image_embeddings=features, image_pe=self.prompt_encoder.dense_pe(), sparse=sparse, dense=dense
        )
        return masks

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """features B x C x g x g x g -> B x g^3 x visual_tokens."""
        return self.representation_head(features)

    def ich_logit(self, features: torch.Tensor) -> torch.Tensor:
        """features B x C x g x g x g -> ICH-presence logits B."""
        return self.ich_head(self.representation_head(features))

    def segment(
        self,
        image: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        num_clicks: int,
        generator: torch.Generator | None = None,
        prompt_free: bool = False,
    ) -> SegmentOutput:
        """Interactive segmentation with simulated clicks, or prompt-free with num_clicks=0.

        image, target: B x 1 x S x S x S (target in {0, 1}, needed when num_clicks > 0). Round 1 clicks a
        uniform target voxel; each later round clicks a uniform voxel of the previous round's error region
        (positive on a miss, negative on a false alarm) and feeds the previous low-resolution logits back
        (detached) as the mask prompt. A sample without a click (empty target) is decoded without points.
        `prompt_free=True` with clicks also decodes the same features once without prompts (`prompt_free`), so
        one forward trains both ways of using the model (model.prompt_mode=both).
        """
        if num_clicks < 0:
            raise ValueError(f"num_clicks must be >= 0, got {num_clicks}")
        if num_clicks > 0 and (target is None or target.shape != image.shape):
            got = None if target is None else tuple(target.shape)
            raise ValueError(f"num_clicks > 0 needs target of the image's shape {tuple(image.shape)}, got {got}")
        features = self.encode(image)
        box = None
        if self.refine_crop is not None and self.training and target is not None:
            box = sample_box(target, size=self.refine_crop, step=self.refiner.downsample,
                             lesion_share=self.refine_crop_lesion_share, generator=generator)
        # the refinement head's share of the CT is the same in every round
        head_term = None
        if self.refiner is not None:
            head_term = self.refiner.image_term(image if box is None else box.crop(image))
        if num_clicks == 0:
            logits = [self.full_resolution(self.decode(features), image, head_term=head_term, box=box)]
        else:
            logits = self._click_rounds(features, image, target, num_clicks=num_clicks, generator=generator,
                                        head_term=head_term, box=box)
        unprompted = (self.full_resolution(self.decode(features), image, head_term=head_term, box=box)
                      if prompt_free and num_clicks > 0 else None)
        return SegmentOutput(logits=logits, ich_logit=self.ich_logit(features), features=features,
                             prompt_free=unprompted, box=box)

    # Wrappers call the module itself (DistributedDataParallel schedules its all-reduce through forward).
    forward = segment

    def segment_points(self, image: torch.Tensor, *, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits B x 1 x S x S x S for image B x 1 x S x S x S and given clicks (coords B x N x 3
        in voxel indices, labels B x N: 1 positive, 0 negative)."""
        points = (coords, labels)
        return self.full_resolution(self.decode(self.encode(image), points=points), image, points=points)

    def full_resolution(self, low_res: torch.Tensor, image: torch.Tensor,
                        points: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                        head_term: torch.Tensor | None = None, box: Box | None = None) -> torch.Tensor:
        """Decoder logits B x 1 x S/4 x S/4 x S/4 -> B x 1 x S x S x S (upsampled, then refined if there is a
        refinement head, which also sees the clicks `points`: coords B x N x 3, labels B x N; `head_term`: its
        `image_term` of the image or its box, computed here when None; `box`: B x 1 x size^3, each sample's box)."""
        if self.refiner is not None:
            return self.refiner(image, low_res, points, image_term=head_term, box=box)
        return trilinear_resize(low_res, (self.img_size,) * 3)

    def _click_rounds(
        self, features: torch.Tensor, image: torch.Tensor, target: torch.Tensor, *, num_clicks: int,
        generator: torch.Generator | None, head_term: torch.Tensor | None = None, box: Box | None = None,
    ) -> list[torch.Tensor]:
        batch = features.shape[0]
        box_target = target if box is None else box.crop(target)
        coords = features.new_zeros(batch, 0, 3, dtype=torch.float32)
        labels = torch.zeros(batch, 0, dtype=torch.long, device=features.device)
        mask_prompt, logits = None, []
        for round_index in range(num_clicks):
            if round_index == 0:
                new_coords, new_labels = first_click(target, generator=generator)
            else:
                new_coords, new_labels = correction_click(logits[-1], box_target, generator=generator)
                if box is not None:
                    new_coords = new_coords + box.starts.to(new_coords.dtype)
            coords = torch.cat([coords, new_coords[:, None]], dim=1)
            labels = torch.cat([labels, new_labels[:, None]], dim=1)
            low_res = self._decode_clicks(features, coords, labels, mask_prompt)
            logits.append(self.full_resolution(low_res, image, points=(coords, labels), head_term=head_term,
                                               box=box))
            mask_prompt = low_res.detach()
        return logits

    def _decode_clicks(
        self, features: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, mask_prompt: torch.Tensor | None
    ) -> torch.Tensor:
        """Decode each sample with its real clicks only (NO_CLICK entries dropped, none -> no points).

        features B x C x G x G x G, coords B x N x 3, labels B x N, mask_prompt B x 1 x 4G x 4G x 4G or None ->
        low-resolution logits B x 1 x 4G x 4G x 4G. Samples with equal click counts share one decoder call. The
        counts are the one host read (a click count is the decoder's point-token count, a shape); the samples
        are grouped and their clicks gathered on the device.
        """
        clicked = labels != NO_CLICK
        counts = clicked.sum(dim=1)
        per_sample = counts.tolist()
        groups = sorted(set(per_sample))
        if groups != [labels.shape[1]]:  # some NO_CLICK entries: each row's real clicks first, in their order
            first = torch.sort((~clicked).to(torch.uint8), dim=1, stable=True).indices
            coords, labels = coords.gather(1, first[..., None].expand(-1, -1, 3)), labels.gather(1, first)
        if len(groups) == 1:
            count = groups[0]
            points = (coords[:, :count].contiguous(), labels[:, :count].contiguous()) if count else None
            return self.decode(features, points=points, mask_prompt=mask_prompt)
        low = 4 * self.prompt_encoder.grid_size
        out = features.new_empty(features.shape[0], 1, low, low, low)
        by_count = torch.sort(counts, stable=True).indices  # the samples of each count together, in batch order
        start = 0
        for count in groups:
            rows = by_count[start:start + per_sample.count(count)]
            start += len(rows)
            points = None
            if count > 0:
                points = (coords.index_select(0, rows)[:, :count].contiguous(),
                          labels.index_select(0, rows)[:, :count].contiguous())
            prompt = None if mask_prompt is None else mask_prompt.index_select(0, rows)
            low_res = self.decode(features.index_select(0, rows), points=points, mask_prompt=prompt)
            out = out.index_put((rows,), low_res)
        return out

    def _check_decode_inputs(
        self,
        features: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_prompt: torch.Tensor | None,
    ) -> None:
        dim, grid = self.prompt_encoder.dim, self.prompt_encoder.grid_size
        if features.ndim != 5 or tuple(features.shape[1:]) != (dim, grid, grid, grid):
            raise ValueError(f"expected features B x {dim} x {grid} x {grid} x {grid}, got {tuple(features.shape)}")
        batch = features.shape[0]
        if points is not None:
            coords, labels = points
            if coords.ndim != 3 or coords.shape[0] != batch or coords.shape[2] != 3 or (
                tuple(labels.shape) != tuple(coords.shape[:2])
            ):
                raise ValueError(
                    f"expected point coords {batch} x N x 3 and labels {batch} x N, "
                    f"got {tuple(coords.shape)} and {tuple(labels.shape)}"
                )
        low = 4 * grid
        if mask_prompt is not None and tuple(mask_prompt.shape) != (batch, 1, low, low, low):
            raise ValueError(
                f"expected mask_prompt {batch} x 1 x {low} x {low} x {low}, got {tuple(mask_prompt.shape)}"
            )
