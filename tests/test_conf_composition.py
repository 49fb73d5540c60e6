"""The YAML options are composed from shared bases (each key written once) and compose to the full settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA_OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_every_data_option_gets_the_shared_keys_from_data_common(option: str) -> None:
    common = yaml.safe_load((CONF / "data_common.yaml").read_text())
    own = yaml.safe_load((CONF / "data" / f"{option}.yaml").read_text())
    own = own.get("data", {}) if option == "demo" else own  # demo.yaml is a global package
    # the base is listed after the option's own keys: a key set in both would silently take the base's value
    assert not common.keys() & own.keys()
    data = _compose("train", [f"data={option}"]).data
    assert {k: v for k, v in OmegaConf.to_container(data).items() if k in common} == common
    assert next(iter(data)) == "source"


def test_gpu_and_ddp_are_the_cpu_settings_with_their_changes() -> None:
    cpu, gpu, ddp = (OmegaConf.to_container(_compose("train", [f"hardware={h}"]).hardware)
                     for h in ("cpu", "gpu", "ddp"))
    assert {k: v for k, v in gpu.items() if cpu.get(k) != v} == {
        "device": "cuda", "precision": "bf16", "pin_memory": True, "deterministic": False}
    assert {k: v for k, v in ddp.items() if gpu.get(k) != v} == {
        "device": "auto", "distributed": True, "nproc_per_node": 2, "timeout_min": 30}


def test_the_model_options_share_the_sam_med3d_keys() -> None:
    sam, tiny, unet = (OmegaConf.to_container(_compose("train", [f"model={m}"]).model)
                       for m in ("sam_med3d", "sam_med3d_tiny", "unet"))
    assert list(tiny) == list(sam) and list(unet) == [*sam, "unet"]
    assert {k for k in sam if tiny[k] != sam[k]} == {"name", "refine", "prompt_mode", "train_clicks"}
    assert tiny["lesion_pos_weight"] == sam["lesion_pos_weight"] == 50.0


@pytest.mark.parametrize("tool", ["predict", "evaluate", "baseline"])
def test_a_tools_log_folder_follows_output_dir_and_samft_log_dir(tool: str, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.delenv("SAMFT_LOG_DIR", raising=False)
    cfg = _compose(tool, [])
    assert cfg.output_dir == "./outputs"
    assert cfg.hydra.run.dir.startswith(f"./outputs/{tool}/")
    monkeypatch.setenv("SAMFT_LOG_DIR", str(tmp_path / "env"))
    assert _compose(tool, []).hydra.run.dir.startswith(f"{tmp_path / 'env'}/{tool}/")
    assert _compose(tool, [f"output_dir={tmp_path}"]).hydra.run.dir.startswith(f"{tmp_path}/{tool}/")
