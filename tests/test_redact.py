"""samft.redact: URL passwords never reach a written config."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.patience import patience
from omegaconf import OmegaConf

from samft.redact import redact


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql://samft:s3cret@db:5432/optuna", "postgresql://samft:***@db:5432/optuna"),
    ("postgresql+psycopg2://u:pa/ss:w@rd@db/x", "postgresql+psycopg2://u:***@db/x"),  # raw '/', ':', '@'
    ("mysql://u:p@h/db and redis://:tok@cache:6379/0", "mysql://u:***@h/db and redis://:***@cache:6379/0"),
    ("postgresql://db/optuna?user=u&password=s3cret&sslmode=require",
     "postgresql://db/optuna?user=u&password=***&sslmode=require"),
    # as Hydra escapes an override value in its log and in .hydra/overrides.yaml
    (r"storage=postgresql\://samft\:s3cret@db\:5432/optuna", r"storage=postgresql\://samft\:***@db\:5432/optuna"),
])
def test_url_passwords_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "sqlite:////abs/outputs/sweeps/ich_optuna/optuna.db", "postgresql://u@db/optuna", "http://host:8080/path",
    "outputs/train/2026-01-01_10-00-00", "user:pass@host", "lr=1e-4",
])
def test_strings_without_a_password_are_unchanged(text: str) -> None:
    assert redact(text) == text


def test_nested_configs_are_redacted_without_touching_the_original() -> None:
    url = "postgresql://samft:s3cret@db/optuna"
    cfg = OmegaConf.create({"trial": {"storage": url, "number": 3},
                            "hparams_search": {"storage": "${trial.storage}"},
                            "tags": [url, 1.5, None, True]})
    out = redact(cfg)
    assert out == {"trial": {"storage": "postgresql://samft:***@db/optuna", "number": 3},
                   "hparams_search": {"storage": "postgresql://samft:***@db/optuna"},
                   "tags": ["postgresql://samft:***@db/optuna", 1.5, None, True]}
    assert cfg.trial.storage == url  # the sweeper still needs the real URL in memory
    plain = {"a": (url,), "b": {"c": [url]}}
    assert redact(plain) == {"a": ["postgresql://samft:***@db/optuna"], "b": {"c": ["postgresql://samft:***@db/optuna"]}}
    assert plain["b"]["c"] == [url]


@pytest.mark.slow
def test_a_run_writes_no_password_anywhere(tmp_path: Path) -> None:
    """The README's recipe resolves the storage URL from the environment into the run's config: config.json,
    both checkpoints and a reproduction's config hold it masked, and no file of the run or its reproduction
    (including the .pth bytes and .hydra/) holds the password."""
    secret = "Marker-" + secrets.token_hex(6)
    url = f"postgresql://samft:{secret}@db.invalid:5432/optuna"
    run_dir = tmp_path / "run"
    env = {**os.environ, "SAMFT_OPTUNA_STORAGE": url, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "samft.train", "experiment=smoke", "epochs=1", "max_steps_per_epoch=1",
         "trial.storage=${oc.env:SAMFT_OPTUNA_STORAGE}", f"hydra.run.dir={run_dir}",
         f"data.demo_dir={tmp_path / 'demo'}"],
        capture_output=True, text=True, timeout=patience(600), cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    masked = url.replace(secret, "***")
    assert json.loads((run_dir / "config.json").read_text())["trial"]["storage"] == masked
    for name in ("best_model.pth", "latest_model.pth"):
        assert torch.load(run_dir / name, map_location="cpu", weights_only=True)["config"]["trial"]["storage"] == masked
    # samft.reproduce re-runs it from .hydra/ (the URL resolves again) and saves the config it used
    proc = subprocess.run([sys.executable, "-m", "samft.reproduce", str(run_dir), "--output", str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=patience(600), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samft:***@db.invalid" in (tmp_path / "again" / "reproduced_config.yaml").read_text()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 25 and (run_dir / ".hydra" / "config.yaml") in files
    leaks = [p for p in files if secret.encode() in p.read_bytes()]
    assert not leaks
