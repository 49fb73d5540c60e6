"""Order of test modules under pytest-xdist (`make test`: two workers, `--dist loadfile`).

A module runs whole on one worker, so its module-scoped fixtures (a shared smoke run, demo data, a sweep) are built
once. xdist hands out modules in the order collected; a module of minutes handed out last leaves the other worker
idle for those minutes. Under xdist the modules measured to take the longest therefore go first (longest first,
the rest in their usual order), so the short ones fill the gaps at the end. Only the order changes; every module
still runs, and a module not listed here just keeps its place among the short ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Seconds per module: setup + call + teardown of its slowest tests summed, from a serial run of the suite on the
# 2-core machine (`pytest --durations=80`, 2026-11-30, beside other work); only modules over ~15 s. Re-measure with
# `make test PYTEST_ARGS=--junitxml=report.xml` after large changes. A stale number misorders, never skips.
MODULE_SECONDS = {
    "test_sweep_liveness.py": 588,
    "test_readme_promises.py": 477,
    "test_sweep_postgres.py": 458,
    "test_benchmarks_smoke.py": 363,
    "test_distributed.py": 307,
    "test_model_reference.py": 259,
    "test_train_run.py": 258,
    "test_redact.py": 179,
    "test_loggers.py": 172,
    "test_cli_data_errors.py": 132,
    "test_sweep.py": 105,
    "test_predict_export.py": 92,
    "test_evaluate_baseline.py": 81,
    "test_hardening_predict.py": 69,
    "test_hardening_evaluate.py": 33,
    "test_dicom.py": 31,
    "test_scan_validation.py": 30,
    "test_insert_lesions.py": 29,
    "test_evaluate.py": 27,
    "test_hardening_config.py": 26,
    "test_refinement.py": 23,
    "test_config.py": 19,
}


def longest_modules_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` with whole modules reordered by MODULE_SECONDS, longest first; ties and unlisted modules keep
    their collected order, and the tests inside a module keep theirs (a stable sort)."""
    return sorted(items, key=lambda item: -MODULE_SECONDS.get(Path(str(item.path)).name, 0))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Only in an xdist worker (they collect; the controller hands out their order, kept by the Makefile's
    # --no-loadscope-reorder). Both workers must collect the same order, which a fixed table guarantees.
    if hasattr(config, "workerinput"):
        items[:] = longest_modules_first(items)
