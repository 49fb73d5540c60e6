"""The refinement head: released weights still load strictly, an untrained head changes nothing, a trained one
learns detail finer than the decoder's 4-voxel grid, and predict/evaluate rebuild it from the run's config."""

from __future__ import annotations

from pathlib import Path

import torch

from samft.model import build_model, build_model_from_config, load_weights
from samft.model.build import SAM_PARTS


def test_released_weights_load_strictly_beside_the_head(tmp_path: Path) -> None:
    released = build_model(name="sam_med3d_tiny", visual_tokens=16)
    sam_only = {k: v for k, v in released.state_dict().items() if k.split(".")[0] in SAM_PARTS}
    torch.save({"model_state_dict": sam_only}, tmp_path / "released.pth")
    model = build_model(name="sam_med3d_tiny", visual_tokens=16, refine=True)
    load_weights(model, tmp_path / "released.pth", model_name="sam_med3d_tiny")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sam_only.items())
    assert any(k.startswith("refiner.") for k in state) and not any(k.startswith("refiner.") for k in sam_only)


def test_an_untrained_head_gives_the_official_output() -> None:
    torch.manual_seed(0)
    plain = build_model(name="sam_med3d_tiny", visual_tokens=16).eval()
    refined = build_model(name="sam_med3d_tiny", visual_tokens=16, refine=True).eval()
    refined.load_state_dict(plain.state_dict(), strict=False)
    image = torch.randn(1, 1, 128, 128, 128)
    with torch.no_grad():
        a = plain.segment(image, num_clicks=0).logits[0]
        b = refined.segment(image, num_clicks=0).logits[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_head_learns_detail_below_the_decoder_grid() -> None:
    """A 6-voxel cube (under two decoder cells) marked by bright image: with the decoder frozen, only the head
    can fit it; after training its Dice exceeds what the official upsampling of any fixed logits gives here."""
    torch.manual_seed(0)
    model = build_model(name="sam_med3d_tiny", visual_tokens=16, refine=True)
    for name in SAM_PARTS:
        getattr(model, name).requires_grad_(False)
    image = torch.zeros(1, 1, 128, 128, 128)
    target = torch.zeros_like(image)
    image[..., 60:66, 61:67, 62:68] = 1.0
    target[..., 60:66, 61:67, 62:68] = 1.0
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(50.0))
    for _ in range(25):
        loss = loss_fn(model.segment(image, num_clicks=0).logits[0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = (model.segment(image, num_clicks=0).logits[0] > 0).float()
    dice = float(2 * (pred * target).sum() / (pred.sum() + target.sum()))
    assert dice > 0.5, dice


def test_the_run_config_rebuilds_the_head() -> None:
    config = {"name": "sam_med3d_tiny", "visual_tokens": 16, "refine": True, "checkpoint": "/nowhere.pth"}
    model = build_model_from_config(config, with_checkpoint=False)
    assert model.refiner is not None
    assert build_model_from_config({**config, "refine": False}, with_checkpoint=False).refiner is None
