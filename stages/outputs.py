"""Output directories of the commands that write one (data, pretrain, random-init, convert-adm, report).

A command writes into a directory that is new, empty, or one it made itself before (recognised by
the files it writes). It never touches a directory holding anything else: a user's own files, a
model another command trained, a probe run. Commands whose output is costly (trained weights)
replace their own earlier output only with `overwrite`. The new content is built beside the target
and swapped in at the end, so a failure or a kill never leaves a half-written directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cache.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The output directory holds something this command must not replace; the message says what to do."""


def check_output_dir(out: Path, *, made_by: Callable[[Path], bool], command: str, overwrite: bool = False,
                     needs_overwrite: bool = True) -> None:
    """Refuse `out` unless it is new, empty, or an earlier output of `command` (with `overwrite` where
    `needs_overwrite`). Nothing is changed either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not made_by(out):
        raise OutputExistsError(f"{out} is not empty and was not written by `pipeline {command}` (it holds "
                                f"{_sample(out)}); choose another --out, or empty it yourself")
    if needs_overwrite and not overwrite:
        raise OutputExistsError(f"{out} holds an earlier output of `pipeline {command}`; pass --overwrite to replace "
                                "it, or choose another --out")


def holds_only(out: Path, names: set[str], *, folders: dict[str, str] | None = None) -> bool:
    """Whether every entry of `out` is one of `names`, or a folder of `folders` holding only files ending
    with its suffix: the shape of a command's own output."""
    folders = folders or {}
    for entry in out.iterdir():
        if entry.is_symlink():
            return False
        if entry.name in folders and entry.is_dir():
            if any(not f.is_file() or f.is_symlink() or not f.name.endswith(folders[entry.name])
                   for f in entry.iterdir()):
                return False
        elif entry.name not in names or not entry.is_file():
            return False
    return True


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` to write into, put in `out`'s place when the block succeeds (an
    earlier `out` is moved aside first, then removed); removed when it fails."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(aside)
        staging.rename(out)
        shutil.rmtree(aside)
    else:
        staging.rename(out)


def _sample(out: Path) -> str:
    names = sorted(entry.name for entry in out.iterdir())
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
