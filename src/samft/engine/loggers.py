"""Experiment trackers behind one small protocol: no logging, or Weights & Biases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class RunLogger(Protocol):
    """What the Trainer calls. `start` receives the run id saved in a resumed checkpoint (None for a new run);
    `run_id` is stored in every checkpoint so a resumed run continues the same tracker run."""

    @property
    def run_id(self) -> str | None: ...

    def start(self, *, run_id: str | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NoneLogger:
    """Logs nothing (summary.json and the python log still record the run)."""

    run_id: str | None = None

    def start(self, *, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        pass

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class WandbLogger:
    """Weights & Biases: the resolved config at start, metrics and images per epoch (step = epoch), the summary
    at the end. A resumed run passes the saved id to `wandb.init(id=..., resume="allow")`.

    mode: "online", "offline" (no network; `wandb sync` later) or "disabled". Files go to `run_dir/wandb`.
    """

    def __init__(
        self,
        *,
        project: str,
        entity: str | None = None,
        tags: Sequence[str] = (),
        mode: str = "online",
        run_dir: Path,
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.project, self.entity, self.tags, self.mode = project, entity, list(tags), mode
        self.run_dir = Path(run_dir)
        self.config = dict(config or {})
        self._run_id = run_id
        self._run: Any = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def start(self, *, run_id: str | None = None) -> None:
        import wandb  # slow to import; only runs that use it pay

        run_id = run_id or self._run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            tags=self.tags,
            mode=self.mode,
            dir=str(self.run_dir),
            config=self.config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self._run_id = self._run.id

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        import wandb

        self._run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._run.summary.update({k: v for k, v in summary.items() if k != "history"})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
