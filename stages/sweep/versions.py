"""What a sweep's results depend on besides its settings: the project's code and the numerical libraries.

`environment()` is the same on every machine that would compute bit-identical results: the project
version, a sha256 of the code a probe task runs (`cache/`, `stages/probe/`, `stages/sweep/`,
`stages/devices.py`) and the versions of Python, torch, numpy, scikit-learn and dask. The driver
compares it with every worker's before submitting anything, and each task compares it again when it
starts (a worker that joins later, or restarts after a crash, is checked too). It is also part of
every task's result key, so a result computed by other code is never reused.
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from cache.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CODE = ("cache", "stages/probe", "stages/sweep", "stages/devices.py")


class VersionMismatchError(UserError, RuntimeError):
    """The driver and a worker run different code or library versions."""


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the source of the modules a probe task runs (paths and contents, in path order)."""
    digest = hashlib.sha256()
    for part in CODE:
        path = ROOT / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def environment() -> dict:
    """{name: version} of the project's code and the libraries that decide a task's numbers."""
    return {
        "diffusion-feature-cache": _version("diffusion-feature-cache"),
        "code": code_fingerprint(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "numpy", "scikit-learn", "dask", "distributed")},
    }


def check_same(driver: dict, worker: dict, where: str) -> None:
    """Raise VersionMismatchError naming every difference between the driver's and a worker's environment."""
    different = [
        f"{name} {driver.get(name)} here, {worker.get(name)} there"
        for name in sorted(set(driver) | set(worker))
        if driver.get(name) != worker.get(name)
    ]
    if different:
        raise VersionMismatchError(
            f"the worker {where} runs other versions than this driver: {'; '.join(different)}. Install the same "
            "commit of the project and the same libraries on every worker (`code` is a sha256 of the project's "
            "cache/, stages/probe/ and stages/sweep/ sources)"
        )
