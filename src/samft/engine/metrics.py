"""Validation metrics (MONAI): Dice after k clicks, HD95 in mm, false-positive volume, ICH-detection AUROC."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_roc_auc
from torch.utils.data import DataLoader

from samft.engine.batches import batch_spacing, plain_tensor


@dataclass
class CaseScores:
    """Per-case values, kept as lists so that ranks or batches can be merged before averaging."""

    dice: dict[int, list[float]] = field(default_factory=dict)
    hd95_mm: list[float] = field(default_factory=list)
    fp_volume_ml: list[float] = field(default_factory=list)
    ich_scores: list[float] = field(default_factory=list)
    ich_labels: list[int] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: Sequence[CaseScores]) -> CaseScores:
        """The cases of all `parts` (e.g. one per rank) in one CaseScores."""
        merged = cls(dice={k: [] for k in parts[0].dice})
        for part in parts:
            for k, values in part.dice.items():
                merged.dice[k] += values
            merged.hd95_mm += part.hd95_mm
            merged.fp_volume_ml += part.fp_volume_ml
            merged.ich_scores += part.ich_scores
            merged.ich_labels += part.ich_labels
        return merged


class SegmentationMetrics:
    """Accumulates validation batches and averages over cases.

    Metric names: `val/dice@k` (click modes, one per k in `val_clicks`: Dice on positive cases after k clicks),
    `val/dice` (the monitored value: Dice after `val_clicks[0]` clicks, or of the prompt-free prediction in auto
    mode), `val/dice_auto` (prompt_mode=both: Dice of the prompt-free prediction on positive cases),
    `val/hd95_mm` (95th-percentile Hausdorff distance on positive cases at the monitored click count; an empty
    prediction scores the volume diagonal), `val/fp_volume_ml` (predicted volume on negative cases),
    `val/auroc` (ICH detection from the classifier head; absent when the head or one class is missing),
    `val/n_pos`, `val/n_neg`. Predictions are sigmoid(logits) > 0.5.
    """

    def __init__(self, *, val_clicks: Sequence[int], prompt_mode: str) -> None:
        self.click_counts = tuple(val_clicks) if prompt_mode in ("click", "both") else ()
        self.monitored_clicks = self.click_counts[0] if self.click_counts else 0
        self.scores_prompt_free = prompt_mode in ("auto", "both")
        self.scores = CaseScores(dice={k: [] for k in self.click_counts + ((0,) if self.scores_prompt_free else ())})
        self._dice = DiceMetric(include_background=True, ignore_empty=False, reduction="none")
        self._hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")

    def update(
        self,
        *,
        logits: Sequence[torch.Tensor],
        label: torch.Tensor,
        spacing: torch.Tensor,
        ich: torch.Tensor,
        ich_logit: torch.Tensor | None,
        prompt_free: torch.Tensor | None = None,
    ) -> None:
        """logits: one B x 1 x D x H x W tensor per click round; label: B x 1 x D x H x W; spacing: B x 3 mm;
        ich: B; ich_logit: B or None; prompt_free: B x 1 x D x H x W beside click rounds (prompt_mode=both)."""
        label = label.detach().float().cpu() > 0.5
        predictions = {k: prediction_after(logits if k or prompt_free is None else [prompt_free], k)
                       for k in self.scores.dice}
        monitored = predictions[self.monitored_clicks]
        positive = label.flatten(1).any(1)
        if positive.any():
            for k, pred in predictions.items():
                self.scores.dice[k] += self._dice(pred[positive], label[positive]).flatten().tolist()
            self.scores.hd95_mm += self._hausdorff(monitored[positive], label[positive], spacing[positive])
        voxel_ml = spacing[~positive].prod(1) / 1000.0
        self.scores.fp_volume_ml += (monitored[~positive].flatten(1).sum(1) * voxel_ml).tolist()
        if ich_logit is not None:
            self.scores.ich_scores += torch.sigmoid(ich_logit.detach().float().cpu()).tolist()
            self.scores.ich_labels += [int(v) for v in ich.detach().cpu().round().tolist()]

    def compute(self) -> dict[str, float]:
        s = self.scores
        monitored = s.dice[self.monitored_clicks]
        metrics = {"val/n_pos": float(len(monitored)), "val/n_neg": float(len(s.fp_volume_ml))}
        if monitored:
            metrics["val/dice"] = _mean(monitored)
            metrics.update({f"val/dice@{k}": _mean(s.dice[k]) for k in self.click_counts})
            if self.click_counts and self.scores_prompt_free:
                metrics["val/dice_auto"] = _mean(s.dice[0])
            metrics["val/hd95_mm"] = _mean(s.hd95_mm)
        if s.fp_volume_ml:
            metrics["val/fp_volume_ml"] = _mean(s.fp_volume_ml)
        if len(set(s.ich_labels)) == 2:
            metrics["val/auroc"] = float(compute_roc_auc(torch.tensor(s.ich_scores), torch.tensor(s.ich_labels)))
        return metrics

    def _hausdorff(self, pred: torch.Tensor, label: torch.Tensor, spacing: torch.Tensor) -> list[float]:
        diagonal = (torch.tensor(label.shape[2:], dtype=torch.float64) * spacing.double()).norm(dim=1)
        values = diagonal.clone()
        found = pred.flatten(1).any(1)
        if found.any():
            spacings = [tuple(float(v) for v in row) for row in spacing[found]]
            values[found] = self._hd95(pred[found], label[found], spacing=spacings).flatten().double()
        return values.tolist()


def prediction_after(logits: Sequence[torch.Tensor], clicks: int) -> torch.Tensor:
    """Binary B x 1 x D x H x W prediction (on CPU) after `clicks` rounds (0: the single prompt-free round)."""
    return torch.sigmoid(logits[max(clicks, 1) - 1].detach().float().cpu()) > 0.5


@dataclass
class ValidationResult:
    """Averaged metrics, one positive case for overlays (D x H x W arrays: CT, ground truth, prediction) and, with
    whole-scan validation, its rows (one per scan and mode, `ScanValidation.case_rows`)."""

    metrics: dict[str, float]
    example: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    cases: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def validate_crops(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    rounds: int,
    val_clicks: Sequence[int],
    prompt_mode: str,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    generator: torch.Generator,
    default_spacing: Sequence[float],
    batch_seed: Callable[[int], int] | None = None,
    gather: Callable[[CaseScores], CaseScores] | None = None,
) -> ValidationResult:
    """Run `model.segment` with `rounds` click rounds on every validation batch and average the metrics.

    `batch_seed(i)`: seeds `generator` before the i-th batch (else its stream runs on across batches).
    `gather`: combines the per-case scores with those of other processes (each holding a shard) before averaging.
    """
    model.eval()
    metrics = SegmentationMetrics(val_clicks=val_clicks, prompt_mode=prompt_mode)
    example = None
    for index, batch in enumerate(loader):
        if batch_seed is not None:
            generator.manual_seed(batch_seed(index))
        image = plain_tensor(batch["image"]).to(device, non_blocking=True)
        label = plain_tensor(batch["label"]).to(device, non_blocking=True)
        with autocast():
            output = model.segment(image, target=label, num_clicks=rounds, generator=generator,
                                   prompt_free=prompt_mode == "both")
        metrics.update(
            logits=output.logits,
            prompt_free=output.prompt_free,
            label=label,
            spacing=batch_spacing(batch["image"], default_spacing),
            ich=batch["ich"],
            ich_logit=output.ich_logit,
        )
        if example is None:
            example = _first_positive(image, label, prediction_after(output.logits, metrics.monitored_clicks))
    if gather is not None:
        metrics.scores = gather(metrics.scores)
    return ValidationResult(metrics.compute(), example)


def _first_positive(
    image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    for b in range(len(image)):
        if label[b].any():
            return image[b, 0].float().cpu().numpy(), label[b, 0].cpu().numpy() > 0.5, pred[b, 0].numpy()
    return None


def _mean(values: list[float]) -> float:
    return float(np.mean(values))
