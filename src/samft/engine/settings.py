"""The typed settings of a training run, built by train.py from the config."""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
PROMPT_MODES = ("click", "auto", "both")
OOM_POLICIES = ("skip", "halve")


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
            "epochs >= 1": self.epochs >= 1,
            "patience >= 1": self.patience >= 1,
            "min_delta >= 0": self.min_delta >= 0,
            "val_every >= 1": self.val_every >= 1,
            "grad_accum_steps >= 1": self.grad_accum_steps >= 1,
            "max_grad_norm > 0 or None": self.max_grad_norm is None or self.max_grad_norm > 0,
            f"precision in {PRECISIONS}": self.precision in PRECISIONS,
            f"prompt_mode in {PROMPT_MODES}": self.prompt_mode in PROMPT_MODES,
            "train_clicks >= 1 in click mode": self.prompt_mode == "auto" or self.train_clicks >= 1,
            "val_clicks non-empty, each >= 1 in click mode": bool(self.val_clicks)
            and (self.prompt_mode == "auto" or min(self.val_clicks) >= 1),
            "ich_loss_weight >= 0": self.ich_loss_weight >= 0,
            "lesion_pos_weight > 0": self.lesion_pos_weight > 0,
            f"oom_policy in {OOM_POLICIES}": self.oom_policy in OOM_POLICIES,
            "max_consecutive_failures >= 1": self.max_consecutive_failures >= 1,
            "max_steps_per_epoch >= 1 or None": self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "stop_after_epoch >= 1 or None": self.stop_after_epoch is None or self.stop_after_epoch >= 1,
            "log_freq >= 1": self.log_freq >= 1,
            "three positive spacing values": len(self.spacing) == 3 and min(self.spacing) > 0,
        }
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
