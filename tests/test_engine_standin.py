"""The stand-in model of `helpers.standin` honours the model contract the engine relies on."""

from __future__ import annotations

import pytest
import torch
from helpers.standin import SIZE, TinySegmenter, make_cases


@pytest.mark.parametrize("num_clicks", [0, 1, 3])
def test_standin_segment_returns_one_full_res_logit_per_round(num_clicks: int) -> None:
    model = TinySegmenter()
    case = make_cases(2)
    image = torch.stack([c["image"] for c in case])
    label = torch.stack([c["label"] for c in case])
    out = model.segment(image, target=label, num_clicks=num_clicks, generator=torch.Generator().manual_seed(0))
    assert len(out.logits) == max(num_clicks, 1)
    assert all(lg.shape == (2, 1, SIZE, SIZE, SIZE) for lg in out.logits)
    assert out.ich_logit.shape == (2,)


def test_standin_batch_equals_its_halves() -> None:
    """No batch-dependent layers and per-sample click draws: what exact accumulation tests rely on."""
    model = TinySegmenter()
    case = make_cases(4)
    image = torch.stack([c["image"] for c in case])
    label = torch.stack([c["label"] for c in case])
    whole = model.segment(image, target=label, num_clicks=1, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    first = model.segment(image[:2], target=label[:2], num_clicks=1, generator=g)
    second = model.segment(image[2:], target=label[2:], num_clicks=1, generator=g)
    torch.testing.assert_close(whole.logits[0], torch.cat([first.logits[0], second.logits[0]]))
    torch.testing.assert_close(whole.ich_logit, torch.cat([first.ich_logit, second.ich_logit]))
