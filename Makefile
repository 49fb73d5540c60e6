# The two commands of the README: `make demo` (set up, then train on the built-in demo data)
# and `make test` (set up, then lint and run the test suite; CI runs it). `make test-fast` leaves out the tests
# marked slow. All create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.samft-installed
# Two pytest workers (pytest-xdist): most of the suite's time is single-threaded (subprocesses importing monai and
# composing Hydra), which two workers overlap on two cores; more would run several multi-threaded training
# subprocesses side by side (and -n auto is the CPU count, unbounded on a large CI machine). --dist loadfile keeps
# each test module on one worker, so its module-scoped fixtures (the shared smoke run, demo data, sweeps) are built
# once; --no-loadscope-reorder keeps tests/conftest.py's order (the longest modules first) instead of xdist's
# (most tests first). TEST_WORKERS=0 runs the suite in one process; PYTEST_ARGS adds options (--junitxml=...).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
PYTEST = $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

.PHONY: demo test test-fast setup

demo: $(STAMP)
	$(BIN)/python -m samft.train experiment=demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(PYTEST)

test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	sh scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)
