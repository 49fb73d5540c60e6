"""Click simulation for interactive training and evaluation.

A click is a voxel index (float, axis order of the B x 1 x D x H x W volume) with a label:
1 positive, 0 negative, -1 no click (the region to click in was empty).
"""

from __future__ import annotations

import torch

NO_CLICK = -1


def sample_voxels(
    region: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly drawn voxel of each sample's region (B x 1 x D x H x W bool): the voxel of rank
    floor(u * count) in raster order, u one float64 per sample from `generator`.

    Returns coords B x 3 (float voxel indices; zeros where the region is empty) and found B (bool).
    """
    device = generator.device if generator is not None else region.device
    u = torch.rand(region.shape[0], generator=generator, device=device, dtype=torch.float64).to(region.device)
    flat = region.flatten(1)
    # On a CPU `nonzero` is 10x cheaper than a cumulative sum over a 128^3 crop; on a GPU the cumulative sum
    # draws without reading the host. Both give the same voxel.
    index, counts = (_ranked_by_nonzero if flat.device.type == "cpu" else _ranked_by_cumsum)(flat, u)
    coords = torch.stack(torch.unravel_index(index, region.shape[2:]), dim=1).float()
    return coords, counts > 0


def _ranked_by_nonzero(flat: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flat B x N bool, u B -> (the flat index of each row's voxel of rank floor(u * count), 0 if none; counts B)."""
    voxels = [row.nonzero().squeeze(1) for row in flat]  # ascending flat indices
    counts = torch.tensor([len(v) for v in voxels], device=flat.device)
    ranks = (u * counts).long().tolist()
    return torch.stack([v[r] if len(v) else v.new_zeros(()) for v, r in zip(voxels, ranks)]), counts


def _ranked_by_cumsum(flat: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ranked_by_nonzero` without a host read."""
    counts = flat.sum(dim=1)
    rank = (u * counts).long()
    index = torch.searchsorted(flat.cumsum(dim=1), (rank + 1)[:, None]).squeeze(1)
    return torch.where(counts > 0, index, torch.zeros_like(index)), counts


def first_click(
    target: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A positive click on a uniform voxel of the target (B x 1 x D x H x W, {0, 1}).

    Returns coords B x 3 and labels B (1, or NO_CLICK for an empty target).
    """
    coords, found = sample_voxels(target > 0.5, generator=generator)
    return coords, torch.where(found, 1, NO_CLICK)


def correction_click(
    logits: torch.Tensor, target: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A click on a uniform voxel of the error region of a prediction (logits and target B x 1 x D x H x W).

    The prediction is sigmoid(logits) > 0.5. A missed voxel gives a positive click, a false alarm a
    negative one. Returns coords B x 3 and labels B (1, 0, or NO_CLICK where the prediction is exact).
    """
    truth = target > 0.5
    error = (torch.sigmoid(logits.detach()) > 0.5) != truth
    coords, found = sample_voxels(error, generator=generator)
    index = coords.long()
    batch = torch.arange(target.shape[0], device=target.device)
    missed = truth[batch, 0, index[:, 0], index[:, 1], index[:, 2]]
    return coords, torch.where(found, missed.long(), NO_CLICK)
