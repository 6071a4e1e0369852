# Two commands on a fresh machine:  `make repro` (the default pipeline) and `make test`
# (`make test-fast`: the fast tier; `make lint`: ruff and the import contracts; docs/development.md).
#
# TORCH picks the PyTorch installed first: torch==2.13.0 is a CPU build on this project's CPU
# machines and a CUDA build from PyPI on a Linux GPU machine; `make install TORCH=torch==2.5.1` takes
# another, TORCH_INDEX=https://download.pytorch.org/whl/cpu (or .../cu121 ...) takes PyTorch's own
# builds. Every later step is held to that torch, and to the torchvision built for it, by a pip
# constraints file ($(VENV)/torch-constraints.txt): no dependency can swap the torch build (timm pulls
# the newest torchvision, which would otherwise pull a newer torch and the whole CUDA stack).
# Where no torchvision built for that torch can be had (PyPI's are CUDA builds, so a CPU torch from
# a local wheel has none), the set-up says so and leaves out timm, which needs it.
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTHON ?= python3
BIN := $(VENV)/bin
CONSTRAINTS := $(VENV)/torch-constraints.txt
INDEX := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
# [all] less timm: what a set-up without a working torchvision gets
NO_TIMM := s3,cluster,dvc,transformers,wds,hf

.PHONY: repro test test-fast lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(INDEX) "$(TORCH)"
	$(BIN)/python -W ignore -c 'import torch; print(f"torch=={torch.__version__}")' > $(CONSTRAINTS)
	@if $(BIN)/python -m pip install --quiet $(INDEX) --constraint $(CONSTRAINTS) torchvision \
	    && $(BIN)/python -c 'import torch, torchvision; torch.ops.torchvision.nms' 2>/dev/null; then \
	  $(BIN)/python -m pip freeze | grep -iE '^torch(vision)?==' > $(CONSTRAINTS); \
	  echo "$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e .[all,test]"; \
	  $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[all,test]"; \
	else \
	  $(BIN)/python -m pip uninstall --quiet --yes torchvision; \
	  echo "No torchvision built for $$(cat $(CONSTRAINTS)) loads here: installing without timm (timm: backbones)." \
	       "For them, take torch and torchvision from one index, e.g. make install TORCH_INDEX=https://download.pytorch.org/whl/cpu"; \
	  $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[$(NO_TIMM),test]"; \
	fi
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The fast tier: every test not marked slow, on two worker processes (pytest-xdist; docs/development.md).
test-fast: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" -n 2

# ruff's rules and format, and import-linter's architecture contracts (pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
