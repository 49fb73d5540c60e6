"""Experiment trackers behind one small protocol: none, Weights & Biases, TensorBoard, MLflow, CSV, or several.

Every tracker receives the same metric names, made by `tracker_key` (MLflow refuses `@`: `val/dice@1` is logged
as `val/dice_at_1` everywhere), and configs and summaries pass through `samft.redact.redact` first, so no URL
password reaches a tracker. summary.json and the run log keep the original names.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from samft.errors import UserError
from samft.redact import redact

log = logging.getLogger(__name__)

_REFUSED = re.compile(r"[^A-Za-z0-9_\-./ ]")


def tracker_key(name: str) -> str:
    """The name a metric or parameter gets in every tracker: `@` becomes `_at_` (`val/dice@1` ->
    `val/dice_at_1`), any other character outside ASCII letters, digits, `_ - . /` and space becomes `_`, and
    empty, `.` and `..` path parts are dropped (MLflow refuses names that resolve to another path).
    Names that already fit are returned unchanged."""
    mapped = _REFUSED.sub("_", name.replace("@", "_at_"))
    parts = [part for part in mapped.split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or "_"


def tracker_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` with `tracker_key` names; two names that map to one are an error, not a silent overwrite."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        mapped = tracker_key(key)
        if mapped in out:
            raise ValueError(f"metrics '{key}' and another name both map to '{mapped}' (samft.engine.tracker_key)")
        out[mapped] = value
    return out


def own_run_id(name: str, saved: str | None) -> str | None:
    """This tracker's id out of the `run_id` a checkpoint saved: a plain id (one tracker) or the JSON object of
    `MultiLogger` (`{"mlflow": "...", "wandb": "..."}`)."""
    if saved is None:
        return None
    try:
        decoded = json.loads(saved)
    except ValueError:
        return saved
    return decoded.get(name) if isinstance(decoded, dict) else saved


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"optim.lr": "0.0001", "data.spacing": "[1.5, 1.5, 1.5]"} (strings as they are, other
    values as JSON), the form trackers take parameters in."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class RunLogger(Protocol):
    """What the Trainer calls. `start` receives the run id saved in a resumed checkpoint (None for a new run);
    `run_id` is stored in every checkpoint so a resumed run continues the same tracker run. `step` is the epoch.
    `close` may be called more than once. `name` keys the tracker's id inside a MultiLogger's `run_id`."""

    name: str

    @property
    def run_id(self) -> str | None: ...

    def start(self, *, run_id: str | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NoneLogger:
    """Logs nothing (summary.json and the python log still record the run)."""

    name = "none"
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

    name = "wandb"

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
        self.config = redact(dict(config or {}))
        self._run_id = run_id
        self._run: Any = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def start(self, *, run_id: str | None = None) -> None:
        import wandb  # slow to import; only runs that use it pay

        run_id = own_run_id(self.name, run_id) or self._run_id
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
        self._run.log(tracker_metrics(metrics), step=step)

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        import wandb

        self._run.log({tracker_key(key): wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._run.summary.update({tracker_key(k): v for k, v in redact(dict(summary)).items() if k != "history"})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class TensorBoardLogger:
    """TensorBoard event files in `log_dir` (the run directory's `tensorboard/`): scalars per epoch, images, the
    redacted config (text, at a new run's start) and the summary (text).

    A session's first logged step purges any events from that step on (SummaryWriter's `purge_step`), so a resumed
    run, or a new run started in the same folder, never shows an epoch twice.
    """

    name = "tensorboard"
    run_id: str | None = None  # the event files live in the run directory; nothing to reconnect to

    def __init__(self, *, log_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.config = redact(dict(config or {}))
        self._writer: Any = None

    def start(self, *, run_id: str | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _writer_from(self, step: int | None) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only runs that use it pay

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
            if step is not None and step <= 1 and self.config:
                self._writer.add_text("config", _markdown_json(self.config), global_step=0)
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        writer = self._writer_from(step)
        for key, value in tracker_metrics(metrics).items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        import matplotlib.image

        writer = self._writer_from(step)
        for key, path in images.items():
            pixels = matplotlib.image.imread(str(path))  # H x W x C, floats in [0, 1] for PNG
            writer.add_image(tracker_key(key), pixels[..., :3], global_step=step, dataformats="HWC")
        writer.flush()

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        shown = {k: v for k, v in redact(dict(summary)).items() if k != "history"}
        step = int(summary.get("epochs_run") or 0)
        self._writer_from(None).add_text("summary", _markdown_json(shown), global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CSVLogger:
    """`path` (the run directory's `metrics.csv`): one row per epoch, an `epoch` column and one column per metric
    (`tracker_key` names); a metric missing in an epoch (validation every few epochs) is an empty cell.

    A session's first logged step drops the file's rows from that step on, so a resumed run appends where its
    checkpoint left off without duplicating an epoch, and a new run in the same folder starts a new table. The
    file is rewritten atomically each epoch (its columns can grow), so a crash never leaves half a row.
    """

    name = "csv"
    run_id: str | None = None

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, str]] | None = None

    def start(self, *, run_id: str | None = None) -> None:
        self._rows = None

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        if self._rows is None:  # first row of this session
            self._rows = [row for row in self._read() if int(row["epoch"]) < step]
        row = {"epoch": str(step)}
        row.update({k: _cell(v) for k, v in tracker_metrics(metrics).items() if k != "epoch"})
        self._rows.append(row)
        self._write(self._rows)

    def _read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]

    def _write(self, rows: list[dict[str, str]]) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        pass  # the images stay in the run directory's images/

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass  # summary.json beside it holds the summary

    def close(self) -> None:
        self._rows = None


def default_tracking_uri(output_dir: Path) -> str:
    """One MLflow store for all runs under `output_dir`, so `mlflow ui` compares them."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MLflowLogger:
    """MLflow through `MlflowClient` (no global active run, so sweeps and tests do not interfere): the flattened,
    redacted config as params, per-epoch metrics (`tracker_key` names), images and, at the end, summary.json
    (redacted) and `artifacts` of the run directory (the curves PNG) as artifacts and the best metric.

    tracking_uri: `sqlite:///path.db` (artifacts in `mlartifacts/` beside the database), a folder (MLflow's
    file store) or a server `http(s)://host:port`. A resumed run continues the run whose id the checkpoint holds.
    """

    name = "mlflow"

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        artifacts: Sequence[str] = (),
    ) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise UserError("logger=mlflow needs MLflow: pip install -e '.[mlflow]' (or pip install mlflow)")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.run_name = run_name or self.run_dir.name
        self.tags = list(tags)
        self.params = {tracker_key(k): v for k, v in flatten(redact(dict(config or {}))).items()}
        self.artifacts = list(artifacts)
        self._client: Any = None
        self._run_id: str | None = None
        self._status = "FAILED"  # until a summary arrives: a run that raised ends FAILED in MLflow

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def start(self, *, run_id: str | None = None) -> None:
        # Hospitals may forbid any traffic beyond their own tracking server: MLflow's usage telemetry stays off
        # unless the user switched it on.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if "://" not in self.tracking_uri:
            # A folder is MLflow's file store, which MLflow 3 accepts only when asked explicitly; here it was.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        saved = own_run_id(self.name, run_id)
        existing: dict[str, str] = {}
        if saved is not None:
            try:
                existing = dict(self._client.get_run(saved).data.params)
            except MlflowException:
                log.warning("MLflow run %s is not in %s; starting a new MLflow run", saved, redact(self.tracking_uri))
                saved = None
        if saved is None:
            run = self._client.create_run(
                self._experiment_id(), run_name=self.run_name,
                tags={"samft.run_dir": str(self.run_dir.resolve()), **{tracker_key(t): "true" for t in self.tags}},
            )
            self._run_id = run.info.run_id
        else:
            self._run_id = saved
            self._client.update_run(saved, status="RUNNING")
        self._log_params(existing)
        log.info("MLflow run %s in experiment '%s' at %s", self._run_id, self.experiment, redact(self.tracking_uri))

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):
                database = Path(self.tracking_uri.removeprefix("sqlite:///")).resolve()
                location = (database.parent / "mlartifacts").as_uri()
            try:
                return self._client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException:  # another sweep worker created it a moment ago
                found = self._client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment '{self.experiment}' is deleted in {redact(self.tracking_uri)}; "
                            "restore it (mlflow experiments restore) or choose another logger.project")
        return found.experiment_id

    def _log_params(self, existing: Mapping[str, str]) -> None:
        """Params not yet in the run; a resumed run whose settings changed (e.g. stop_after_epoch) keeps the first
        values, since MLflow refuses to change a param."""
        from mlflow.entities import Param

        new = {k: v[:6000] for k, v in self.params.items() if k not in existing}
        changed = sorted(k for k, v in self.params.items() if k in existing and existing[k] != v[:6000])
        if changed:
            log.info("resumed MLflow run keeps its first values of the changed params %s", ", ".join(changed))
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self._run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in tracker_metrics(metrics).items()]
        self._client.log_batch(self._run_id, metrics=items)

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        for path in images.values():
            self._client.log_artifact(self._run_id, str(path), artifact_path="images")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "summary.json"
            path.write_text(json.dumps(redact(dict(summary)), indent=2))
            self._client.log_artifact(self._run_id, str(path))
        for name in self.artifacts:
            if (self.run_dir / name).exists():
                self._client.log_artifact(self._run_id, str(self.run_dir / name))
        best = summary.get("best_metric")
        if isinstance(best, int | float) and math.isfinite(best):
            self._client.log_metric(self._run_id, "best_metric", float(best), step=int(summary.get("best_epoch") or 0))
        self._client.set_tag(self._run_id, "samft.stop_reason", str(summary.get("stop_reason")))
        self._status = "KILLED" if summary.get("stop_reason") == "interrupted" else "FINISHED"

    def close(self) -> None:
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, status=self._status)
            self._client = None


class MultiLogger:
    """Several trackers at once (`logger=many`): every call goes to each in order. `run_id` is the JSON object
    of the members' ids (`{"mlflow": "..."}`); each member takes its own id back on resume (`own_run_id`)."""

    name = "many"

    def __init__(self, loggers: Sequence[RunLogger]) -> None:
        self.loggers = list(loggers)

    @property
    def run_id(self) -> str | None:
        ids = {logger.name: logger.run_id for logger in self.loggers if logger.run_id is not None}
        return json.dumps(ids, sort_keys=True) if ids else None

    def start(self, *, run_id: str | None = None) -> None:
        for logger in self.loggers:
            logger.start(run_id=run_id)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def log_images(self, images: Mapping[str, Path], *, step: int) -> None:
        for logger in self.loggers:
            logger.log_images(images, step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_summary(summary)

    def close(self) -> None:
        """Close every member, even when one fails (the first error is raised afterwards)."""
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as err:  # the others must still flush and close
                errors.append(err)
        if errors:
            raise errors[0]


def _cell(value: float) -> str:
    """A CSV cell: integers as integers, floats with full precision (repr round-trips)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(float(value))


def _markdown_json(value: Any) -> str:
    """JSON as a Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "```\n" + json.dumps(value, indent=2, default=str) + "\n```"
