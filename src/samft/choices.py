"""The allowed values and numeric ranges of every setting, written once.

`samft.config` checks the composed config against them before any data is read; the modules that take a setting
(`engine.settings`, `engine.optim`, `data.transforms`, `data.datamodule`, `sweep.pruning`, the inference tools)
import their names from here. This module imports nothing, so any floor of the package may import it.
"""

from __future__ import annotations

# The trackers `logger=<name>` selects alone and `logger=many logger.loggers=[...]` combines.
LOGGER_TRACKERS = ("wandb", "tensorboard", "mlflow", "csv")
INTENSITIES = ("window", "nnunet")
CACHES = ("none", "memory", "disk")
PROMPT_MODES = ("click", "auto", "both")
SCHEDULERS = ("plateau", "cosine", "poly", "step")
PRECISIONS = ("fp32", "bf16", "fp16")
# predict and evaluate: auto = the run's precision on CUDA, fp32 on a CPU
INFERENCE_PRECISIONS = ("auto", *PRECISIONS)
PRUNERS = ("none", "median", "hyperband")
OOM_POLICIES = ("skip", "halve")
# predict, evaluate and baseline: what to do with NaN or Inf voxels in a scan
NONFINITE_POLICIES = ("refuse", "zero")
DEFAULT_MAX_VOXELS = 400_000_000
"""A scan's voxels (declared in its header, and on the resampled grid) above which the inference tools refuse it:
1.6 GB as float32, about a 512 x 512 x 1500 CT."""

# model.name values whose model takes no click prompts (their class says `takes_clicks = False`; the config is
# checked before torch is imported, so it reads this list, and tests/test_model_facts.py checks the two agree)
PROMPT_FREE_MODELS = ("unet",)

# dotted config key -> allowed values
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("demo", "csv", "ct_ich", "nifti"),
    "data.intensity": INTENSITIES,
    "data.cache": CACHES,
    "data.on_bad_sample": ("error", "skip"),
    "model.name": ("sam_med3d", "sam_med3d_tiny", "unet"),
    "model.prompt_mode": PROMPT_MODES,
    "optim.name": ("adamw",),
    "scheduler.name": SCHEDULERS,
    "model.unet.norm": ("instance", "batch"),
    "model.refine_norm": ("instance", "batch"),
    "hardware.device": ("cpu", "cuda", "auto"),
    "hardware.precision": PRECISIONS,
    "hardware.backend": ("auto", "nccl", "gloo"),
    "logger.name": ("none", *LOGGER_TRACKERS, "many"),
    "logger.mode": ("online", "offline", "disabled"),
    "trial.pruner": PRUNERS,
    "oom_policy": OOM_POLICIES,
}

Bound = tuple[float | None, float | None, bool]
"""(lowest allowed, highest allowed, whether the lowest is excluded); None: unbounded on that side."""

# dotted config key -> Bound
RANGES: dict[str, Bound] = {
    "data.batch_size": (1, None, False),
    "data.demo_patients": (3, None, False),
    "data.val_fraction": (0.0, 1.0, True),
    "data.fg_oversample": (0.0, 1.0, False),
    "model.refine_crop_lesion_share": (0.0, 1.0, False),
    "model.refine_cell_mlp": (0, None, False),
    "data.aug_prob": (0.0, 1.0, False),
    "data.affine_prob": (0.0, 1.0, False),
    "data.window_width": (0.0, None, True),
    "model.visual_tokens": (1, None, False),
    "model.ich_loss_weight": (0.0, None, False),
    "model.lesion_pos_weight": (0.0, None, True),
    "model.train_clicks": (1, None, False),
    "optim.lr": (0.0, 1.0, True),
    "optim.weight_decay": (0.0, None, False),
    "optim.grad_accum_steps": (1, None, False),
    "optim.max_grad_norm": (0.0, None, True),
    "optim.encoder_lr_mult": (0.0, None, False),
    "scheduler.factor": (0.0, 1.0, True),
    "scheduler.plateau_patience": (0, None, False),
    "scheduler.warmup_epochs": (0, None, False),
    "scheduler.min_lr": (0.0, None, False),
    "scheduler.step_size": (1, None, False),
    "scheduler.gamma": (0.0, 1.0, True),
    "hardware.num_workers": (0, None, False),
    "hardware.cpu_threads": (1, None, False),
    "val_scans": (1, None, False),
    "val_overlap": (0.0, 1.0, False),
    "scheduler.exponent": (0.0, None, True),
    "model.unet.num_res_units": (0, None, False),
    "hardware.nproc_per_node": (1, None, False),
    "hardware.timeout_min": (0.0, None, True),
    "logger.log_freq": (1, None, False),
    "epochs": (1, None, False),
    "patience": (1, None, False),
    "min_delta": (0.0, None, False),
    "val_every": (1, None, False),
    "max_steps_per_epoch": (1, None, False),
    "stop_after_epoch": (1, None, False),
    "max_consecutive_failures": (1, None, False),
    "seed": (0, 2**32 - 1, False),
    # a sweep's hparams_search.pruner_warmup_epochs and pruner_startup_trials, as each trial's job receives them
    "trial.pruner_warmup_epochs": (0, None, False),
    "trial.pruner_startup_trials": (0, None, False),
}

# conf/predict.yaml, evaluate.yaml, baseline.yaml: the keys of every tool that reads scans (config.ScanToolConfig),
# and of the tools that also run a model (config.ModelToolConfig)
SCAN_TOOL_CHOICES: dict[str, tuple[str, ...]] = {"nonfinite": NONFINITE_POLICIES}
SCAN_TOOL_RANGES: dict[str, Bound] = {"max_voxels": (1, None, False)}
MODEL_TOOL_CHOICES: dict[str, tuple[str, ...]] = {**SCAN_TOOL_CHOICES, "precision": INFERENCE_PRECISIONS}
MODEL_TOOL_RANGES: dict[str, Bound] = {
    "threshold": (0.0, 1.0, True), "overlap": (0.0, None, False), "sw_batch_size": (1, None, False),
    **SCAN_TOOL_RANGES,
}


def describe(bound: Bound) -> str:
    """The rule `bound` states, e.g. '>= 1' or '> 0.0 and <= 1.0'."""
    low, high, low_open = bound
    lower = None if low is None else f"> {low}" if low_open else f">= {low}"
    upper = None if high is None else f"<= {high}"
    return " and ".join(part for part in (lower, upper) if part)


def within(value: float, bound: Bound) -> bool:
    """Whether `value` obeys `bound`."""
    low, high, low_open = bound
    too_low = low is not None and (value <= low if low_open else value < low)
    return not too_low and not (high is not None and value > high)
