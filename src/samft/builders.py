"""Translate the validated config into the typed objects the engine takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from samft.data.transforms import Preprocessing
from samft.engine import (
    CURVES,
    CSVLogger,
    MLflowLogger,
    MultiLogger,
    NoneLogger,
    RunLogger,
    Schedule,
    TensorBoardLogger,
    TrainSettings,
    WandbLogger,
    build_optimizer,
    build_scheduler,
    default_tracking_uri,
    updates_per_epoch,
)
from samft.model import param_groups


def preprocessing(data: DictConfig, norm_stats: dict[str, float] | None) -> Preprocessing:
    """The one preprocessing definition for training, validation and prediction."""
    return Preprocessing.from_config(data, norm_stats)


def train_settings(cfg: DictConfig, device: torch.device) -> TrainSettings:
    return TrainSettings(
        epochs=cfg.epochs, seed=cfg.seed, patience=cfg.patience, min_delta=cfg.min_delta, val_every=cfg.val_every,
        grad_accum_steps=cfg.optim.grad_accum_steps, max_grad_norm=cfg.optim.max_grad_norm,
        precision=cfg.hardware.precision, device=str(device), prompt_mode=cfg.model.prompt_mode,
        train_clicks=cfg.model.train_clicks, val_clicks=tuple(cfg.model.val_clicks),
        ich_loss_weight=cfg.model.ich_loss_weight,
        lesion_pos_weight=cfg.model.lesion_pos_weight, batch_dice=cfg.model.batch_dice, oom_policy=cfg.oom_policy,
        max_consecutive_failures=cfg.max_consecutive_failures, max_steps_per_epoch=cfg.max_steps_per_epoch,
        stop_after_epoch=cfg.stop_after_epoch,
        log_images=cfg.logger.log_images, log_freq=cfg.logger.log_freq, spacing=tuple(cfg.data.spacing),
    )


def optimizer_and_scheduler(
    cfg: DictConfig, model: torch.nn.Module, *, batches_per_epoch: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    groups = param_groups(
        model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, encoder_lr_mult=cfg.optim.encoder_lr_mult
    )
    optimizer = build_optimizer(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                betas=tuple(cfg.optim.betas))
    steps = updates_per_epoch(batches_per_epoch, grad_accum_steps=cfg.optim.grad_accum_steps,
                              max_steps_per_epoch=cfg.max_steps_per_epoch)
    s = cfg.scheduler
    scheduler = build_scheduler(
        s.name, optimizer, epochs=cfg.epochs, steps_per_epoch=steps, warmup_epochs=s.warmup_epochs,
        min_lr=s.min_lr, exponent=s.exponent,
        factor=s.factor, plateau_patience=s.plateau_patience, step_size=s.step_size, gamma=s.gamma,
    )
    return optimizer, scheduler


def build_logger(logger: DictConfig, *, run_dir: Path, config: dict[str, Any]) -> RunLogger:
    """The tracker `logger.name` selects, or a MultiLogger over `logger.loggers` for logger=many. `config` is the
    resolved config the trackers record (each redacts it again); the default MLflow store sits in its
    `output_dir`."""
    names = list(logger.loggers) if logger.name == "many" else [logger.name]
    built = [_one_logger(name, logger, run_dir=run_dir, config=config) for name in names if name != "none"]
    if not built:
        return NoneLogger()
    return built[0] if len(built) == 1 else MultiLogger(built)


def _one_logger(name: str, logger: DictConfig, *, run_dir: Path, config: dict[str, Any]) -> RunLogger:
    if name == "wandb":
        return WandbLogger(project=logger.project, entity=logger.entity, tags=list(logger.tags), mode=logger.mode,
                           run_dir=run_dir, config=config)
    if name == "tensorboard":
        return TensorBoardLogger(log_dir=run_dir / "tensorboard", config=config)
    if name == "csv":
        return CSVLogger(path=run_dir / "metrics.csv")
    if name == "mlflow":
        uri = logger.tracking_uri or default_tracking_uri(Path(config.get("output_dir") or run_dir))
        return MLflowLogger(tracking_uri=uri, experiment=logger.project, run_dir=run_dir, run_name=logger.run_name,
                            tags=list(logger.tags), config=config, artifacts=(CURVES,))
    raise ValueError(f"unknown tracker {name!r}")  # config.validate admits only LOGGER_TRACKERS
