"""Training engine: the Trainer and its parts (optimiser/schedules, checkpoints, metrics, monitoring, loggers)."""

from samft.engine.checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from samft.engine.loggers import (
    CSVLogger,
    MLflowLogger,
    MultiLogger,
    NoneLogger,
    RunLogger,
    TensorBoardLogger,
    WandbLogger,
    default_tracking_uri,
    tracker_key,
)
from samft.engine.loop import CURVES, SUMMARY, EpochCallback, Trainer
from samft.engine.metrics import SegmentationMetrics, ValidationResult, validate_crops
from samft.engine.monitor import system_check
from samft.engine.optim import Schedule, build_optimizer, build_scheduler, updates_per_epoch
from samft.engine.settings import TrainSettings

__all__ = [
    "BEST",
    "CSVLogger",
    "CURVES",
    "EpochCallback",
    "LATEST",
    "MLflowLogger",
    "MultiLogger",
    "SUMMARY",
    "NoneLogger",
    "RunLogger",
    "Schedule",
    "SegmentationMetrics",
    "TensorBoardLogger",
    "TrainSettings",
    "Trainer",
    "ValidationResult",
    "WandbLogger",
    "build_optimizer",
    "build_scheduler",
    "default_tracking_uri",
    "load_checkpoint",
    "save_checkpoint",
    "system_check",
    "tracker_key",
    "updates_per_epoch",
    "validate_crops",
]
