"""One training run: validated config -> data, model, optimiser, Trainer -> run directory -> objective.

This is the only module besides the entry points that reads the DictConfig; everything it builds takes
typed arguments.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from samft.config import risky_settings, validate
from samft.errors import UserError
from samft.provenance import provenance

log = logging.getLogger("samft")


def train(cfg: DictConfig) -> float:
    """Run one training job and return the best validation metric (always finite, for Optuna)."""
    typed = validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return train_in(typed, run_dir)


def train_in(cfg: DictConfig, run_dir: Path) -> float:
    """Train with an already validated config into `run_dir`; see `train`."""
    import torch

    from samft.builders import build_logger, optimizer_and_scheduler, preprocessing, train_settings
    from samft.data.datamodule import build_dataloaders
    from samft.data.records import load_records
    from samft.engine import Trainer, system_check
    from samft.export import save_encoder
    from samft.model import build_model
    from samft.seeding import seed_everything

    run_dir.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.hardware.device)
    for warning in risky_settings(cfg) + system_check(run_dir, device=str(device)):
        log.warning(warning)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    seed_everything(cfg.seed, deterministic=cfg.hardware.deterministic)

    data = load_records(cfg.data, seed=cfg.seed, run_dir=run_dir)
    train_loader, val_loader = build_dataloaders(
        train_records=data.train, val_records=data.val, preprocessing=preprocessing(cfg.data, data.norm_stats),
        batch_size=cfg.data.batch_size, num_workers=cfg.hardware.num_workers, cache=cfg.data.cache,
        cache_dir=cfg.data.cache_dir or run_dir / "cache", seed=cfg.seed,
        pin_memory=cfg.hardware.pin_memory and device.type == "cuda",
    )
    model = build_model(
        name=cfg.model.name, visual_tokens=cfg.model.visual_tokens,
        gradient_checkpointing=cfg.model.gradient_checkpointing, checkpoint=cfg.model.checkpoint,
        freeze_encoder=cfg.model.freeze_encoder,
    ).to(device)
    if getattr(model, "img_size", cfg.data.roi_size) != cfg.data.roi_size:
        raise UserError(f"data.roi_size={cfg.data.roi_size} but model={cfg.model.name} takes "
                        f"{model.img_size}^3 crops; set data.roi_size={model.img_size}")
    optimizer, scheduler = optimizer_and_scheduler(cfg, model, batches_per_epoch=len(train_loader))
    settings = train_settings(cfg, device)
    resume_from = _resume_path(cfg.resume, run_dir)
    logger = build_logger(cfg.logger, run_dir=run_dir, config=resolved)
    extra = {**provenance(cfg.seed), "skipped_samples": data.skipped, "data_warnings": data.warnings}
    try:
        trainer = Trainer(
            model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
            val_loader=val_loader, settings=settings, run_dir=run_dir, logger=logger,
            resolved_config=resolved, extra_summary=extra, epoch_callback=_pruning_callback(cfg),
        )
        summary = trainer.fit(resume_from=resume_from)
    finally:
        logger.close()
    best = run_dir / "best_model.pth"
    if best.exists():
        state = torch.load(best, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    if hasattr(model, "image_encoder"):  # SAM models; the U-Net baseline has no encoder to export
        save_encoder(model, run_dir / "sam_encoder.pth", model_name=cfg.model.name,
                     visual_tokens=cfg.model.visual_tokens)
    objective = summary["best_metric"]
    print(f"run directory: {run_dir}")
    shown = "none (no validation finished)" if objective is None else f"{objective:.4f} (epoch {summary['best_epoch']})"
    print(f"best {summary['metric_name']}: {shown}, stop reason: {summary['stop_reason']}")
    if summary["stop_reason"] == "pruned":
        _raise_pruned(cfg)
    if objective is None or not math.isfinite(objective):
        raise UserError(f"run {run_dir} stopped ({summary['stop_reason']}) without a finite {summary['metric_name']}; "
                        "its log and summary.json say why, and resume=auto continues it")
    return objective


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("hardware.device=cuda but no CUDA GPU is visible; use hardware=cpu")
    return torch.device(name)


def _resume_path(resume: str, run_dir: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        latest = run_dir / "latest_model.pth"
        return latest if latest.exists() else None
    return Path(resume)


def _pruning_callback(cfg: DictConfig):
    if cfg.trial.number is None or cfg.trial.pruner == "none":
        return None
    from samft.sweep.pruning import TrialReporter

    return TrialReporter(
        storage=cfg.trial.storage, study_name=cfg.trial.study_name, number=cfg.trial.number,
        pruner=cfg.trial.pruner,
    )


def _raise_pruned(cfg: DictConfig) -> None:
    import optuna

    raise optuna.TrialPruned(f"trial {cfg.trial.number} pruned")
