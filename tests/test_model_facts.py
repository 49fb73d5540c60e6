"""What differs between model kinds is declared on the model classes, and the config's view of it agrees."""

from __future__ import annotations

import pytest
import torch

from samft.choices import CHOICES, PROMPT_FREE_MODELS
from samft.model import REGISTRY, SamMed3D, build_model
from samft.runner import _freeze_heads_without_loss

BUILDABLE = ("sam_med3d_tiny", "unet")  # the full sam_med3d is the same class as the tiny one (REGISTRY)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name=name) for name in BUILDABLE}


def test_every_model_name_is_buildable_or_a_registered_sam_variant() -> None:
    assert set(CHOICES["model.name"]) == {*REGISTRY, "unet"}


@pytest.mark.parametrize("name", BUILDABLE)
def test_the_config_knows_which_models_take_clicks_as_the_classes_do(name: str, models) -> None:
    assert models[name].takes_clicks == (name not in PROMPT_FREE_MODELS)


@pytest.mark.parametrize("name", BUILDABLE)
def test_declared_ich_heads_are_submodules_and_only_they_freeze_without_the_ich_loss(name: str, models) -> None:
    model = models[name]
    for param in model.parameters():
        param.requires_grad_(True)
    trainable = {n for n, p in model.named_parameters()}
    _freeze_heads_without_loss(model, ich_loss_weight=0.1)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    _freeze_heads_without_loss(model, ich_loss_weight=0.0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in trainable if n.split(".")[0] in model.ich_heads}
    # SAM-Med3D: the presence head and the representation head that only feeds it; the U-Net has neither
    expected = ("ich_head", "representation_head") if isinstance(model, SamMed3D) else ()
    assert {n.split(".")[0] for n in frozen} == set(expected)
    for param in model.parameters():
        param.requires_grad_(True)
