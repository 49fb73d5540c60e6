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


@pytest.mark.parametrize(("cpus", "busy_workers", "processes", "expected"), [
    (2, 1, 1, 1),   # the 2-core case: one thread beside one worker that reads and resamples scans
    (2, 0, 1, 2),   # the same machine with cached scans: the worker only crops, both cores compute
    (16, 3, 1, 13),
    (16, 1, 4, 3),  # four ranks share the node
    (1, 4, 1, 1),   # never below one
])
def test_default_threads_leave_a_core_per_busy_loader_worker(cpus: int, busy_workers: int, processes: int,
                                                             expected: int) -> None:
    assert set_cpu_threads(None, usable_cpus=cpus, busy_workers=busy_workers, processes=processes) == expected
    assert torch.get_num_threads() == expected


def test_an_explicit_count_wins() -> None:
    assert set_cpu_threads(3, usable_cpus=2, busy_workers=1) == 3 and torch.get_num_threads() == 3


def test_inter_op_threads_are_set_in_a_fresh_process() -> None:
    code = ("import torch; from samft.devices import set_cpu_threads; "
            "set_cpu_threads(None, usable_cpus=5, busy_workers=2); "
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


@pytest.mark.parametrize(("cache", "busy"), [("none", 1), ("memory", 0), ("disk", 0)])
def test_a_run_counts_its_loader_worker_busy_only_without_a_preprocessing_cache(
    cache: str, busy: int, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from hydra import compose, initialize_config_dir

    from samft import devices, runner
    from samft.config import validate
    from samft.reproduce import CONF_DIR

    class Stop(Exception):
        pass

    seen: dict = {}

    def record(requested, **kwargs) -> int:
        seen.update(kwargs, requested=requested)
        raise Stop  # the threads are chosen first; nothing after them matters here

    monkeypatch.setattr(devices, "set_cpu_threads", record)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose("train", overrides=[f"data.cache={cache}", "hardware.num_workers=1"]))
    with pytest.raises(Stop):
        runner.train_this_process(cfg, tmp_path / "run")
    assert seen == {"requested": None, "busy_workers": busy, "usable_cpus": devices.available_cpus(),
                    "processes": 1}


def test_reproduce_pins_the_thread_count_a_default_run_recorded() -> None:
    from omegaconf import OmegaConf

    from samft.reproduce import pin_thread_count

    cfg = OmegaConf.create({"hardware": {"cpu_threads": None}})
    pin_thread_count(cfg, {"cpu_threads": 1})
    assert cfg.hardware.cpu_threads == 1
    explicit = OmegaConf.create({"hardware": {"cpu_threads": 4}})
    pin_thread_count(explicit, {"cpu_threads": 1})
    assert explicit.hardware.cpu_threads == 4  # an explicit setting is the run's own
