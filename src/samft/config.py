"""Typed schemas for the Hydra config and the checks that run before any data is read.

Importing this module must stay cheap (no torch, no MONAI): `--help` and `--cfg job` rely on it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from samft.choices import (
    CHOICES,
    DEFAULT_MAX_VOXELS,
    LOGGER_TRACKERS,
    PROMPT_FREE_MODELS,
    RANGES,
    Bound,
    describe,
    within,
)
from samft.errors import UserError


@dataclass
class DataConfig:
    source: str = "demo"
    train_csv: str | None = None
    val_csv: str | None = None
    mask_dir: str | None = None
    root: str | None = None
    split_file: str | None = None
    val_fraction: float = 0.2
    image_dir: str | None = None
    label_dir: str | None = None
    demo_dir: str | None = None
    demo_patients: int = 16
    demo_seed: int = 0
    batch_size: int = 2
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])
    # one int (a cube) or three ints (voxels of the resampled grid): training patch and sliding window
    roi_size: Any = 128
    intensity: str = "window"
    window_center: float = 40.0
    window_width: float = 80.0
    fg_oversample: float = 0.33
    aug_prob: float = 0.3
    affine_prob: float = 0.0
    cache: str = "memory"
    cache_dir: str | None = None
    on_bad_sample: str = "error"


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[list[int]] = field(default_factory=lambda: [[2, 2, 1], [2, 2, 2], [2, 2, 2]])
    num_res_units: int = 0
    norm: str = "instance"


@dataclass
class ModelConfig:
    name: str = "sam_med3d_tiny"
    checkpoint: str | None = None
    freeze_encoder: bool = False
    visual_tokens: int = 256
    gradient_checkpointing: bool = False
    ich_loss_weight: float = 0.1
    lesion_pos_weight: float = 1.0
    batch_dice: bool = True
    refine: bool = False
    refine_full_resolution: bool = False
    refine_norm: str = "instance"
    refine_crop: int | None = None
    refine_crop_lesion_share: float = 0.67
    refine_cell_mlp: int = 0
    prompt_mode: str = "click"
    train_clicks: int = 3
    val_clicks: list[int] = field(default_factory=lambda: [1, 3, 5])
    unet: UNetConfig = field(default_factory=UNetConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_accum_steps: int = 4
    max_grad_norm: float | None = 1.0
    encoder_lr_mult: float = 1.0


@dataclass
class SchedulerConfig:
    name: str = "plateau"
    factor: float = 0.5
    plateau_patience: int = 5
    warmup_epochs: int = 0
    min_lr: float = 0.0
    exponent: float = 0.9
    step_size: int = 30
    gamma: float = 0.1


@dataclass
class HardwareConfig:
    device: str = "cpu"
    precision: str = "fp32"
    num_workers: int | None = None
    # torch threads per process (intra- and inter-op); null: the usable CPUs less the loader workers
    cpu_threads: int | None = None
    pin_memory: bool = False
    distributed: bool = False
    nproc_per_node: int = 1
    backend: str = "auto"
    deterministic: bool = True
    # minutes a rank waits in a collective (for a crashed or stuck peer, or rank 0 reading the data) before failing
    timeout_min: float = 30.0


@dataclass
class LoggerConfig:
    name: str = "none"
    # logger=many: the trackers that run together (any of LOGGER_TRACKERS)
    loggers: list[str] = field(default_factory=list)
    # wandb project; also the MLflow experiment name
    project: str = "samft"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "online"
    # MLflow: sqlite:///file.db, a folder, or http(s)://server; null: sqlite:///<output_dir>/mlflow.db
    tracking_uri: str | None = None
    # MLflow run name; null: the run directory's name
    run_name: str | None = None
    log_images: bool = False
    log_freq: int = 5


# The config groups of conf/train.yaml's defaults list.
CONFIG_GROUPS = ("data", "model", "optim", "scheduler", "hardware", "logger", "experiment", "hparams_search")


@dataclass
class ScanToolConfig:
    """The keys of every tool that reads scans (`conf/predict.yaml`, `evaluate.yaml`, `baseline.yaml`)."""

    nonfinite: str = "refuse"
    max_voxels: int = DEFAULT_MAX_VOXELS
    # the log folder's parent, as training's `output_dir` (the YAML default reads SAMFT_LOG_DIR)
    output_dir: str = "./outputs"


@dataclass
class ModelToolConfig(ScanToolConfig):
    """The keys of the tools that run a trained model on scans (`samft.predict`, `samft.evaluate`)."""

    points: str | None = None
    threshold: float = 0.5
    postprocess: bool = True
    overlap: float = 0.25
    sw_batch_size: int | None = None  # None: 4 on CUDA, 1 on a CPU
    device: str = "auto"
    precision: str = "auto"  # auto: the run's hardware.precision on CUDA, fp32 on a CPU


@dataclass
class TrialConfig:
    """Filled in by the pruning sweeper for each job; empty for plain runs."""

    number: int | None = None
    study_name: str | None = None
    storage: str | None = None
    pruner: str = "none"
    pruner_warmup_epochs: int = 0  # hparams_search.pruner_warmup_epochs (samft.sweep.pruning.make_pruner)
    pruner_startup_trials: int = 2  # hparams_search.pruner_startup_trials


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    task_name: str = "train"
    output_dir: str = "./outputs"
    seed: int = 42
    epochs: int = 200
    patience: int = 15
    min_delta: float = 0.0
    val_every: int = 1
    # whole-scan validation: N validation scans evenly spaced over the list (null: all), this window overlap
    val_scans: int | None = None
    val_overlap: float = 0.25
    resume: str = "auto"
    max_steps_per_epoch: int | None = None
    stop_after_epoch: int | None = None
    oom_policy: str = "skip"
    max_consecutive_failures: int = 5


def schema_keys(section: str, schema: type = TrainConfig) -> list[str]:
    """The keys a config section of `schema` accepts ('' for the top level), for error messages."""
    node: Any = schema
    for part in filter(None, section.split(".")):
        node = {f.name: f for f in dataclasses.fields(node)}[part].default_factory
    return sorted(f.name for f in dataclasses.fields(node))


def validate(cfg: DictConfig) -> DictConfig:
    """Merge the composed config into the schema and check choices and ranges.

    Returns the typed config (without the `hydra` node). Raises UserError with one line naming the key
    and what it accepts.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    for node in ("hydra", "experiment", "hparams_search"):
        raw.pop(node, None)
    try:
        plain = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(_describe_omegaconf_error(err)) from None
    schema = OmegaConf.structured(TrainConfig)
    try:
        typed = OmegaConf.merge(schema, plain)
    except OmegaConfBaseException as err:
        raise UserError(_describe_omegaconf_error(err)) from None
    _check_finite(typed)
    _check_choices(typed)
    _check_ranges(typed)
    _check_model(typed)
    _check_sources(typed)
    _check_loggers(typed)
    return typed


def _describe_omegaconf_error(err: OmegaConfBaseException, schema: type = TrainConfig) -> str:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not" in message:
        parent = key.rpartition(".")[0]
        known = ", ".join(schema_keys(parent, schema))
        return f"unknown config key '{key}'; keys under '{parent or '<top level>'}': {known}"
    expected = _expected_type(key, schema)
    return f"config key '{key}': {message}" + (f" (expected {expected})" if expected else "")


def _expected_type(key: str, schema: type = TrainConfig) -> str | None:
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        if i == len(parts) - 1:
            return str(fields[part].type)
        node = fields[part].default_factory
    return None


def _check_finite(cfg: DictConfig) -> None:
    """Every float in the config (at any depth, in lists too) is finite: NaN passes every `<`/`>` range check."""

    def walk(value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{key}' is {value}; give a finite number")
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{key}[{index}]")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def _check_choices(cfg: DictConfig, choices: dict[str, tuple[str, ...]] = CHOICES) -> None:
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; allowed values: {', '.join(allowed)}")


def _check_ranges(cfg: DictConfig) -> None:
    _check_bounds(cfg, RANGES)
    if len(cfg.data.spacing) != 3 or any(s <= 0 for s in cfg.data.spacing):
        raise UserError(f"config key 'data.spacing' is {list(cfg.data.spacing)}; give three positive mm values")
    roi = roi_triple(cfg.data.roi_size)
    if cfg.model.name == "unet":
        divisor = unet_divisor(cfg.model.unet.strides)
        if any(r % d for r, d in zip(roi, divisor)):
            raise UserError(f"config key 'data.roi_size' is {list(roi)}; with model.unet.strides each side must be a "
                            f"multiple of {list(divisor)}")
    elif roi != (128, 128, 128):
        raise UserError(f"config key 'data.roi_size' is {list(roi)}; model={cfg.model.name} takes 128^3 crops")
    if not cfg.model.val_clicks or any(c < 1 for c in cfg.model.val_clicks):
        raise UserError(f"config key 'model.val_clicks' is {list(cfg.model.val_clicks)}; give click counts >= 1 "
                        "(model.prompt_mode=auto evaluates without clicks)")


def roi_triple(value: Any) -> tuple[int, int, int]:
    """`data.roi_size` as three ints: one int (a cube) or a list of three. Raises UserError otherwise."""
    values = [value] * 3 if isinstance(value, int) else list(value) if OmegaConf.is_list(value) or isinstance(
        value, list | tuple) else None
    if values is None or len(values) != 3 or not all(isinstance(v, int) and v >= 16 for v in values):
        raise UserError(f"config key 'data.roi_size' is {value!r}; give one int or three ints, each >= 16")
    return tuple(values)  # type: ignore[return-value]


def unet_divisor(strides: Any) -> tuple[int, int, int]:
    """The product of the U-Net's strides per axis (a patch side must be a multiple of it)."""
    out = [1, 1, 1]
    for stride in strides:
        per_axis = [stride] * 3 if isinstance(stride, int) else list(stride)
        for axis in range(3):
            out[axis] *= per_axis[axis]
    return tuple(out)  # type: ignore[return-value]


def _check_model(cfg: DictConfig) -> None:
    name = cfg.model.name
    if name in PROMPT_FREE_MODELS and cfg.model.prompt_mode != "auto":
        raise UserError(f"model={name} takes no click prompts; set model.prompt_mode=auto (conf/model/{name}.yaml "
                        "does)")
    cell_mlp = cfg.model.get("refine_cell_mlp", 0)
    if cell_mlp and (name == "unet" or not cfg.model.refine or not cfg.model.refine_full_resolution):
        raise UserError(f"config key 'model.refine_cell_mlp' is {cell_mlp}; its per-voxel stage reads each voxel of "
                        "the refinement head's full-resolution grid, so it needs a SAM model with model.refine=true "
                        "and model.refine_full_resolution=true (or set model.refine_cell_mlp=0)")
    crop = cfg.model.get("refine_crop")
    if crop is not None:
        if name == "unet" or not cfg.model.refine:
            raise UserError(f"config key 'model.refine_crop' is {crop}; it trains the refinement head on boxes, so "
                            "it needs a SAM model with model.refine=true (or set model.refine_crop=null)")
        if not isinstance(crop, int) or crop % 16 or not 16 <= crop <= 128:
            raise UserError(f"config key 'model.refine_crop' is {crop!r}; give a multiple of 16 from 16 to 128 "
                            "(the head's UNet halves its grid three times), or null")
        if cfg.model.refine_norm != "batch":
            raise UserError("config key 'model.refine_crop' needs model.refine_norm=batch: instance norm's statistics "
                            "over a box differ from those over the whole crop that validation and predict refine")


def _check_sources(cfg: DictConfig) -> None:
    needed = {
        "csv": ("train_csv", "val_csv", "mask_dir"),
        "ct_ich": ("root",),
        "nifti": ("image_dir", "label_dir"),
    }.get(cfg.data.source, ())
    missing = [f"data.{k}" for k in needed if OmegaConf.is_missing(cfg.data, k) or not cfg.data[k]]
    if missing:
        raise UserError(
            f"data={cfg.data.source} needs {', '.join(missing)}; pass them on the command line, "
            f"e.g. {' '.join(f'{k}=...' for k in missing)}"
        )
    if cfg.resume not in ("auto", "never") and not os.path.isfile(cfg.resume):
        raise UserError(f"config key 'resume' is {cfg.resume!r}: no such file; use auto, never or a checkpoint path")


def _check_loggers(cfg: DictConfig) -> None:
    chosen, name = list(cfg.logger.loggers), cfg.logger.name
    if name != "many":
        if chosen:
            raise UserError(f"config key 'logger.loggers' is {chosen} but logger={name}; it is read only with "
                            f"logger=many (e.g. logger=many logger.loggers=[csv,mlflow])")
        return
    unknown = [t for t in chosen if t not in LOGGER_TRACKERS]
    if not chosen or unknown or len(set(chosen)) < len(chosen):
        raise UserError(f"config key 'logger.loggers' is {chosen}; with logger=many give one or more distinct "
                        f"trackers out of {', '.join(LOGGER_TRACKERS)}, e.g. logger.loggers=[csv,mlflow]")


def refuse_list_selection(overrides: list[str]) -> None:
    """Refuse Hydra's `group=[a,b]`: it merges the option files into one node, so the last file's keys win
    silently (with `logger=[csv,mlflow]` only MLflow would log). `overrides` are the command-line overrides."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in CONFIG_GROUPS and value.strip().startswith("["):
            hint = (" for several trackers use logger=many logger.loggers=" + value.strip().replace(" ", "")
                    if key == "logger" else "")
            raise UserError(f"'{override}': config group '{key}' takes one option;{hint or ' choose one'}")


def risky_settings(cfg: DictConfig) -> list[str]:
    """Legal settings that are probably a mistake; printed as warnings."""
    warnings = []
    if cfg.hardware.precision == "fp16" and cfg.hardware.device == "cpu":
        warnings.append("hardware.precision=fp16 on CPU is slow and imprecise; use bf16 or fp32 on CPU")
    if cfg.epochs < cfg.patience:
        warnings.append(f"epochs={cfg.epochs} is below patience={cfg.patience}: early stopping can never trigger")
    if cfg.model.freeze_encoder and not cfg.model.checkpoint:
        warnings.append("model.freeze_encoder=true without model.checkpoint freezes a randomly initialised encoder")
    if cfg.model.name == "sam_med3d" and cfg.hardware.device == "cpu":
        warnings.append("model=sam_med3d on CPU takes about 20 s per forward pass; use model=sam_med3d_tiny or a GPU")
    return warnings


def _check_bounds(cfg: DictConfig, ranges: dict[str, Bound]) -> None:
    for key, bound in ranges.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not within(value, bound):
            raise UserError(f"config key '{key}' is {value}; it must be {describe(bound)}")


def validate_tool(
    cfg: DictConfig, schema: type, *, tool: str, choices: dict[str, tuple[str, ...]] | None = None,
    ranges: dict[str, Bound] | None = None,
) -> DictConfig:
    """The config of `python -m samft.<tool>` merged into its dataclass `schema`, with every float finite,
    mandatory keys given, and `choices` and `ranges` checked. Raises UserError with one line naming the key."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    try:
        plain = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
        typed = OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as err:
        raise UserError(_describe_omegaconf_error(err, schema)) from None
    missing = [f.name for f in dataclasses.fields(schema) if OmegaConf.is_missing(typed, f.name)]
    if missing:
        raise UserError(f"samft.{tool} needs {', '.join(missing)}; pass {' '.join(f'{k}=...' for k in missing)}")
    _check_finite(typed)
    _check_choices(typed, choices or {})
    _check_bounds(typed, ranges or {})
    return typed


_OVERRIDE_KEY = re.compile(r"^[+~]{0,2}([A-Za-z_][\w-]*)")


def refuse_unknown_overrides(argv: list[str], schema: type, *, tool: str) -> None:
    """A command-line `key=value` whose key `schema` lacks is one line listing the tool's own keys (Hydra's
    error would be reported with the training keys). `hydra.*` overrides and flags pass."""
    known = {f.name for f in dataclasses.fields(schema)}
    for arg in argv:
        match = _OVERRIDE_KEY.match(arg)
        if arg.startswith("-") and not arg.startswith(("~", "+")) or "=" not in arg and not arg.startswith("~"):
            continue
        if match and match.group(1) not in known and match.group(1) != "hydra":
            raise UserError(f"unknown config key '{match.group(1)}' for samft.{tool}; its keys: "
                            f"{', '.join(sorted(known))}")
