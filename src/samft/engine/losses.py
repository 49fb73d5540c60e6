"""The training loss: Dice + lesion-weighted BCE over every click round, plus the weighted ICH-classification BCE."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn


class SegmentationLoss(nn.Module):
    """Mean over the batch of sum_rounds DiceCE(logits_r, label) + ich_weight * BCE(ich_logit, ich).

    The prompt-free logits of prompt_mode=both count as one more round. `batch_dice` (nnU-Net's choice) computes
    the Dice over the whole batch as one volume: a patch without lesion then adds its false positives to the
    batch's denominator instead of scoring 0 or 1 on its own. Without it each term is a per-sample mean, so the
    loss of a batch equals the mean of its samples' losses and gradient accumulation is exactly a larger batch;
    with it, accumulation is exact for the CE term only.
    `ich_weight=0` or a model without a classifier head drops the ICH term. `lesion_pos_weight` weighs the BCE
    of lesion voxels: a bleed fills 0.01-1 % of a 128^3 crop, and with unweighted BCE a model trained from
    scratch first collapses to empty masks (where Dice gives no gradient) and stays there for about a hundred
    updates before it finds the lesions (README, "The model"; benchmarks/empty_mask_plateau.py).
    """

    def __init__(self, *, ich_weight: float, lesion_pos_weight: float = 1.0, batch_dice: bool = False) -> None:
        super().__init__()
        self.ich_weight = ich_weight
        self.dice_ce = DiceCELoss(sigmoid=True, batch=batch_dice, weight=torch.tensor([float(lesion_pos_weight)]))
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, output: Any, label: torch.Tensor, ich: torch.Tensor) -> torch.Tensor:
        """output: SegmentOutput (logits: list of B x 1 x S x S x S, prompt_free: one more or None, ich_logit: B
        or None);
        label: B x 1 x S x S x S in {0, 1} (taken in `output.box` when the logits cover a box); ich: B in {0, 1}.
        Returns a scalar computed in fp32."""
        if output.box is not None:
            label = output.box.crop(label)
        rounds = [*output.logits, *([] if output.prompt_free is None else [output.prompt_free])]
        loss = sum(self.dice_ce(logits.float(), label) for logits in rounds)
        if self.ich_weight > 0 and output.ich_logit is not None:
            loss = loss + self.ich_weight * self.bce(output.ich_logit.float(), ich.float())
        return loss
