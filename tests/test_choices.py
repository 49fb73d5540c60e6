"""Each setting's allowed values and range are written once (samft.choices) and every check reads them."""

from __future__ import annotations

import dataclasses

import pytest

from samft import choices
from samft.baseline import BaselineConfig
from samft.config import ModelToolConfig, ScanToolConfig
from samft.engine.settings import _CHOICE_KEYS, _RANGE_KEYS, TrainSettings
from samft.evaluate import EvaluateConfig
from samft.predict import PredictConfig


def _just_outside(bound: choices.Bound) -> float:
    low, high, low_open = bound
    if low is None:
        return high + 1
    step = 1 if isinstance(low, int) else 1e-6
    return low if low_open else low - step


def _at_edge(bound: choices.Bound) -> float:
    low, _, low_open = bound
    return low + (1 if isinstance(low, int) else 1e-6) if low_open else low


@pytest.mark.parametrize("name", sorted(_RANGE_KEYS))
def test_train_settings_take_their_ranges_from_the_config_ranges(name: str) -> None:
    bound = choices.RANGES[_RANGE_KEYS[name]]
    TrainSettings(**{"epochs": 100, name: _at_edge(bound)})
    with pytest.raises(ValueError, match=f"need {name} {choices.describe(bound)}"):
        TrainSettings(**{"epochs": 100, name: _just_outside(bound)})


@pytest.mark.parametrize("name", sorted(_CHOICE_KEYS))
def test_train_settings_take_their_choices_from_the_config_choices(name: str) -> None:
    for value in choices.CHOICES[_CHOICE_KEYS[name]]:
        TrainSettings(epochs=1, **{name: value})
    with pytest.raises(ValueError, match=f"need {name} in"):
        TrainSettings(epochs=1, **{name: "no-such-value"})


def test_the_range_rule_reads_as_it_checks() -> None:
    assert choices.describe((0.0, 1.0, True)) == "> 0.0 and <= 1.0"
    assert choices.describe((1, None, False)) == ">= 1"
    assert choices.within(1.0, (0.0, 1.0, True)) and not choices.within(0.0, (0.0, 1.0, True))
    assert not choices.within(2, (0, 1, False)) and choices.within(0, (0, 1, False))


def test_the_scan_tools_share_one_definition_of_their_common_keys() -> None:
    shared = {f.name for f in dataclasses.fields(ScanToolConfig)}
    model_shared = {f.name for f in dataclasses.fields(ModelToolConfig)}
    assert shared == {"nonfinite", "max_voxels", "output_dir"}
    assert {"points", "threshold", "overlap", "sw_batch_size", "device", "postprocess"} <= model_shared
    assert issubclass(PredictConfig, ModelToolConfig) and issubclass(EvaluateConfig, ModelToolConfig)
    assert issubclass(BaselineConfig, ScanToolConfig)
    assert ScanToolConfig().max_voxels == choices.DEFAULT_MAX_VOXELS
    # every checked key is a key of the schema it is checked on
    assert {*choices.SCAN_TOOL_CHOICES, *choices.SCAN_TOOL_RANGES} <= shared
    assert {*choices.MODEL_TOOL_CHOICES, *choices.MODEL_TOOL_RANGES} <= model_shared
