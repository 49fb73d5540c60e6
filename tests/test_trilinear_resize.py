"""`trilinear_resize` is F.interpolate's trilinear interpolation (align_corners=False), values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samft.model.layers import trilinear_resize


@pytest.mark.parametrize(("shape", "size"), [
    ((2, 1, 8, 8, 8), (32, 32, 32)),      # the decoder's x4 upsampling
    ((1, 3, 16, 16, 16), (32, 32, 32)),   # x2, several channels
    ((1, 1, 5, 7, 3), (13, 8, 11)),       # odd, unequal factors per axis
    ((2, 2, 12, 9, 10), (5, 9, 4)),       # downsampling and an unchanged axis
])
def test_values_and_gradients_equal_f_interpolate(shape: tuple[int, ...], size: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(*shape[:2], *size, generator=generator, dtype=torch.float64)
    ours = trilinear_resize(x, size)
    theirs = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours_grad, theirs_grad = (torch.autograd.grad(y, x, grad)[0] for y in (ours, theirs))
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


def test_follows_the_input_dtype() -> None:
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.bfloat16)
    assert trilinear_resize(x, (8, 8, 8)).dtype == torch.bfloat16


def test_a_first_call_in_inference_mode_does_not_break_training_later() -> None:
    """The interpolation weights are cached per size: ones made in inference mode could not be saved for backward."""
    with torch.inference_mode():
        trilinear_resize(torch.randn(1, 1, 6, 6, 6), (11, 11, 11))
    x = torch.randn(1, 1, 6, 6, 6, requires_grad=True)
    trilinear_resize(x, (11, 11, 11)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_window_is_the_resized_volume_cropped_at_each_samples_start() -> None:
    """The refinement head's training boxes (`model.refine_crop`): values and gradients of only each sample's
    cube equal those of the whole resized volume cropped there."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    starts, edge = torch.tensor([[0, 0, 0], [16, 4, 28], [30, 12, 2]]), 6
    grad = torch.randn(3, 2, edge, edge, edge, generator=generator, dtype=torch.float64)
    ours = trilinear_resize(x, (36, 36, 36), window=(starts, edge))
    whole = trilinear_resize(x, (36, 36, 36))
    cropped = torch.stack([whole[i, :, a:a + edge, b:b + edge, c:c + edge]
                           for i, (a, b, c) in enumerate(starts.tolist())])
    assert ours.shape == (3, 2, edge, edge, edge)
    torch.testing.assert_close(ours, cropped, rtol=1e-12, atol=1e-12)
    ours_grad, cropped_grad = (torch.autograd.grad(y, x, grad)[0] for y in (ours, cropped))
    torch.testing.assert_close(ours_grad, cropped_grad, rtol=1e-12, atol=1e-12)
