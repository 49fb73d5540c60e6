"""PNG pictures of a run: training curves and CT / ground truth / prediction overlays (Agg, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Train loss, validation Dice/AUROC and learning rate per epoch, side by side."""
    figure = Figure(figsize=(15, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, metric_ax, lr_ax = figure.subplots(1, 3, gridspec_kw={"left": 0.05, "right": 0.98, "wspace": 0.25})
    _line(loss_ax, history, "train/loss")
    loss_ax.set(title="train loss", xlabel="epoch")
    scores = sorted({k for h in history for k in h if k.startswith(("val/dice", "val/auroc"))})
    for key in scores:
        _line(metric_ax, history, key)
    metric_ax.set(title="validation", xlabel="epoch", ylim=(0, 1))
    if scores:
        metric_ax.legend(fontsize=8)
    _line(lr_ax, history, "lr")
    lr_ax.set(title="learning rate", xlabel="epoch")
    if any(h.get("lr") for h in history):
        lr_ax.set_yscale("log")
    figure.savefig(path)


def save_overlay(
    image: np.ndarray, label: np.ndarray, pred: np.ndarray, path: Path, *, title: str = "",
    display_range: tuple[float, float] | None = None,
) -> None:
    """image, label, pred: D x H x W. Shows the slice along the last axis with the most ground truth, the image
    clipped to `display_range` (e.g. a brain window in HU; None: its own range)."""
    mask = label if label.any() else pred
    z = int(mask.sum(axis=(0, 1)).argmax()) if mask.any() else image.shape[2] // 2
    figure = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for ax, overlay, name, colour in zip(
        axes, (None, label, pred), ("CT", "ground truth", "prediction"), (None, "Greens", "Reds")
    ):
        low, high = display_range or (None, None)
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=low, vmax=high)
        if overlay is not None:
            plane = overlay[:, :, z].T.astype(bool)
            ax.imshow(np.ma.masked_where(~plane, plane), cmap=colour, alpha=0.6, origin="lower", vmin=0, vmax=1)
        ax.set(title=f"{name} (slice {z})")
        ax.axis("off")
    figure.suptitle(title)
    figure.savefig(path)


def _line(ax: Any, history: list[dict[str, Any]], key: str) -> None:
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    if points:
        ax.plot(*zip(*points), marker="o", markersize=3, label=key)
