"""samft.redact: URL passwords never reach a written config."""

from __future__ import annotations

import pytest
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
