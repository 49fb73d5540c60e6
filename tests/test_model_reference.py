"""Our SAM-Med3D against an independent implementation (PyPI `medim`), with identical random weights.

medim computes the windowed blocks the naive way (the whole zero-padded 14^3 window, every query row),
so matching its outputs and gradients also checks our real-query-only attention.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import medim
import pytest
import torch
from helpers.patience import patience

from samft.model import REGISTRY, build_model, build_sam

# A reduced configuration both implementations can build: narrow and shallow encoder, but the released
# geometry (128^3 input, 8^3 tokens, window 14) and medim's fixed decoder sizes (8 heads, MLP 2048, IoU 256).
REDUCED = dataclasses.replace(
    REGISTRY["sam_med3d"], encoder_dim=96, encoder_depth=4, encoder_heads=4, global_attn_indexes=(1, 3),
    prompt_dim=48,
)
MEDIM_REDUCED = dict(encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4,
                     encoder_global_attn_indexes=[1, 3], prompt_embed_dim=48)


def randomise_(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for the tensors PyTorch's default init leaves constant (zero position tables, unit
    norms) so that no part of the computation hides behind a zero; returns the resulting state dict."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        with torch.no_grad():
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(0.2 * noise)
            elif param.ndim == 1 and "norm" in type(model.get_submodule(name.rsplit(".", 1)[0])).__name__.lower():
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    return model.state_dict()


def make_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    reference = medim.create_model("SAM-Med3D", pretrained=False, **MEDIM_REDUCED)
    ours = build_sam(REDUCED)
    state = randomise_(reference, seed)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.startswith(("representation_head.", "ich_head.")) for k in missing)
    return reference, ours


def prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 128, (batch, 3, 3), generator=gen).float()
    labels = torch.tensor([[1, 0, -1], [1, 1, 0]])[:batch]
    mask = torch.randn(batch, 1, 32, 32, 32, generator=gen)
    return coords, labels, mask


def reference_decode(reference, embedding, points, mask, *, multimask: bool = False):
    sparse, dense = reference.prompt_encoder(points=points, boxes=None, masks=mask)
    return reference.mask_decoder(image_embeddings=embedding, image_pe=reference.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 100 * atol  # not a comparison of two near-zero tensors
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))


def test_reduced_embeddings_and_logits_match(pair, image):
    reference, ours = pair
    coords, labels, mask = prompts(2, seed=2)
    with torch.no_grad():
        ref_embedding = reference.image_encoder(image)
        ref_logits, ref_iou = reference_decode(reference, ref_embedding, (coords, labels), mask)
        ref_free, _ = reference_decode(reference, ref_embedding, None, None)
        ref_multi, ref_multi_iou = reference_decode(reference, ref_embedding, (coords, labels), mask, multimask=True)

        embedding = ours.encode(image)
        logits = ours.decode(embedding, points=(coords, labels), mask_prompt=mask)
        free = ours.decode(embedding)
        sparse, dense = ours.prompt_encoder(batch_size=2, points=(coords, labels), mask_prompt=mask)
        multi, multi_iou = ours.mask_decoder(image_embeddings=embedding, image_pe=ours.prompt_encoder.dense_pe(),
                                             sparse=sparse, dense=dense, multimask_output=True)
        _, iou = ours.mask_decoder(image_embeddings=embedding, image_pe=ours.prompt_encoder.dense_pe(),
                                   sparse=sparse, dense=dense)

    assert_close(embedding, ref_embedding)
    assert logits.shape == (2, 1, 32, 32, 32)
    assert_close(logits, ref_logits)
    assert_close(free, ref_free)
    assert_close(multi, ref_multi)
    assert_close(iou, ref_iou)
    assert_close(multi_iou, ref_multi_iou)


def test_reduced_dense_pe_and_point_embeddings_match(pair):
    """The two quirks: swapped first axes of the dense PE grid, and an appended not-a-point token."""
    reference, ours = pair
    coords, labels, _ = prompts(2, seed=3)
    torch.testing.assert_close(ours.prompt_encoder.dense_pe(), reference.prompt_encoder.get_dense_pe(),
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        ref_sparse, _ = reference.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        sparse, _ = ours.prompt_encoder(batch_size=2, points=(coords, labels), mask_prompt=None)
    assert sparse.shape == (2, 4, 48)
    torch.testing.assert_close(sparse, ref_sparse, atol=1e-5, rtol=0)
    # The grid's encoding at (i, j, k) is a point prompt's encoding at (j, i, k): the swapped axes.
    point = ours.prompt_encoder.pe_layer((torch.tensor([[2.0, 5.0, 7.0]]) + 0.5) / 8)
    torch.testing.assert_close(ours.prompt_encoder.dense_pe()[0, :, 5, 2, 7], point[0], atol=1e-5, rtol=0)


def test_reduced_gradients_match(pair, image):
    """Backward through the real-query-only windowed attention equals backward through the naive one."""
    reference, ours = pair
    coords, labels, mask = prompts(1, seed=4)
    ref_logits, _ = reference_decode(reference, reference.image_encoder(image[:1]), (coords, labels), mask)
    logits = ours.decode(ours.encode(image[:1]), points=(coords, labels), mask_prompt=mask)
    target = torch.sin(torch.arange(logits.numel(), dtype=torch.float32)).view(logits.shape)
    (ref_logits * target).sum().backward()
    (logits * target).sum().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    # Only mask token 0 is decoded: the other tokens' hypernetworks and the IoU head get zeros from medim.
    assert all(ref_grads[n].count_nonzero() == 0 for n in ref_grads.keys() - grads.keys())
    assert grads.keys() <= ref_grads.keys()
    assert "image_encoder.blocks.0.attn.rel_pos_d" in grads
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(grad / scale, ref_grads[name] / scale, atol=1e-4, rtol=0, msg=name)
    reference.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_full_size_matches_medim():
    torch.manual_seed(5)
    reference = medim.create_model("SAM-Med3D", pretrained=False)
    ours = build_model(name="sam_med3d")
    state = randomise_(reference, seed=5)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("representation_head.", "ich_head.")) for k in missing)
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(6))
    coords, labels, mask = prompts(1, seed=7)
    with torch.no_grad():
        ref_embedding = reference.image_encoder(image)
        ref_logits, _ = reference_decode(reference, ref_embedding, (coords, labels), mask)
        embedding = ours.encode(image)
        logits = ours.decode(embedding, points=(coords, labels), mask_prompt=mask)
    assert embedding.shape == (1, 384, 8, 8, 8)
    assert_close(embedding, ref_embedding)
    assert_close(logits, ref_logits)


@pytest.mark.slow
def test_benchmark_runs_tiny_at_equal_outputs():
    """The benchmark script end to end on the reduced size (it exits non-zero if outputs differ)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "model_vs_medim.py"
    result = subprocess.run([sys.executable, str(script), "--size", "tiny", "--repeats", "1"],
                            capture_output=True, text=True, timeout=patience(600), check=False)
    assert result.returncode == 0, result.stderr
    for words in ("equal outputs: max |diff|", "speed-up", "ratio", "commit", "machine"):
        assert words in result.stdout
    out = result.stdout
    assert re.search(r"speed-up +\d+\.\d+x", out) and re.search(r"ratio +\d+\.\d+x", out), out
