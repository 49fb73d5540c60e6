"""Config groups compose and validate; invalid settings fail with one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.patience import patience
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from samft.config import risky_settings, validate
from samft.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "model", "optim", "scheduler", "hardware", "logger", "experiment", "hparams_search")
DATA_PATHS = {
    "csv": ["data.train_csv=a.csv", "data.val_csv=b.csv", "data.mask_dir=m"],
    "ct_ich": ["data.root=ct"],
    "nifti": ["data.image_dir=i", "data.label_dir=l"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    extra = DATA_PATHS.get(option, []) if group == "data" else []
    cfg = compose_train([f"{group}={option}", *extra])
    typed = validate(cfg)
    if group in ("data", "model", "optim", "scheduler", "hardware", "logger"):
        assert typed[group].get("name", typed[group].get("source")) == option or group in ("hardware",)
    if group == "hardware":
        assert typed.hardware.precision == {"cpu": "fp32", "gpu": "bf16", "ddp": "bf16"}[option]


def test_defaults_match_the_predecessor_flags() -> None:
    typed = validate(compose_train(["data=csv", *DATA_PATHS["csv"]]))
    assert typed.epochs == 200 and typed.patience == 15
    assert typed.data.batch_size == 2
    assert typed.optim.lr == 1e-4 and typed.optim.weight_decay == 1e-4
    assert typed.optim.grad_accum_steps == 4 and typed.optim.max_grad_norm == 1.0
    assert typed.model.visual_tokens == 256
    assert typed.model.freeze_encoder is False and typed.model.gradient_checkpointing is False
    assert typed.scheduler.name == "plateau"
    assert typed.output_dir == "./outputs"
    assert typed.logger.name == "none" and typed.logger.project == "samft"


def test_brief_example_overrides_apply() -> None:
    typed = validate(compose_train(["optim.lr=1e-4", "scheduler=cosine"]))
    assert typed.scheduler.name == "cosine" and typed.scheduler.warmup_epochs == 1
    assert typed.optim.lr == pytest.approx(1e-4)


def test_sweep_config_sets_the_search_space() -> None:
    cfg = compose_train(["hparams_search=ich_optuna"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {
        "optim.lr": "tag(log, interval(1e-5, 1e-3))",
        "model.freeze_encoder": "choice(true, false)",
        "optim.grad_accum_steps": "choice(1, 2, 4, 8)",
    }
    assert cfg.hydra.sweeper.direction == "maximize"


def test_unet_search_space_shares_the_sweep_settings_but_not_the_encoder_switch() -> None:
    """The U-Net has no pretrained encoder to freeze: its space leaves freeze_encoder out and keeps the rest."""
    sam, unet = (compose_train([f"hparams_search={name}", "experiment=sweep_demo"])
                 for name in ("ich_optuna", "unet_optuna"))
    assert OmegaConf.to_container(unet.hydra.sweeper.params) == {
        "optim.lr": "tag(log, interval(1e-5, 1e-2))",
        "optim.grad_accum_steps": "choice(1, 2, 4)",
        "model.batch_dice": "choice(true, false)",
    }
    assert unet.hparams_search.name == "unet_optuna" and unet.model.name == "unet"
    shared = {key: value for key, value in OmegaConf.to_container(sam.hydra.sweeper).items() if key != "params"}
    assert shared == {key: value for key, value in OmegaConf.to_container(unet.hydra.sweeper).items()
                      if key != "params"}


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.grad_accum_steps=0", "optim.grad_accum_steps"),
        ("hardware.precision=fp8", "fp32, bf16, fp16"),
        ("+optim.lrr=1", "keys under 'optim'"),
    ],
)
def test_validate_raises_one_line(override: str, expected: str) -> None:
    with pytest.raises(UserError) as err:
        validate(compose_train([override]))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_risky_settings_warn() -> None:
    typed = validate(compose_train(["hardware.precision=fp16", "epochs=3", "model.freeze_encoder=true"]))
    warnings = " ".join(risky_settings(typed))
    assert "fp16 on CPU" in warnings and "below patience" in warnings and "randomly initialised" in warnings


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.lr=fast", "'optim.lr'"),
        ("optim.lrr=1", "unknown config key 'optim.lrr'; keys under 'optim': betas"),
        ("optim.grad_accum_steps=0", "'optim.grad_accum_steps' is 0; it must be >= 1"),
        ("data.batch_size=-1", "'data.batch_size' is -1; it must be >= 1"),
        ("scheduler=cosin",
         "unknown option 'cosin' for config group 'scheduler'; available: cosine, plateau, poly, step"),
        ("data=csv", "data=csv needs data.train_csv, data.val_csv, data.mask_dir"),
    ],
)
def test_cli_rejects_bad_settings_with_exit_code_2(override: str, expected: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "samft.train", override, f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=patience(120),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not any(tmp_path.rglob("*.pth"))


def test_help_and_cfg_job_do_not_import_torch() -> None:
    probe = (
        "import sys, runpy; sys.argv=['samft.train', '{flag}'];\n"
        "try:\n    runpy.run_module('samft.train', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'heavy import'\n"
    )
    for flag in ("--help", "--cfg=job"):
        proc = subprocess.run([sys.executable, "-c", probe.format(flag=flag)], capture_output=True, text=True,
                              timeout=patience(60))
        assert proc.returncode == 0, proc.stderr
        if flag == "--help":  # every config group with its options, then the composed config
            for line in ("hardware: cpu, ddp, gpu", "optim: adamw", "scheduler: cosine, plateau, poly, step",
                         "model: sam_med3d, sam_med3d_tiny, unet", "== Config =="):
                assert line in proc.stdout, line
            assert "logger: " in proc.stdout and "hparams_search: ich_optuna" in proc.stdout
        else:
            job = yaml.safe_load(proc.stdout)
            assert {"data", "model", "optim", "scheduler", "hardware", "logger"} <= job.keys()
            assert job["optim"]["lr"] > 0 and job["hardware"]["device"] in ("auto", "cpu", "cuda")


def test_help_reuses_one_config_repository_and_lists_the_same_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra

    from samft.hydra_help import reuse_config_repository

    groups = [*GROUPS, "hydra/launcher", "hydra/sweeper"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        stock = {group: loader.get_group_options(group, config_name="train", overrides=["seed=1"]) for group in groups}
        builds = []
        original = ConfigLoaderImpl._parse_overrides_and_create_caching_repo
        monkeypatch.setattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo",
                            lambda self, *args: builds.append(args) or original(self, *args))
        # monkeypatch puts the stock method back after the test, undoing the patch below
        monkeypatch.setattr(ConfigLoaderImpl, "get_group_options", ConfigLoaderImpl.get_group_options)
        reuse_config_repository()
        reused = {group: loader.get_group_options(group, config_name="train", overrides=["seed=1"]) for group in groups}
        loader.get_group_options("model", config_name="predict")
    assert reused == stock and "sam_med3d_tiny" in reused["model"] and "samft_optuna" in reused["hydra/sweeper"]
    assert builds == [("train", ["seed=1"]), ("predict", [])]
