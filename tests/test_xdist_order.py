"""Under pytest-xdist the modules measured to take longest are handed out first (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from conftest import MODULE_SECONDS, longest_modules_first

TESTS = Path(__file__).resolve().parent


def test_the_longest_modules_go_first_and_each_module_keeps_its_own_order() -> None:
    names = [("test_a_quick.py", "x"), ("test_sweep.py", "1"), ("test_a_quick.py", "y"), ("test_sweep.py", "2"),
             ("test_sweep_liveness.py", "1"), ("test_b_quick.py", "z")]
    items = [SimpleNamespace(path=TESTS / module, name=name) for module, name in names]
    ordered = [(item.path.name, item.name) for item in longest_modules_first(items)]
    assert ordered == [("test_sweep_liveness.py", "1"), ("test_sweep.py", "1"), ("test_sweep.py", "2"),
                       ("test_a_quick.py", "x"), ("test_a_quick.py", "y"), ("test_b_quick.py", "z")]


def test_every_listed_module_exists() -> None:
    """A renamed module would silently lose its place at the front."""
    assert [name for name in MODULE_SECONDS if not (TESTS / name).is_file()] == []
