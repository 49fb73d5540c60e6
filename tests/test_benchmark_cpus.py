"""The benchmarks' headers count CPUs with samft.devices.available_cpus (the one helper for the job), not their
own copy of it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """A benchmark module imported from its file (benchmarks/ on sys.path for its `import common`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_cpus_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("name", ["common", "preprocessing"])
def test_benchmark_headers_count_cpus_with_the_devices_helper(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from samft.devices import available_cpus

    module = load(name)
    assert module.available_cpus is available_cpus
    monkeypatch.setattr(module, "available_cpus", lambda: 77)
    text = module.header(__file__) if name == "common" else module.header()
    assert ", 77 CPUs" in text.splitlines()[1]
