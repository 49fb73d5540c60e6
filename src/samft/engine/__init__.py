"""Training engine: the Trainer and its parts (optimiser/schedules, checkpoints, metrics, monitoring, loggers)."""

from samft.engine.checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from samft.engine.loggers import NoneLogger, RunLogger, WandbLogger
from samft.engine.loop import CURVES, SUMMARY, EpochCallback, Trainer
from samft.engine.metrics import SegmentationMetrics, ValidationResult, evaluate
from samft.engine.monitor import system_check
from samft.engine.optim import Schedule, build_optimizer, build_scheduler, updates_per_epoch
from samft.engine.settings import TrainSettings

__all__ = [
    "BEST",
    "CURVES",
    "EpochCallback",
    "LATEST",
    "SUMMARY",
    "NoneLogger",
    "RunLogger",
    "Schedule",
    "SegmentationMetrics",
    "TrainSettings",
    "Trainer",
    "ValidationResult",
    "WandbLogger",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "system_check",
    "updates_per_epoch",
]
