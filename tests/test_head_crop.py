"""`model.refine_crop`: the refinement head trains on a box of each crop, drawn with the asked lesion share, equals
its UNet on the box's inputs, and the loss, the correction clicks and the config all follow the box."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.utils import pixelshuffle, pixelunshuffle
from test_config import DATA_PATHS, compose_train
from test_refinement import randomised_output_layer

from samft.config import validate
from samft.engine.losses import SegmentationLoss
from samft.errors import UserError
from samft.model import build_model
from samft.model.head_crop import Box, sample_box
from samft.model.heads import RefinementHead
from samft.model.layers import trilinear_resize


def holds(box: Box, voxel: tuple[int, int, int]) -> torch.Tensor:
    """B bools: whether each sample's box holds `voxel`."""
    v = torch.tensor(voxel)
    return ((box.starts <= v) & (v < box.starts + box.size)).all(dim=1)


def test_boxes_hold_a_lesion_voxel_at_the_share_asked_for() -> None:
    target = torch.zeros(2000, 1, 64, 64, 64)
    target[:, 0, 0, 0, 0] = 1.0  # a corner voxel: a uniform box holds it with probability (2 / 49)^3
    generator = torch.Generator().manual_seed(0)
    for share in (0.0, 0.67, 1.0):
        box = sample_box(target, size=16, step=2, lesion_share=share, generator=generator)
        assert abs(float(holds(box, (0, 0, 0)).float().mean()) - share) < 0.035, share
        assert (box.starts % 2 == 0).all() and (box.starts >= 0).all() and (box.starts <= 48).all()


def test_a_lesion_box_puts_its_voxel_anywhere_and_an_empty_crop_gets_uniform_boxes() -> None:
    target = torch.zeros(2000, 1, 64, 64, 64)
    target[:1000, 0, 33, 30, 31] = 1.0
    box = sample_box(target, size=16, step=2, lesion_share=1.0, generator=torch.Generator().manual_seed(1))
    lesion, empty = box.starts[:1000], box.starts[1000:]
    offsets = torch.tensor([33, 30, 31]) - lesion
    assert holds(Box(lesion, 16), (33, 30, 31)).all()
    assert offsets.min() == 0 and offsets.max() == 15  # from the box's first voxel to its last
    assert empty.min() == 0 and empty.max() == 48 and abs(float(empty.float().mean()) - 24) < 1.0


@pytest.mark.parametrize("cell_mlp", [0, 16])
def test_a_box_of_the_head_equals_its_unet_on_the_box_inputs(cell_mlp: int) -> None:
    """Each sample's box: the CT's voxels, the coarse logits and the click guidance taken in the box (the clicks
    moved into its coordinates), and the box of the upsampled decoder logits (float64, batch norm in eval mode, so
    each sample is refined on its own); the per-voxel stage, if any, on the box's CT voxels."""
    torch.manual_seed(0)
    head = RefinementHead(full_resolution=True, norm="batch", cell_mlp=cell_mlp).double().eval()
    randomised_output_layer(head)
    image = torch.randn(2, 1, 64, 64, 64, dtype=torch.float64)
    low_res = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    clicks = (torch.tensor([[[20.0, 30.0, 25.0]], [[40.0, 10.0, 50.0]]], dtype=torch.float64),
              torch.tensor([[1], [1]]))
    box = Box(starts=torch.tensor([[16, 24, 8], [32, 0, 30]]), size=32)
    with torch.no_grad():
        refined = head(image, low_res, clicks, box=box)
        for i, (a, b, c) in enumerate(box.starts.tolist()):
            inner = (slice(None), slice(None), slice(a, a + 32), slice(b, b + 32), slice(c, c + 32))
            grid_inner = (slice(None), slice(None), slice(a // 2, a // 2 + 16), slice(b // 2, b // 2 + 16),
                          slice(c // 2, c // 2 + 16))
            moved = (clicks[0][i:i + 1] - torch.tensor([a, b, c]), clicks[1][i:i + 1])
            inputs = torch.cat([
                pixelunshuffle(image[i:i + 1][inner], spatial_dims=3, scale_factor=2),
                trilinear_resize(low_res[i:i + 1], [32] * 3)[grid_inner],
                head.guidance(moved, batch=1, grid=[16] * 3, like=image),
            ], dim=1)
            correction = head.net(inputs)
            expected = (trilinear_resize(low_res[i:i + 1], [64] * 3)[inner]
                        + trilinear_resize(correction[:, :1], [32] * 3)
                        + pixelshuffle(correction[:, 1:], spatial_dims=3, scale_factor=2))
            if cell_mlp:
                cells = torch.cat([pixelunshuffle(expected, spatial_dims=3, scale_factor=2),
                                   pixelunshuffle(image[i:i + 1][inner], spatial_dims=3, scale_factor=2),
                                   correction], dim=1)
                expected = expected + pixelshuffle(head.cell_mlp(cells), spatial_dims=3, scale_factor=2)
            torch.testing.assert_close(refined[i:i + 1], expected, rtol=1e-10, atol=1e-10)
    assert refined.shape == (2, 1, 32, 32, 32)


def box_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name="sam_med3d_tiny", visual_tokens=16, refine=True, refine_full_resolution=True,
                        refine_norm="batch", refine_crop=64)
    randomised_output_layer(model.refiner)
    return model


def test_training_refines_boxes_and_the_loss_takes_the_label_there() -> None:
    model = box_model().train()
    image = torch.randn(2, 1, 128, 128, 128)
    label = torch.zeros_like(image)
    label[:, 0, 50:58, 60:70, 70:76] = 1.0
    out = model.segment(image, target=label, num_clicks=1, prompt_free=True,
                        generator=torch.Generator().manual_seed(0))
    assert out.box is not None and out.logits[0].shape == out.prompt_free.shape == (2, 1, 64, 64, 64)
    loss = SegmentationLoss(ich_weight=0.0, lesion_pos_weight=50.0, batch_dice=True)(out, label, torch.ones(2))
    dice_ce = DiceCELoss(sigmoid=True, batch=True, weight=torch.tensor([50.0]))
    inside = out.box.crop(label)
    assert inside.sum() > 0  # the boxes hold some of the lesion
    torch.testing.assert_close(loss, dice_ce(out.logits[0], inside) + dice_ce(out.prompt_free, inside))
    with torch.no_grad():
        evaluated = model.eval().segment(image, target=label, num_clicks=1, generator=torch.Generator())
    assert evaluated.box is None and evaluated.logits[0].shape == (2, 1, 128, 128, 128)


def test_correction_clicks_land_in_the_box_where_the_first_round_erred() -> None:
    model = box_model().train()
    image = torch.randn(2, 1, 128, 128, 128)
    label = torch.zeros_like(image)
    label[:, 0, 40:80, 40:80, 40:80] = 1.0  # larger than a box: its first round errs inside the box
    seen = []
    refine = model.refiner.forward

    def recording(image, low_res, clicks=None, **kwargs):
        seen.append((clicks[0].clone(), clicks[1].clone()))
        return refine(image, low_res, clicks, **kwargs)

    model.refiner.forward = recording
    with torch.no_grad():
        out = model.segment(image, target=label, num_clicks=2, generator=torch.Generator().manual_seed(0))
    (coords, labels), box = seen[1], out.box
    second = coords[:, 1].long()
    assert ((second >= box.starts) & (second < box.starts + 64)).all()
    first_round = out.logits[0] > 0
    for i in range(2):
        x, y, z = (second[i] - box.starts[i]).tolist()
        truth = bool(label[i, 0, second[i, 0], second[i, 1], second[i, 2]])
        assert bool(first_round[i, 0, x, y, z]) != truth and int(labels[i, 1]) == int(truth)


@pytest.mark.parametrize("overrides,message", [
    (["model.refine_crop=64"], "needs model.refine_norm=batch"),
    (["model.refine_crop=40", "model.refine_norm=batch"], "multiple of 16"),
    (["model.refine_crop=64", "model.refine_norm=batch", "model.refine=false"], "model.refine=true"),
])
def test_the_config_refuses_a_box_the_head_cannot_train_on(overrides: list[str], message: str) -> None:
    cfg = compose_train(["data=csv", *DATA_PATHS["csv"], "model=sam_med3d_tiny", "model.refine=true", *overrides])
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_the_realistic_recipe_head_is_unchanged_by_default() -> None:
    """Instance norm and the whole crop stay the default: runs saved before the option rebuild as they were."""
    model = build_model(name="sam_med3d_tiny", visual_tokens=16, refine=True)
    assert model.refine_crop is None
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.refiner.modules())
