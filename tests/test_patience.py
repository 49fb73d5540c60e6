"""The waiting limits of tests stretch with the pytest-xdist workers that share the machine (`make test` runs 2)."""

from __future__ import annotations

import pytest
from helpers.patience import patience, workers


def test_a_limit_is_doubled_beside_a_second_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert workers() == 2 and patience(30) == 60 and patience(0.5) == 1.0


def test_a_limit_is_kept_without_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert workers() == 1 and patience(120) == 120
