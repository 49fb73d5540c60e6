"""Behaviour of the model: exact fast attention, gradient checkpointing, freezing, clicks, segment, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samft.model import build_model, correction_click, first_click, prompts, sample_voxels
from samft.model.attention import GridSelfAttention

S = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(name="sam_med3d_tiny", visual_tokens=32).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 1, S, S, S, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def features(model, image):
    with torch.no_grad():
        return model.encode(image)


def box_target(batch: int, boxes: list[tuple[slice, slice, slice] | None], size: int = S) -> torch.Tensor:
    target = torch.zeros(batch, 1, size, size, size)
    for i, box in enumerate(boxes):
        if box is not None:
            target[(i, 0, *box)] = 1
    return target


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_real_query_window_attention_equals_naive_padded_attention():
    """Window 14 on an 8^3 grid: computing the 512 real query rows equals attending over the zero-padded
    14^3 grid with all 2744 rows (the same module run as global attention on it), outputs and gradients."""
    torch.manual_seed(0)
    attn = GridSelfAttention(48, 4, key_grid=14)
    with torch.no_grad():
        for table in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
            table.normal_(0, 0.3)
    x = torch.randn(1, 8, 8, 8, 48, requires_grad=True)
    weights = torch.randn(1, 8, 8, 8, 48)

    fast = attn(x)
    (fast * weights).sum().backward()
    fast_grads, fast_x_grad = grads_of(attn), x.grad.clone()
    attn.zero_grad()
    x.grad = None

    naive = attn(F.pad(x, (0, 0, 0, 6, 0, 6, 0, 6)))[:, :8, :8, :8]
    (naive * weights).sum().backward()

    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_x_grad, x.grad, atol=1e-5, rtol=1e-5)
    naive_grads = grads_of(attn)
    assert fast_grads.keys() == naive_grads.keys() == {n for n, _ in attn.named_parameters()}
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-4, rtol=1e-5, msg=name)


def test_gradient_checkpointing_same_outputs_and_gradients_less_saved_memory(image):
    torch.manual_seed(0)
    plain = build_model(name="sam_med3d_tiny", visual_tokens=32).image_encoder
    checkpointed = build_model(name="sam_med3d_tiny", visual_tokens=32, gradient_checkpointing=True).image_encoder
    checkpointed.load_state_dict(plain.state_dict())
    weights = torch.randn(1, 48, 8, 8, 8)

    results = []
    for encoder in (plain, checkpointed):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            features = encoder(image[:1])
        (features * weights).sum().backward()
        results.append((features, grads_of(encoder), sum(saved)))

    (out_a, grads_a, saved_a), (out_b, grads_b, saved_b) = results
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() == {n for n, _ in plain.named_parameters()}
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
    assert saved_b < 0.5 * saved_a


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval(image):
    model = build_model(name="sam_med3d_tiny", visual_tokens=32, freeze_encoder=True)
    model.train()
    assert not model.image_encoder.training
    assert all(not m.training for m in model.image_encoder.modules())
    assert model.mask_decoder.training and model.ich_head.training
    target = box_target(2, [(slice(10, 30),) * 3, (slice(70, 90),) * 3])
    out = model.segment(image, target=target, num_clicks=1, generator=torch.Generator().manual_seed(0))
    assert not out.features.requires_grad
    (out.logits[0].mean() + out.ich_logit.sum()).backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert model.mask_decoder.output_upscaling[0].weight.grad is not None
    assert model.representation_head.proj[0].weight.grad is not None


def test_sample_voxels_uniform_inside_region_and_reproducible():
    region = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    cells = [(0, 0, 0), (1, 2, 3), (5, 5, 5), (4, 0, 2)]
    for cell in cells:
        region[(0, 0, *cell)] = True
    gen = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(cells, 0)
    for _ in range(2000):
        coords, found = sample_voxels(region, generator=gen)
        assert found.item()
        counts[tuple(int(c) for c in coords[0])] += 1  # KeyError if a click fell outside the region
    assert all(400 < n < 600 for n in counts.values()), counts

    empty = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    empty[1, 0, 3, 2, 1] = True
    coords, found = sample_voxels(empty)
    assert found.tolist() == [False, True] and coords[1].tolist() == [3.0, 2.0, 1.0]
    a = sample_voxels(region.expand(3, -1, -1, -1, -1), generator=torch.Generator().manual_seed(7))[0]
    b = sample_voxels(region.expand(3, -1, -1, -1, -1), generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["_ranked_by_nonzero", "_ranked_by_cumsum"])  # the CPU's and the GPU's
def test_sample_voxels_draws_the_ranked_voxel_in_raster_order(path: str, monkeypatch: pytest.MonkeyPatch):
    """The voxel of rank floor(u * count) in raster order, u the generator's one float64 per sample: the draw that
    runs trained before the nonzero-based sampler made, so their clicks and boxes replay exactly."""
    monkeypatch.setattr(prompts, "_ranked_by_nonzero", getattr(prompts, path))  # a CPU tensor takes this one
    gen = torch.Generator().manual_seed(3)
    region = torch.rand(3, 1, 9, 7, 5, generator=gen) < 0.1
    region[1] = False
    coords, found = sample_voxels(region, generator=torch.Generator().manual_seed(11))
    u = torch.rand(3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for b in range(3):
        raster = np.argwhere(region[b, 0].numpy())  # rows in raster (C) order
        assert found[b].item() == (len(raster) > 0)
        expected = raster[int(u[b] * len(raster))] if len(raster) else [0, 0, 0]
        assert coords[b].tolist() == [float(c) for c in expected]


def test_first_click_positive_inside_target_and_none_for_empty():
    target = box_target(3, [(slice(10, 14), slice(20, 22), slice(5, 9)), None, (slice(40, 41),) * 3], size=64)
    coords, labels = first_click(target, generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == [1, -1, 1]
    assert target[(0, 0, *coords[0].long())] == 1 and coords[2].tolist() == [40.0, 40.0, 40.0]


def test_correction_click_signs_and_regions():
    target = box_target(3, [(slice(10, 20),) * 3, None, (slice(30, 40),) * 3], size=64)
    logits = torch.full_like(target, -5.0)
    logits[0, 0, 10:20, 10:20, 10:15] = 5.0  # sample 0: half found, the rest missed -> positive click
    logits[1, 0, 60:62, 60:62, 60:62] = 5.0  # sample 1: empty target, a false alarm -> negative click
    logits[2] = torch.where(target[2] > 0, 5.0, -5.0)  # sample 2: exact -> no click
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        coords, labels = correction_click(logits, target, generator=gen)
        assert labels.tolist() == [1, 0, -1]
        d, h, w = coords[0].long().tolist()
        assert 10 <= d < 20 and 10 <= h < 20 and 15 <= w < 20  # inside the missed part
        assert all(60 <= c < 62 for c in coords[1].long().tolist())  # inside the false alarm


def test_segment_rounds_follow_the_click_protocol(model, image):
    """segment == clicks drawn by hand with the same generator, decoded with the previous low-res logits."""
    target = box_target(1, [(slice(40, 60), slice(50, 70), slice(60, 80))])
    with torch.no_grad():
        out = model.segment(image[:1], target=target, num_clicks=3, generator=torch.Generator().manual_seed(5))
        assert len(out.logits) == 3 and all(x.shape == (1, 1, S, S, S) for x in out.logits)
        assert out.ich_logit.shape == (1,) and out.features.shape == (1, 48, 8, 8, 8)

        gen = torch.Generator().manual_seed(5)
        coords, labels = first_click(target, generator=gen)
        coords, labels = coords[:, None], labels[:, None]
        mask_prompt, expected = None, []
        for round_index in range(3):
            if round_index:
                new_coords, new_labels = correction_click(expected[-1], target, generator=gen)
                assert (new_labels >= 0).all()
                coords = torch.cat([coords, new_coords[:, None]], dim=1)
                labels = torch.cat([labels, new_labels[:, None]], dim=1)
            # features of the one-image batch, as segment computes them (a batch of two rounds differently, and
            # a click drawn from a near-zero error region follows the last bit)
            low = model.decode(model.encode(image[:1]), points=(coords, labels), mask_prompt=mask_prompt)
            expected.append(F.interpolate(low, size=(S, S, S), mode="trilinear", align_corners=False))
            mask_prompt = low
    for got, want in zip(out.logits, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_empty_target_rounds_run_prompt_free_and_train(model, image, features):
    target = box_target(2, [(slice(40, 60),) * 3, None])
    with torch.no_grad():
        out = model.segment(image, target=target, num_clicks=1, generator=torch.Generator().manual_seed(0))
        free = model.decode(features[1:])  # no points, no mask prompt
        coords, labels = first_click(target[:1], generator=torch.Generator().manual_seed(0))
        clicked = model.decode(features[:1], points=(coords[:, None], labels[:, None]))
    up = lambda low: F.interpolate(low, size=(S, S, S), mode="trilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(out.logits[0][1:], up(free), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits[0][:1], up(model.decode(features[:1])), atol=1e-3)
    torch.testing.assert_close(out.logits[0][:1], up(clicked), atol=1e-5, rtol=1e-5)

    model.zero_grad()
    all_empty = torch.zeros_like(target[:1])
    out = model.segment(image[:1], target=all_empty, num_clicks=2, generator=torch.Generator().manual_seed(0))
    F.binary_cross_entropy_with_logits(out.logits[-1], all_empty).backward()
    grad = model.mask_decoder.output_upscaling[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_auto_mode_is_one_prompt_free_round(model, image, features):
    with torch.no_grad():
        out = model.segment(image, num_clicks=0)
        expected = F.interpolate(model.decode(features), size=(S, S, S), mode="trilinear")
    assert len(out.logits) == 1
    torch.testing.assert_close(out.logits[0], expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        called = model(image, num_clicks=0)  # what a DistributedDataParallel wrapper calls
    assert torch.equal(called.logits[0], out.logits[0]) and torch.equal(called.ich_logit, out.ich_logit)


def test_both_mode_adds_the_prompt_free_decode_of_the_same_features(model, image, features):
    target = torch.zeros_like(image)
    target[..., 4:9, 4:9, 4:9] = 1
    with torch.no_grad():
        clicks = model.segment(image, target=target, num_clicks=2, generator=torch.Generator().manual_seed(3))
        both = model.segment(image, target=target, num_clicks=2, generator=torch.Generator().manual_seed(3),
                             prompt_free=True)
        auto = model.segment(image, num_clicks=0)
    assert clicks.prompt_free is None and auto.prompt_free is None
    assert all(torch.equal(a, b) for a, b in zip(both.logits, clicks.logits, strict=True))
    torch.testing.assert_close(both.prompt_free, auto.logits[0], atol=1e-6, rtol=1e-6)


def test_heads_shapes_follow_the_encoder(model, features):
    with torch.no_grad():
        assert model.visual_tokens(features).shape == (2, 512, 32)
        assert model.ich_logit(features).shape == (2,)
    assert model.representation_head.proj[0].in_features == model.image_encoder.out_chans == 48


@pytest.mark.parametrize("shape", [(2, S, S, S), (2, 2, S, S, S), (2, 1, 64, 64, 64), (2, 1, S, S, 96)])
def test_wrong_image_shape_says_what_is_expected(model, shape):
    with pytest.raises(ValueError, match=r"expected image B x 1 x 128 x 128 x 128, got"):
        model.encode(torch.zeros(shape))


def test_wrong_prompt_shapes_say_what_is_expected(model, image):
    features = torch.zeros(2, 48, 8, 8, 8)
    with pytest.raises(ValueError, match=r"expected features B x 48 x 8 x 8 x 8"):
        model.decode(torch.zeros(2, 384, 8, 8, 8))
    with pytest.raises(ValueError, match=r"expected point coords 2 x N x 3 and labels 2 x N"):
        model.decode(features, points=(torch.zeros(2, 1, 2), torch.zeros(2, 1)))
    with pytest.raises(ValueError, match=r"expected mask_prompt 2 x 1 x 32 x 32 x 32"):
        model.decode(features, mask_prompt=torch.zeros(2, 1, 128, 128, 128))
    with pytest.raises(ValueError, match="num_clicks > 0 needs target"):
        model.segment(image, num_clicks=1)
    with pytest.raises(ValueError, match="num_clicks must be >= 0"):
        model.segment(image, num_clicks=-1)
