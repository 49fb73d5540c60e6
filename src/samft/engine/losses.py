"""The training loss: Dice + BCE over every click round, plus the weighted ICH-classification BCE."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn


class SegmentationLoss(nn.Module):
    """Mean over the batch of sum_rounds DiceCE(logits_r, label) + ich_weight * BCE(ich_logit, ich).

    Each term is a per-sample mean, so the loss of a batch equals the mean of its samples' losses (what exact
    gradient accumulation relies on). `ich_weight=0` or a model without a classifier head drops the ICH term.
    """

    def __init__(self, *, ich_weight: float) -> None:
        super().__init__()
        self.ich_weight = ich_weight
        self.dice_ce = DiceCELoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, output: Any, label: torch.Tensor, ich: torch.Tensor) -> torch.Tensor:
        """output: SegmentOutput (logits: list of B x 1 x S x S x S, ich_logit: B or None);
        label: B x 1 x S x S x S in {0, 1}; ich: B in {0, 1}. Returns a scalar computed in fp32."""
        loss = sum(self.dice_ce(logits.float(), label) for logits in output.logits)
        if self.ich_weight > 0 and output.ich_logit is not None:
            loss = loss + self.ich_weight * self.bce(output.ich_logit.float(), ich.float())
        return loss
