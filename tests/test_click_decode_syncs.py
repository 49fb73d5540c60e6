"""The click rounds read the host once per round: `_decode_clicks` groups the samples by click count on the device
after one read of the counts (it used `unique().tolist()`, a `nonzero()` and a boolean mask per group), and the
click simulation (samft.model.prompts) reads nothing. Outputs are bitwise those of the grouping it replaced."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from samft.model import build_model, prompts
from samft.model.prompts import NO_CLICK

SAMFT = Path(__import__("samft").__file__).parent
TORCH = str(Path(torch.__file__).parent)
S = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(name="sam_med3d_tiny", visual_tokens=32).eval()


def old_decode_clicks(model, features, coords, labels, mask_prompt):
    """`SamMed3D._decode_clicks` before the change (commit f291181), the reference for equality."""
    clicked = labels != NO_CLICK
    counts = clicked.sum(dim=1)
    groups = counts.unique().tolist()
    low = 4 * model.prompt_encoder.grid_size
    out = None if len(groups) == 1 else features.new_empty(features.shape[0], 1, low, low, low)
    for count in groups:
        rows = (counts == count).nonzero().squeeze(1)
        keep = clicked[rows]
        points = None
        if count > 0:
            points = (coords[rows][keep].view(len(rows), count, 3), labels[rows][keep].view(len(rows), count))
        prompt = None if mask_prompt is None else mask_prompt[rows]
        low_res = model.decode(features[rows], points=points, mask_prompt=prompt)
        if out is None:
            return low_res
        out = out.index_put((rows,), low_res)
    return out


class _BoolMaskIndexing(TorchFunctionMode):
    """Counts indexing with a boolean mask (a data-dependent shape) from samft's own code.

    A mode, not a patched `torch.Tensor.__getitem__`: assigning `__getitem__` on the class gives it a sequence
    slot that deleting the attribute does not take back, and from then on `torch.as_tensor` treats every tensor
    as a sequence (MONAI's transforms fail with "len() of a 0-d tensor" in later tests).
    """

    def __init__(self, counting: dict[str, Any]) -> None:
        super().__init__()
        self.counting = counting

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts) and _caller_is_samft():
                self.counting["n"] += 1
                self.counting["where"].append("bool mask")
        return func(*args, **(kwargs or {}))


def _caller_is_samft() -> bool:
    """Whether the first frame outside torch and this file is samft's."""
    frame = sys._getframe(2)
    while frame is not None and (TORCH in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame is not None and str(SAMFT) in frame.f_code.co_filename


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Counts the reads samft's own code makes that wait for the device: a value read (`item`, `tolist`, ...),
    a data-dependent shape (`nonzero`, `unique`, indexing with a boolean mask)."""
    counting: dict[str, Any] = {"n": 0, "where": []}

    def ours() -> bool:
        return f"{SAMFT}" in sys._getframe(2).f_code.co_filename

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero", "unique"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if ours():
                counting["n"] += 1
                counting["where"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("nonzero", "unique", "masked_select"):
        original = getattr(torch, name)

        def counted_fn(*args, _original=original, _name=name, **kwargs):
            if ours():
                counting["n"] += 1
                counting["where"].append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted_fn)
    with _BoolMaskIndexing(counting):
        yield counting


def _inputs(labels: list[list[int]], *, seed: int, mask: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    batch, width = len(labels), len(labels[0])
    features = torch.randn(batch, 48, 8, 8, 8, generator=g)
    coords = torch.rand(batch, width, 3, generator=g) * S
    prompt = torch.randn(batch, 1, 32, 32, 32, generator=g) if mask else None
    return features, coords, torch.tensor(labels, dtype=torch.long), prompt


@pytest.mark.parametrize("labels", [
    [[1, 0, 1], [1, 1, 0]],  # every click real: one group
    [[-1, -1], [-1, -1]],  # no click anywhere: one prompt-free group
    [[1, -1, 0], [-1, -1, -1], [1, 0, 1], [-1, 1, -1]],  # counts 2, 0, 3, 1: NO_CLICK between real clicks
    [[-1, 1], [1, -1], [1, 1]],  # equal counts, clicks at different positions
])
@pytest.mark.parametrize("mask", [False, True])
def test_decode_clicks_equals_the_grouping_it_replaced(model, labels: list[list[int]], mask: bool) -> None:
    features, coords, labels_t, prompt = _inputs(labels, seed=len(labels) + mask, mask=mask)
    with torch.no_grad():
        new = model._decode_clicks(features, coords, labels_t, prompt)
        old = old_decode_clicks(model, features, coords, labels_t, prompt)
    assert new.shape == old.shape == (len(labels), 1, 32, 32, 32)
    assert torch.equal(new, old)


def test_click_rounds_read_the_host_once_per_round_and_match_the_old_grouping(
    model, host_reads: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the click draw as a GPU makes it (a CPU reads the host there, where nothing waits on a device)
    monkeypatch.setattr(prompts, "_ranked_by_nonzero", prompts._ranked_by_cumsum)
    image = torch.randn(3, 1, S, S, S, generator=torch.Generator().manual_seed(2))
    target = torch.zeros_like(image)
    target[0, 0, 40:60, 50:70, 60:80] = 1  # a lesion, no lesion, a one-voxel lesion (exact after a round or not)
    target[2, 0, 64, 64, 64] = 1
    with torch.no_grad():
        new = model.segment(image, target=target, num_clicks=3, generator=torch.Generator().manual_seed(7))
        reads, where = host_reads["n"], list(host_reads["where"])
        monkeypatch.setattr(type(model), "_decode_clicks", old_decode_clicks)
        old = model.segment(image, target=target, num_clicks=3, generator=torch.Generator().manual_seed(7))
    assert reads == 3 and where == ["tolist"] * 3, where  # one read of the click counts per round
    assert all(torch.equal(a, b) for a, b in zip(new.logits, old.logits, strict=True))
