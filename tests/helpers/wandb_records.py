"""Reading back what wandb wrote offline: a run's `.wandb` file, its records and its history rows."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from helpers.patience import patience


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    """The `.wandb` files of run `run_id` under `run_dir/wandb` (one per start of the run), oldest first."""
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def read_records(path: Path, *, timeout_s: float = 30.0) -> list[tuple[str, Any]]:
    """The records of a finished run; wandb's service process may still be flushing the file after finish()
    (`timeout_s` for a test alone on the machine, stretched for the pytest workers beside it)."""
    deadline = time.monotonic() + patience(timeout_s)
    while True:
        found = decode(path)
        if any(kind == "exit" for kind, _ in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def decode(path: Path) -> list[tuple[str, Any]]:
    """Decode a .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks holding protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append((record.WhichOneof("record_type"), record))
    return out


def history_rows(found: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The logged metric rows (`wandb.log` calls) among `found`, nested keys joined with '/'."""
    rows = []
    for kind, record in found:
        if kind == "history":
            rows.append(
                {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            )
    return rows
