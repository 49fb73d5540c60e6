"""Post-processing decided on the validation split: each candidate's Dice as removing the small components would
give it, the choice rule, and a run's choice taken from its best validation, not from a later one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.standin import make_trainer, settings

from samft import postprocess
from samft.postprocess import CANDIDATES_ML, choose, dice_by_min_component, remove_small_components

AFFINE = np.diag([0.5, 0.5, 5.0, 1.0])  # 1.25 microlitres per voxel: 16 voxels = 0.02 ml


def reference_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


@pytest.mark.parametrize("seed", range(4))
def test_each_candidate_scores_as_removing_its_small_components_then_scoring(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = np.zeros((60, 60, 12), dtype=np.uint8)
    truth = np.zeros_like(pred)
    for size in rng.integers(1, 12, size=12):  # blobs from 1 voxel to ~1700 (2 ml)
        x, y, z = rng.integers(0, 48, size=2).tolist() + [int(rng.integers(0, 10))]
        pred[x:x + size, y:y + size, z:z + max(1, size // 4)] = 1
    truth[10:30, 10:30, 3:8] = 1
    pred[12:28, 12:28, 4:7] = 1  # 768 voxels (0.96 ml) on the lesion: kept up to the 0.5 ml candidate
    scores = dice_by_min_component(pred, truth, AFFINE)
    assert list(scores) == [str(c) for c in CANDIDATES_ML]
    for candidate in CANDIDATES_ML:
        kept = remove_small_components(pred, AFFINE, min_ml=candidate)
        assert scores[str(candidate)] == pytest.approx(reference_dice(kept, truth), abs=1e-12), candidate
    assert len(set(scores.values())) > 1  # the blobs straddle the candidates, so the check has teeth


def test_empty_prediction_and_truth_score_one_and_a_lone_speck_is_removed() -> None:
    empty = np.zeros((8, 8, 4), dtype=np.uint8)
    assert set(dice_by_min_component(empty, empty, AFFINE).values()) == {1.0}
    speck = empty.copy()
    speck[2, 2, 2] = 1  # 0.00125 ml: a false alarm kept only without post-processing
    scores = dice_by_min_component(speck, empty, AFFINE)
    assert scores["0.0"] == 0.0 and all(scores[str(c)] == 1.0 for c in CANDIDATES_ML[1:])


def test_a_component_holding_a_positive_click_is_kept_whatever_its_size() -> None:
    pred = np.zeros((20, 20, 6), dtype=np.uint8)
    pred[2:4, 2:4, 1] = 1  # 4 voxels, 0.005 ml
    pred[10:12, 10:12, 3] = 1
    pred[15:20, 15:20, 2:6] = 1  # 100 voxels, 0.125 ml
    assert remove_small_components(pred, AFFINE, min_ml=0.1).sum() == 100
    kept = remove_small_components(pred, AFFINE, min_ml=0.1, keep_at=[(11, 10, 3), (0, 0, 0)])  # (0, 0, 0): unmarked
    assert kept[10:12, 10:12, 3].all() and kept.sum() == 104


def test_choose_takes_the_smallest_best_volume_and_none_unless_it_helps() -> None:
    decision = choose({0.0: [0.5, 0.5], 0.1: [0.5, 0.9], 0.5: [0.5, 0.9], 1.0: [0.1, 0.9]})
    assert decision["min_component_ml"] == 0.1 and decision["n_scans"] == 2
    assert decision["mean_dice_by_min_component_ml"] == {"0.0": 0.5, "0.1": 0.7, "0.5": 0.7, "1.0": 0.5}
    assert choose({0.0: [0.8], 0.1: [0.8], 1.0: [0.2]})["min_component_ml"] == 0.0  # a tie keeps none


class ScriptedScans:
    """Whole-scan validation whose rows are scripted per call: validation k scores Dice `dices[k]` and its
    candidate 0.1 ml wins only at validation `winner`."""

    monitored_mode = "auto"

    def __init__(self, dices: list[float], winner: int) -> None:
        self.dices, self.winner, self.calls = dices, winner, 0

    def case_rows(self, model: Any, **kwargs: Any) -> list[dict[str, Any]]:
        k, self.calls = self.calls, self.calls + 1
        by_min = {str(c): self.dices[k] for c in CANDIDATES_ML}
        if k == self.winner:
            by_min["0.1"] = 1.0
        return [{"case_id": "a", "mode": "auto", "dice": self.dices[k], "dice_by_min_ml": by_min}]

    def metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {"val/dice": rows[0]["dice"]}


def test_a_run_keeps_the_rows_of_its_best_validation_and_decides_from_them(tmp_path: Path) -> None:
    from samft.runner import _decide_postprocessing

    scans = ScriptedScans(dices=[0.4, 0.6, 0.5], winner=1)  # the best (epoch 2) is not the last validation
    trainer = make_trainer(tmp_path, train_settings=settings(epochs=3, monitor="val/dice"), scan_validation=scans)
    trainer.fit()
    best = torch.load(tmp_path / "best_model.pth", weights_only=True)
    assert best["best_epoch"] == 2 and best["best_cases"][0]["dice"] == 0.6
    latest = torch.load(tmp_path / "latest_model.pth", weights_only=True)
    assert latest["best_cases"] == best["best_cases"]  # a resumed run still knows its best validation
    _decide_postprocessing(best["best_cases"], monitored_mode="auto", run_dir=tmp_path)
    decision = json.loads((tmp_path / postprocess.FILE).read_text())
    assert decision["min_component_ml"] == 0.1 and decision["n_scans"] == 1
    assert postprocess.load_min_component_ml(tmp_path) == 0.1
