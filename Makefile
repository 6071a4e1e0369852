# Two commands on a fresh machine:  `make repro` (the default pipeline) and `make test`
# (`make test-fast`: the fast tier; `make lint`: ruff and the import contracts).
# TORCH picks the PyTorch wheel installed first: the default is a CPU build here and a CUDA build
# from PyPI on a Linux GPU machine; set TORCH=torch (or your own pin) to take another.
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: repro test test-fast lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The fast tier: every test not marked slow (docs/development.md); minutes, not the full suite's quarter hour.
test-fast: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

# ruff's rules and import-linter's architecture contracts (pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
