"""Whole-scan validation: the scans go through `samft.segmentation` exactly as `samft.predict` sends them, and
are scored on their own grid with `samft.scoring`, as `samft.evaluate` scores them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose

from samft.data.datamodule import evenly_spaced
from samft.data.readers import read_volume
from samft.postprocess import dice_by_min_component
from samft.scoring import SIZE_BANDS_ML, case_metrics, interior_click, summarize
from samft.segmentation import clicks_to_grid, scan_logits, sw_batch_size_for, to_scan_grid

BAND_KEYS = {"under 1 ml": "under_1ml", "1-10 ml": "1_10ml", "over 10 ml": "over_10ml"}


@dataclass
class ScanValidation:
    """`limit` validation scans (None: all) evenly spaced over the list (so positives and negatives both count),
    segmented whole and scored on the scan's grid.

    scans: the ``val`` stage dataset (whole preprocessed volumes, `image` MetaTensor 1 x X x Y x Z with its applied
    operations); transform: that stage's pipeline (inverted to map predictions back); records: the scans' records
    (their `label` paths give the true masks on the scan's grid). Modes: `auto` (prompt-free sliding windows) when
    the model was trained prompt-free (prompt_mode auto or both), `click` (one reader click at the lesion's
    innermost voxel, as `samft.evaluate click_from_label=true`) when it takes clicks (click or both).
    The scans are segmented under the Trainer's autocast (the run's precision), `sw_batch_size` windows per
    forward pass (None: 4 on CUDA, 1 on a CPU, as `samft.predict`).
    """

    scans: Dataset
    transform: Compose
    records: Sequence[dict[str, Any]]
    roi_size: Sequence[int]
    overlap: float
    air: float
    prompt_mode: str
    limit: int | None = None
    threshold: float = 0.5
    sw_batch_size: int | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return {"auto": ("auto",), "click": ("click",), "both": ("auto", "click")}[self.prompt_mode]

    @property
    def monitored_mode(self) -> str:
        """The mode whose Dice is `val/dice` (prompt-free whenever the model learns it)."""
        return self.modes[0]

    def indices(self) -> list[int]:
        """The validated scans: all, or `limit` of them evenly spaced over the list (the training loader's
        validation crops are of the same scans)."""
        return evenly_spaced(len(self.scans), self.limit)

    def case_rows(
        self, model: torch.nn.Module, *, device: torch.device, autocast: Callable[[], AbstractContextManager[Any]],
        rank: int = 0, world_size: int = 1,
    ) -> list[dict[str, Any]]:
        """Scores of this rank's scans (every world_size-th, from `rank`): one row per scan and mode. Rows of the
        monitored mode also hold `dice_by_min_ml`: the Dice after removing predicted components under each
        candidate volume (`samft.postprocess.CANDIDATES_ML`, keyed by `str(ml)`), from which the run chooses its
        post-processing."""
        rows = []
        sw_batch_size = sw_batch_size_for(self.sw_batch_size, device=device)
        model.eval()
        for index in self.indices()[rank::world_size]:
            sample = self.scans[index]
            record = self.records[index]
            image = sample["image"]
            truth = _truth(record, shape=image.meta["spatial_shape"])
            truth_on_device = torch.from_numpy(truth).to(device)  # scored where the logits are (case_metrics)
            volume = image.as_tensor()[None].to(device)
            affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
            for mode in self.modes:
                clicks = None
                if mode == "click":
                    click = interior_click(truth, affine)
                    if click is None:
                        continue  # a scan without a lesion has nothing to click: the auto mode scores it
                    clicks = clicks_to_grid([click], image)
                with autocast():
                    logits = scan_logits(model, volume, roi_size=self.roi_size, overlap=self.overlap, air=self.air,
                                         sw_batch_size=sw_batch_size, clicks=clicks,
                                         prompt_mode=self.prompt_mode)
                probabilities = to_scan_grid(torch.sigmoid(logits[0].float()), image, self.transform)
                pred = probabilities > self.threshold
                row = {"case_id": record.get("case_id", str(index)), "mode": mode,
                       **case_metrics(torch.from_numpy(pred).to(device), truth_on_device, affine, hd95=False)}
                if mode == self.monitored_mode:
                    row["dice_by_min_ml"] = dice_by_min_component(pred, truth, affine)
                rows.append(row)
        return rows

    def metrics(self, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        """`val/dice` (mean Dice on positive scans in the monitored mode), `val/dice_auto` and `val/dice@1` (each
        mode), `val/sensitivity`, `val/specificity`, `val/fp_volume_ml_median` (on negatives) and
        `val/dice_<band>` per true lesion-size band, all of the monitored mode."""
        out: dict[str, float] = {}
        for mode in self.modes:
            summary = summarize([r for r in rows if r["mode"] == mode])
            if summary["dice_positive_mean"] is not None:
                out["val/dice_auto" if mode == "auto" else "val/dice@1"] = summary["dice_positive_mean"]
            if mode != self.monitored_mode:
                continue
            if summary["dice_positive_mean"] is not None:
                out["val/dice"] = summary["dice_positive_mean"]
            for key in ("sensitivity", "specificity", "fp_volume_ml_median"):
                if summary[key] is not None:
                    out[f"val/{key}"] = summary[key]
            for name, _, _ in SIZE_BANDS_ML:
                band = summary["by_size"][name]["dice_positive_mean"]
                if band is not None:
                    out[f"val/dice_{BAND_KEYS[name]}"] = band
        return out


def _truth(record: dict[str, Any], *, shape: Sequence[int]) -> np.ndarray:
    """The true mask on the scan's own grid (all zeros for a record without a mask)."""
    label = record.get("label")
    if label is None:
        return np.zeros(tuple(int(s) for s in shape), dtype=bool)
    return read_volume(label).array > 0
