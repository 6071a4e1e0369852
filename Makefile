# Two commands on a fresh machine:  `make repro` (the default pipeline) and `make test`.
# TORCH picks the PyTorch wheel installed first: the default is a CPU build here and a CUDA build
# from PyPI on a Linux GPU machine; set TORCH=torch (or your own pin) to take another.
# Every later step is held to the torch that step installed (and a torchvision built for it) by
# a pip constraints file, so no dependency can swap it for another build (timm pulls the newest
# torchvision, which would otherwise pull a newer torch and the whole CUDA stack).
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= test
PYTHON ?= python3
BIN := $(VENV)/bin
CONSTRAINTS := $(VENV)/torch-constraints.txt

.PHONY: repro test test-fast lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -c 'import torch; print(f"torch=={torch.__version__}")' > $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet torchvision --constraint $(CONSTRAINTS)
	$(BIN)/python -m pip freeze | grep -iE '^(torch|torchvision)==' > $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest
