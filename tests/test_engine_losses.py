"""The training loss equals its formula: Dice + lesion-weighted BCE per round, the prompt-free round, the ICH term."""

from __future__ import annotations

import pytest
import torch

from samft.engine.losses import SegmentationLoss
from samft.model.sam3d import SegmentOutput


def _dice_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-sample soft Dice loss (MONAI's smoothing of 1e-5), averaged over the batch."""
    p = torch.sigmoid(logits).flatten(1)
    y = label.flatten(1)
    return (1 - (2 * (p * y).sum(1) + 1e-5) / (p.sum(1) + y.sum(1) + 1e-5)).mean()


def _weighted_bce(logits: torch.Tensor, label: torch.Tensor, pos_weight: float) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(pos_weight * label * torch.log(p) + (1 - label) * torch.log(1 - p)).mean()


@pytest.mark.parametrize("pos_weight", [1.0, 50.0])
def test_loss_is_dice_plus_lesion_weighted_bce_over_every_round(pos_weight: float) -> None:
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, 6, 6, 6, generator=g) > 0.9).float()
    rounds = [torch.randn(2, 1, 6, 6, 6, generator=g) for _ in range(2)]
    prompt_free = torch.randn(2, 1, 6, 6, 6, generator=g)
    ich_logit, ich = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.0])
    loss_fn = SegmentationLoss(ich_weight=0.1, lesion_pos_weight=pos_weight)

    loss = loss_fn(SegmentOutput(rounds, ich_logit, torch.zeros(2), prompt_free), label, ich)

    expected = sum(_dice_loss(x, label) + _weighted_bce(x, label, pos_weight) for x in [*rounds, prompt_free])
    expected = expected + 0.1 * torch.nn.functional.binary_cross_entropy_with_logits(ich_logit, ich)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lesion_weight_makes_an_empty_prediction_of_a_lesion_costly() -> None:
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., :2, :2, :2] = 1  # 8 of 512 voxels
    empty = torch.full_like(label, -4.0)
    losses = {w: SegmentationLoss(ich_weight=0.0, lesion_pos_weight=w)(SegmentOutput([empty], None, label), label,
                                                                        torch.ones(1)) for w in (1.0, 50.0)}
    bce_lesion = -torch.log(torch.sigmoid(torch.tensor(-4.0))).item() * 8 / 512
    assert losses[50.0].item() - losses[1.0].item() == pytest.approx(49 * bce_lesion, rel=1e-4)
