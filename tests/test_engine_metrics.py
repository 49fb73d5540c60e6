"""Validation metrics give the values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from samft.engine import SegmentationMetrics
from samft.engine.batches import batch_spacing

S = 12


def _logits(mask: torch.Tensor) -> torch.Tensor:
    """+10 inside the mask, -10 outside: sigmoid > 0.5 reproduces the mask."""
    return mask.float() * 20 - 10


def _cube(corner: tuple[int, int, int], size: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, S, S, S)
    x, y, z = corner
    mask[..., x : x + size, y : y + size, z : z + size] = 1
    return mask


def _update(metrics: SegmentationMetrics, rounds: list[torch.Tensor], label: torch.Tensor, **kw) -> None:
    kw.setdefault("spacing", torch.tensor([[1.0, 1.0, 1.0]] * len(label), dtype=torch.float64))
    kw.setdefault("ich", torch.ones(len(label)))
    kw.setdefault("ich_logit", None)
    metrics.update(logits=[_logits(r) for r in rounds], label=label, **kw)


def test_dice_after_each_click_count_and_the_monitored_value() -> None:
    label = _cube((2, 2, 2), 4)  # 64 voxels
    half = label.clone()
    half[..., 2:4, :, :] = 0  # 32 voxels, all inside the label
    metrics = SegmentationMetrics(val_clicks=(1, 3), prompt_mode="click")
    _update(metrics, [half, half, label], label)
    result = metrics.compute()
    assert result["val/dice@1"] == pytest.approx(2 * 32 / (64 + 32))
    assert result["val/dice@3"] == pytest.approx(1.0)
    assert result["val/dice"] == result["val/dice@1"]
    assert result["val/n_pos"] == 1 and result["val/n_neg"] == 0


def test_hd95_is_in_millimetres_and_an_empty_prediction_scores_the_diagonal() -> None:
    label = torch.zeros(2, 1, S, S, S)
    pred = torch.zeros(2, 1, S, S, S)
    label[0, 0, 2, 5, 5] = 1
    pred[0, 0, 5, 5, 5] = 1  # 3 voxels away along the first axis, spaced 2 mm
    label[1, 0, 4, 4, 4] = 1  # second case: nothing predicted
    spacing = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    metrics = SegmentationMetrics(val_clicks=(1,), prompt_mode="click")
    _update(metrics, [pred], label, spacing=spacing)
    assert metrics.scores.hd95_mm == pytest.approx([6.0, (3 * S**2) ** 0.5])


def test_false_positive_volume_on_negative_cases_in_millilitres() -> None:
    label = torch.zeros(2, 1, S, S, S)
    pred = torch.zeros(2, 1, S, S, S)
    pred[0, 0, 0, 0, :10] = 1  # 10 voxels of 1.5 mm cubed
    spacing = torch.full((2, 3), 1.5, dtype=torch.float64)
    metrics = SegmentationMetrics(val_clicks=(1,), prompt_mode="click")
    _update(metrics, [pred], label, spacing=spacing, ich=torch.zeros(2))
    result = metrics.compute()
    assert result["val/fp_volume_ml"] == pytest.approx((10 * 1.5**3 / 1000 + 0) / 2)
    assert "val/dice" not in result and result["val/n_neg"] == 2


def test_auroc_from_the_classifier_head_and_absent_with_one_class() -> None:
    metrics = SegmentationMetrics(val_clicks=(1,), prompt_mode="click")
    empty = torch.zeros(4, 1, S, S, S)
    scores = torch.logit(torch.tensor([0.1, 0.4, 0.35, 0.8]))
    _update(metrics, [empty], empty, ich=torch.tensor([0.0, 0.0, 1.0, 1.0]), ich_logit=scores)
    assert metrics.compute()["val/auroc"] == pytest.approx(0.75)
    one_class = SegmentationMetrics(val_clicks=(1,), prompt_mode="click")
    _update(one_class, [empty], empty, ich=torch.zeros(4), ich_logit=scores)
    assert "val/auroc" not in one_class.compute()


def test_auto_mode_reports_the_prompt_free_dice_only() -> None:
    label = _cube((1, 1, 1), 3)
    metrics = SegmentationMetrics(val_clicks=(1, 3, 5), prompt_mode="auto")
    _update(metrics, [label], label)
    result = metrics.compute()
    assert result["val/dice"] == pytest.approx(1.0)
    assert result["val/hd95_mm"] == pytest.approx(0.0)
    assert not [k for k in result if k.startswith("val/dice@")]


def test_both_mode_reports_click_dice_and_the_prompt_free_dice() -> None:
    label = _cube((2, 2, 2), 4)
    half = label.clone()
    half[..., 2:4, :, :] = 0
    metrics = SegmentationMetrics(val_clicks=(1,), prompt_mode="both")
    _update(metrics, [label], label, prompt_free=_logits(half))
    result = metrics.compute()
    assert result["val/dice"] == result["val/dice@1"] == pytest.approx(1.0)
    assert result["val/dice_auto"] == pytest.approx(2 * 32 / (64 + 32))


def test_spacing_comes_from_the_affine_or_the_default() -> None:
    image = MetaTensor(torch.zeros(2, 1, 4, 4, 4), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    assert batch_spacing(image, (1.0, 1.0, 1.0)).tolist() == [[2.0, 3.0, 4.0]] * 2
    assert batch_spacing(torch.zeros(1, 1, 4, 4, 4), (1.5, 1.5, 1.5)).tolist() == [[1.5, 1.5, 1.5]]
