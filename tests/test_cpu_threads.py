"""hardware.cpu_threads: chosen from the usable CPUs and the loader workers, applied before the model is built."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from samft.devices import set_cpu_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cpus", "workers", "processes", "expected"), [
    (2, 1, 1, 1),   # the 2-core case: one thread beside one loader worker
    (2, 0, 1, 2),
    (16, 3, 1, 13),
    (16, 1, 4, 3),  # four ranks share the node
    (1, 4, 1, 1),   # never below one
])
def test_default_threads_leave_a_core_per_loader_worker(cpus: int, workers: int, processes: int,
                                                        expected: int) -> None:
    assert set_cpu_threads(None, usable_cpus=cpus, num_workers=workers, processes=processes) == expected
    assert torch.get_num_threads() == expected


def test_an_explicit_count_wins() -> None:
    assert set_cpu_threads(3, usable_cpus=2, num_workers=1) == 3 and torch.get_num_threads() == 3


def test_inter_op_threads_are_set_in_a_fresh_process() -> None:
    code = ("import torch; from samft.devices import set_cpu_threads; "
            "set_cpu_threads(None, usable_cpus=5, num_workers=2); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "3"]


def test_one_cpu_count_for_threads_loader_workers_preflight_and_the_system_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """The affinity mask (what a container or taskset grants), not the machine's cores, everywhere."""
    import logging
    import os

    from samft.data import preflight, stats
    from samft.data.datamodule import default_num_workers
    from samft.devices import available_cpus
    from samft.engine.monitor import system_check

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cpus() == 3
    assert default_num_workers() == 2
    with caplog.at_level(logging.INFO, logger="samft"):
        warnings = system_check(tmp_path, min_free_disk_gb=0, min_free_ram_gb=0, min_cpus=4)
    assert any(w.startswith("3 CPU cores usable") for w in warnings), warnings
    pools = []
    monkeypatch.setattr(preflight, "ThreadPoolExecutor", lambda max_workers: pools.append(max_workers) or 1 / 0)
    monkeypatch.setattr(stats, "ThreadPoolExecutor", lambda max_workers: pools.append(max_workers) or 1 / 0)
    records = [{"image": f"{c}.nii", "label": None, "ich": 0, "patient_id": c, "case_id": c, "origin": c} for c in "ab"]
    for call in (lambda: preflight.preflight(records[:1], records[1:]), lambda: stats.dataset_stats(records)):
        with pytest.raises(ZeroDivisionError):
            call()
    assert pools == [3, 3]
