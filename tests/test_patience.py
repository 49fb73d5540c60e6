"""The waiting limits of tests stretch with the pytest-xdist workers that share the machine (`make test` runs 2)
and with SAMFT_TEST_PATIENCE on a busy machine."""

from __future__ import annotations

import pytest
from helpers.patience import patience, workers


def test_a_limit_is_doubled_beside_a_second_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.delenv("SAMFT_TEST_PATIENCE", raising=False)
    assert workers() == 2 and patience(30) == 60 and patience(0.5) == 1.0


def test_a_limit_is_kept_without_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.delenv("SAMFT_TEST_PATIENCE", raising=False)
    assert workers() == 1 and patience(120) == 120


def test_a_busy_machine_stretches_every_limit_by_its_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("SAMFT_TEST_PATIENCE", "2.5")
    assert patience(60) == 300


@pytest.mark.parametrize("text", ["0", "-1", "slow"])
def test_a_factor_that_is_not_positive_names_the_variable(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("SAMFT_TEST_PATIENCE", text)
    with pytest.raises(ValueError, match="SAMFT_TEST_PATIENCE="):
        patience(1)
