"""How long a test waits for something that runs beside it (a subprocess, a flushing service, a peer rank).

These limits only turn a hang into a failure; they are not what a test checks. A limit sized for a test that has
the machine to itself is too short when `make test` runs it beside another pytest-xdist worker (each gets a share
of the CPU), so `patience(s)` stretches `s` by the number of workers of the session (1 without xdist), and by
SAMFT_TEST_PATIENCE (a factor, default 1) on a machine busy with other work.
"""

from __future__ import annotations

import os


def workers() -> int:
    """The number of pytest-xdist workers of this session (PYTEST_XDIST_WORKER_COUNT), 1 without xdist."""
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def factor() -> float:
    """SAMFT_TEST_PATIENCE, a positive number (default 1)."""
    text = os.environ.get("SAMFT_TEST_PATIENCE", "1")
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"SAMFT_TEST_PATIENCE={text!r}: give a positive factor for the tests' waiting limits, e.g. 3")
    return value


def patience(seconds: float) -> float:
    """`seconds` for a test alone on an idle machine, stretched for the workers that share its CPUs."""
    return seconds * workers() * factor()
