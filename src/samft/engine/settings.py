"""The typed settings of a training run, built by `samft.builders.train_settings` from the validated config."""

from __future__ import annotations

from dataclasses import dataclass

from samft.choices import CHOICES, RANGES, describe, within

# TrainSettings field -> the config key whose allowed values (samft.choices) it obeys
_CHOICE_KEYS = {"precision": "hardware.precision", "prompt_mode": "model.prompt_mode", "oom_policy": "oom_policy"}
_RANGE_KEYS = {
    "epochs": "epochs", "patience": "patience", "min_delta": "min_delta", "val_every": "val_every",
    "grad_accum_steps": "optim.grad_accum_steps", "max_grad_norm": "optim.max_grad_norm",
    "ich_loss_weight": "model.ich_loss_weight", "lesion_pos_weight": "model.lesion_pos_weight",
    "max_consecutive_failures": "max_consecutive_failures", "max_steps_per_epoch": "max_steps_per_epoch",
    "stop_after_epoch": "stop_after_epoch", "log_freq": "logger.log_freq",
}
_OPTIONAL = {"max_grad_norm", "max_steps_per_epoch", "stop_after_epoch"}  # None switches them off


@dataclass(frozen=True)
class TrainSettings:
    """What the Trainer needs besides the model, optimiser, scheduler and data.

    `patience` counts validations without an improvement of more than `min_delta` on `monitor` (max mode).
    `val_clicks` are the click counts whose Dice is reported; `monitor="val/dice"` is the Dice after
    `val_clicks[0]` clicks (the whole prompt-free prediction in auto mode). `spacing` (mm) is used for HD95 and
    volumes when a batch carries no affine. `max_steps_per_epoch` caps optimiser updates per epoch. Every
    `log_freq` epochs the curve PNG is redrawn (and at the end) and, with `log_images`, an overlay PNG is saved.
    """

    epochs: int
    seed: int = 0
    patience: int = 15
    min_delta: float = 0.0
    val_every: int = 1
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    precision: str = "fp32"
    device: str = "cpu"
    prompt_mode: str = "click"
    train_clicks: int = 3
    val_clicks: tuple[int, ...] = (1, 3, 5)
    ich_loss_weight: float = 0.0
    lesion_pos_weight: float = 1.0
    batch_dice: bool = False
    oom_policy: str = "skip"
    max_consecutive_failures: int = 5
    max_steps_per_epoch: int | None = None
    stop_after_epoch: int | None = None
    log_images: bool = False
    log_freq: int = 5
    monitor: str = "val/dice"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            f"{name} in {CHOICES[key]}": getattr(self, name) in CHOICES[key] for name, key in _CHOICE_KEYS.items()
        }
        for name, key in _RANGE_KEYS.items():
            value, optional = getattr(self, name), name in _OPTIONAL
            rule = f"{name} {describe(RANGES[key])}" + (" or None" if optional else "")
            checks[rule] = optional if value is None else within(value, RANGES[key])
        checks.update({
            "train_clicks >= 1 in click mode": self.prompt_mode == "auto" or self.train_clicks >= 1,
            "val_clicks non-empty, each >= 1 in click mode": bool(self.val_clicks)
            and (self.prompt_mode == "auto" or min(self.val_clicks) >= 1),
            "three positive spacing values": len(self.spacing) == 3 and min(self.spacing) > 0,
        })
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"TrainSettings: need {'; '.join(failed)}")

    @property
    def train_rounds(self) -> int:
        """Click rounds per training forward; 0 asks the model for one prompt-free round."""
        return 0 if self.prompt_mode == "auto" else self.train_clicks

    @property
    def val_rounds(self) -> int:
        """Click rounds per validation forward (enough for the largest entry of val_clicks)."""
        return 0 if self.prompt_mode == "auto" else max(self.val_clicks)

    @property
    def prompt_free(self) -> bool:
        """Whether each forward also decodes once without prompts beside the click rounds (prompt_mode=both)."""
        return self.prompt_mode == "both"
