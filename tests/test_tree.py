"""Truth in the tree: what pyproject.toml packages exists, and every `python -m samft...` command the README, the
experiment write-ups and the Makefile show names a module that runs as a program."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_files_exist() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = config["tool"]["setuptools"]["package-data"]
    missing = [f"{package}/{name}" for package, names in listed.items() for name in names
               if not (ROOT / "src" / package.replace(".", "/") / name).is_file()]
    assert listed and not missing


def test_documented_commands_name_runnable_modules() -> None:
    documents = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "experiments").glob("*.md"))]
    modules = {m for doc in documents for m in re.findall(r"python -m (samft(?:\.\w+)*)", doc.read_text())}
    assert "samft.synth" in modules and "samft.train" in modules
    for module in sorted(modules):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{module} is documented but does not exist"
        if spec.submodule_search_locations is not None:  # a package runs through its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
