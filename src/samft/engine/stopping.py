"""Early stopping on a monitored metric that should increase (max mode)."""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    """Counts validations without an improvement of more than `min_delta` over the best value so far."""

    def __init__(self, *, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_validations = 0

    def update(self, value: float, *, epoch: int) -> bool:
        """Record one validation; True when it is a new best."""
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_validations = value, epoch, 0
            return True
        self.bad_validations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_validations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_validations = state["best"], state["best_epoch"], state["bad_validations"]
