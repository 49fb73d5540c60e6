"""The sub-crop the refinement head trains on (`model.refine_crop`): the head, the costly full-resolution part of
a training step, runs on a box of each 128^3 crop, drawn as nnU-Net draws its patches, and the loss is taken there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samft.model.prompts import sample_voxels


@dataclass(frozen=True)
class Box:
    """One cube per sample: starts B x 3 (voxel indices of the S^3 crop, long, multiples of the head's grid
    step) and the edge `size` in voxels."""

    starts: torch.Tensor
    size: int

    def window(self, *, scale: int = 1) -> tuple[torch.Tensor, int]:
        """(starts B x 3, edge) of the boxes on a grid `scale` times coarser, as `trilinear_resize` takes them."""
        return self.starts // scale, self.size // scale

    def crop(self, x: torch.Tensor, *, scale: int = 1) -> torch.Tensor:
        """x B x C x (S/scale)^3 -> B x C x (size/scale)^3: each sample's box on a grid `scale` times coarser."""
        starts, edge = self.window(scale=scale)
        return torch.stack([
            sample[:, a:a + edge, b:b + edge, c:c + edge] for sample, (a, b, c) in zip(x, starts.tolist())
        ])


def sample_box(target: torch.Tensor, *, size: int, step: int, lesion_share: float,
               generator: torch.Generator | None = None) -> Box:
    """A box of edge `size` in each S^3 crop of target (B x 1 x S x S x S, {0, 1}), its start a multiple of `step`.

    With probability `lesion_share`, a sample with lesion voxels gets a box holding a uniformly drawn one of them at
    a uniform position; the others get a box uniform over the crop (nnU-Net's foreground oversampling).
    """
    crop = target.shape[2]
    if tuple(target.shape[2:]) != (crop,) * 3 or size % step or not 0 < size <= crop:
        raise ValueError(f"a box of {size} (a multiple of {step}) needs a cubic crop at least as large, "
                         f"got {tuple(target.shape)}")
    batch, device = target.shape[0], generator.device if generator is not None else target.device
    voxels, found = sample_voxels(target > 0.5, generator=generator)
    u = torch.rand(batch, 4, generator=generator, device=device, dtype=torch.float64).to(target.device)
    on_lesion = found & (u[:, 0] < lesion_share)
    # the voxel at a uniform offset that stays inside the box once the start is rounded down to a multiple of step
    around = voxels.long() - (u[:, 1:] * (size - step + 1)).long()
    uniform = (u[:, 1:] * (crop - size + 1)).long()
    starts = torch.where(on_lesion[:, None], around, uniform).clamp(0, crop - size)
    return Box(starts=starts // step * step, size=size)
