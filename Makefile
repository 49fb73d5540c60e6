# The two commands of the README: `make demo` (set up, then train on the built-in demo data)
# and `make test` (set up, then lint and run the test suite; CI runs it). `make test-fast` leaves out the tests
# marked slow. All create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.samft-installed

.PHONY: demo test test-fast setup

demo: $(STAMP)
	$(BIN)/python -m samft.train experiment=demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	sh scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)
