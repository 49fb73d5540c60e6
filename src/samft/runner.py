"""One training run: validated config -> data, model, optimiser, Trainer -> run directory -> objective.

This is the only module besides the entry points that reads the DictConfig; everything it builds takes
typed arguments. With `hardware.distributed=true` every rank runs `train_this_process` (samft.distributed says
how the ranks are started); rank 0 alone reads the data sources and writes files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from samft import distributed
from samft.cli import in_multirun
from samft.config import refuse_list_selection, risky_settings, validate
from samft.errors import UserError
from samft.provenance import provenance
from samft.redact import redact

log = logging.getLogger("samft")


def train(cfg: DictConfig) -> float:
    """Run one training job and return the best validation metric (always finite, for Optuna)."""
    hydra_cfg = HydraConfig.get()
    refuse_list_selection(list(hydra_cfg.overrides.task))
    return run_training(validate(cfg), Path(hydra_cfg.runtime.output_dir))


def run_training(cfg: DictConfig, run_dir: Path) -> float:
    """Train with an already validated config into `run_dir`: in this process, or with hardware.distributed on
    every rank (see `_train_distributed`)."""
    if cfg.hardware.distributed:
        return _train_distributed(cfg, run_dir)
    return train_this_process(cfg, run_dir)


def _train_distributed(cfg: DictConfig, run_dir: Path) -> float:
    """Join the ranks started by torchrun or submitit, or spawn `hardware.nproc_per_node` local workers.

    Spawned workers get the config as plain data (a DictConfig still refers to Hydra, which they lack) and the
    parent returns rank 0's objective, so `-m` sweeps see one job per trial.
    """
    device_type = _device(cfg.hardware.device).type
    backend = distributed.backend_for(cfg.hardware.backend, device_type)
    timeout = cfg.hardware.timeout_min
    launcher = distributed.external_launcher()
    if launcher is None:
        nprocs, gpus = cfg.hardware.nproc_per_node, _gpu_count()
        if backend == "nccl" and nprocs > gpus:  # NCCL needs a GPU per rank; gloo may share one
            raise UserError(f"hardware.nproc_per_node={nprocs} but {gpus} GPUs are visible; "
                            f"set hardware.nproc_per_node={gpus} or fewer")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        return distributed.spawn(_train_spawned, args=(resolved, str(run_dir)), nprocs=nprocs, backend=backend,
                                 timeout_min=timeout)
    if launcher == "torchrun" and in_multirun():
        raise UserError("torchrun with -m runs one sweep per rank; sweep without torchrun "
                        "(hardware=ddp spawns each trial's workers) or with hydra/launcher=slurm")
    if launcher == "submitit":
        distributed.export_submitit_environment()
    with distributed.process_group(backend=backend, timeout_min=timeout):
        distributed.keep_logs_on_main()
        return train_this_process(cfg, distributed.agree_on_run_dir(run_dir))


def _train_spawned(resolved: dict, run_dir: str) -> float:
    """One spawned rank (its process group is up): `train_this_process` with the config rebuilt from plain data."""
    # MONAI imports optuna and so alembic, which logs its set-up at INFO; a Hydra parent imported it before
    # configuring logging, a worker after.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return train_this_process(validate(OmegaConf.create(resolved)), Path(run_dir))


def train_this_process(cfg: DictConfig, run_dir: Path) -> float:
    """This process's part of a run (the whole run without a process group); see `run_training`."""
    from samft.builders import build_logger, optimizer_and_scheduler, preprocessing, train_settings
    from samft.data.datamodule import build_dataloaders, default_num_workers
    from samft.data.records import load_records
    from samft.devices import available_cpus, set_cpu_threads
    from samft.engine import Trainer, system_check
    from samft.engine.validation import ScanValidation
    from samft.model import build_model_from_config
    from samft.seeding import seed_everything

    main = distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.hardware.device)
    if device.type == "cuda" and distributed.is_active():
        device = distributed.cuda_device()
    workers = default_num_workers() if cfg.hardware.num_workers is None else cfg.hardware.num_workers
    busy_workers = workers if cfg.data.cache == "none" else 0  # cached scans leave the workers light
    threads = set_cpu_threads(cfg.hardware.cpu_threads, usable_cpus=available_cpus(), busy_workers=busy_workers,
                              processes=distributed.local_world_size())
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))  # no URL password in any file or tracker
    if main:
        for warning in risky_settings(cfg) + system_check(run_dir, device=str(device)):
            log.warning(warning)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    seed_everything(cfg.seed, deterministic=cfg.hardware.deterministic)

    # Rank 0 reads, checks and describes the data (writing stats.json); the other ranks take its records.
    data = distributed.broadcast(load_records(cfg.data, seed=cfg.seed, run_dir=run_dir) if main else None)
    prep = preprocessing(cfg.data, data.norm_stats)
    loaders = build_dataloaders(
        train_records=data.train, val_records=data.val, preprocessing=prep,
        batch_size=cfg.data.batch_size, num_workers=workers, cache=cfg.data.cache,
        cache_dir=cfg.data.cache_dir or run_dir / "cache", seed=cfg.seed,
        pin_memory=cfg.hardware.pin_memory and device.type == "cuda", distributed=distributed.is_active(),
        progress=main, val_limit=cfg.val_scans,
    )
    scan_validation = ScanValidation(
        scans=loaders.val_scans, transform=prep.transforms("val"), records=data.val, roi_size=prep.roi,
        overlap=cfg.val_overlap, air=prep.air, prompt_mode=cfg.model.prompt_mode, limit=cfg.val_scans,
    )
    model = build_model_from_config(cfg.model).to(device)
    _freeze_heads_without_loss(model, ich_loss_weight=cfg.model.ich_loss_weight)
    optimizer, schedule = optimizer_and_scheduler(cfg, model, batches_per_epoch=len(loaders.train))
    settings = train_settings(cfg, device)
    resume_from = distributed.broadcast(_resume_path(cfg.resume, run_dir))
    logger = build_logger(cfg.logger, run_dir=run_dir, config=resolved)
    extra = {**provenance(cfg.seed), "cpu_threads": threads, "loader_workers": workers,
             "skipped_samples": data.skipped, "data_warnings": data.warnings}
    wrapped = distributed.wrap_model(model, device=device, find_unused_parameters=model.has_unused_parameters)
    trainer = Trainer(
        model=wrapped, optimizer=optimizer, schedule=schedule, train_loader=loaders.train,
        val_loader=loaders.val, settings=settings, run_dir=run_dir, logger=logger,
        resolved_config=resolved, extra_summary=extra, epoch_callback=_pruning_callback(cfg) if main else None,
        scan_validation=scan_validation,
    )
    summary = trainer.fit(resume_from=resume_from)  # starts the logger and closes it, also on failure
    if main:
        _finish(cfg, model, run_dir, summary, scan_validation=scan_validation)
    objective = summary["best_metric"]
    if summary["stop_reason"] == "pruned":
        _raise_pruned(cfg)
    if objective is None and summary["stop_reason"] == "stopped_after_epoch":
        return math.nan  # time-boxed before its first validation: not a failure (a sweep still marks it FAIL)
    if objective is None or not math.isfinite(objective):
        raise UserError(f"run {run_dir} stopped ({summary['stop_reason']}) without a finite {summary['metric_name']}; "
                        "its log and summary.json say why, and resume=auto continues it")
    return objective


def _finish(cfg: DictConfig, model, run_dir: Path, summary: dict, *, scan_validation) -> None:
    """Rank 0: decide the post-processing from the best validation's scores, export the encoder with the best
    weights, and print where the run is and how it ended."""
    import torch

    from samft.export import save_encoder

    best = run_dir / "best_model.pth"
    if best.exists():
        state = torch.load(best, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        _decide_postprocessing(state.get("best_cases", []), monitored_mode=scan_validation.monitored_mode,
                               run_dir=run_dir)
    if model.exports_encoder:
        save_encoder(model, run_dir / "sam_encoder.pth", model_name=cfg.model.name,
                     visual_tokens=cfg.model.visual_tokens)
    objective = summary["best_metric"]
    print(f"run directory: {run_dir}")
    shown = "none (no validation finished)" if objective is None else f"{objective:.4f} (epoch {summary['best_epoch']})"
    print(f"best {summary['metric_name']}: {shown}, stop reason: {summary['stop_reason']}")


def _decide_postprocessing(cases: list[dict], *, monitored_mode: str, run_dir: Path) -> None:
    """Choose the minimum component volume from the best validation's whole-scan rows (the monitored mode; each
    row holds its Dice by candidate, scored when that validation ran) and store it in postprocessing.json, which
    samft.predict and samft.evaluate apply."""
    from samft import postprocess

    rows = [r for r in cases if r["mode"] == monitored_mode]
    if not rows:
        return
    decision = postprocess.choose({c: [r["dice_by_min_ml"][str(c)] for r in rows] for c in postprocess.CANDIDATES_ML})
    postprocess.save(run_dir, decision)
    log.info("post-processing: drop predicted components under %g ml (mean validation Dice by minimum volume: %s)",
             decision["min_component_ml"], decision["mean_dice_by_min_component_ml"])


def _device(name: str):
    from samft.devices import resolve_device

    return resolve_device(name, key="hardware.device")


def _freeze_heads_without_loss(model, *, ich_loss_weight: float) -> None:
    """With ich_loss_weight=0 no loss reaches the model's `ich_heads` (SAM-Med3D: the ICH head and the
    representation head feeding it). Frozen, they stay out of the optimiser (as in one process, where they get no
    gradient) and out of DDP's gradient sync, which would otherwise wait for them, because `segment` still returns
    the ICH logit."""
    if ich_loss_weight == 0:
        for name in model.ich_heads:
            getattr(model, name).requires_grad_(False)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


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
        pruner=cfg.trial.pruner, warmup_epochs=cfg.trial.pruner_warmup_epochs,
        startup_trials=cfg.trial.pruner_startup_trials, epochs=cfg.epochs,
    )


def _raise_pruned(cfg: DictConfig) -> None:
    import optuna

    raise optuna.TrialPruned(f"trial {cfg.trial.number} pruned")
