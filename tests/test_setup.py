"""The set-up keeps the torch it was asked for: the Makefile writes the installed torch (and the
torchvision built for it) into a constraints file beside the interpreter, and holds every later
install step to it. Here: the torch that runs is the one pinned, and a CPU torch came without the
NVIDIA CUDA packages that a replaced torch would have pulled in."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

CONSTRAINTS = Path(sys.prefix) / "torch-constraints.txt"


@pytest.fixture
def pins() -> dict[str, str]:
    if not CONSTRAINTS.is_file():
        pytest.skip(f"{sys.prefix} was not made by the Makefile (no {CONSTRAINTS.name})")
    return dict(line.strip().split("==", 1) for line in CONSTRAINTS.read_text().splitlines() if "==" in line)


def test_the_pinned_torch_is_the_installed_one(pins):
    assert pins["torch"] == torch.__version__ == metadata.version("torch")
    if "torchvision" in pins:
        assert pins["torchvision"] == metadata.version("torchvision")


def test_a_cpu_torch_brought_no_cuda_packages(pins):
    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} is a CUDA build")
    names = (d.metadata["Name"] for d in metadata.distributions())
    cuda = sorted(name for name in names if name.lower().startswith("nvidia-"))
    assert not cuda, f"a CPU set-up holds CUDA packages: {cuda}"
