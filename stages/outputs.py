"""Output directories of the commands that write one (data, pretrain, random-init, convert-adm, report).

A command writes into a directory that is new, empty, or one it made itself before (recognised by
the files it writes). It never touches a directory holding anything else: a user's own files, a
model another command trained, a probe run. Commands whose output is costly (trained weights)
replace their own earlier output only with `overwrite`. The new content is built beside the target
and swapped in at the end, so a failure or a kill never leaves a half-written directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cache.errors import UserError
from cache.text import format_bytes

FULL = (errno.ENOSPC, errno.EDQUOT)
# Libraries that wrap the operating system's error in their own keep only its text (safetensors' SafetensorError:
# "IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })").
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


class OutputExistsError(UserError, FileExistsError):
    """The output directory holds something this command must not replace; the message says what to do."""


class OutputLockedError(UserError):
    """Another process is writing the same output; the message names it."""


class OutputFullError(UserError):
    """The disk filled while a command wrote its results; what it had half-written is removed."""


def is_disk_full(error: BaseException) -> bool:
    """A full disk (or quota), as an OSError or as a library's error that wraps one."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in FULL
    return any(text in str(error) for text in FULL_TEXTS)


@contextmanager
def full_disk_is_one_line(out: Path, what: str) -> Iterator[None]:
    """Turn a full disk inside the block into an OutputFullError naming `out`, the free space and the fix; the
    block's own clean-up (a staging directory removed) has run by then."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        free = _free_bytes(Path(out))
        raise OutputFullError(
            f"{out}: no space left on the device while {what}; {format_bytes(free)} free. Free some "
            "space and run the same command again: nothing half-written was kept"
        ) from None


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def check_output_dir(
    out: Path, *, made_by: Callable[[Path], bool], command: str, overwrite: bool = False, needs_overwrite: bool = True
) -> None:
    """Refuse `out` unless it is new, empty, or an earlier output of `command` (with `overwrite` where
    `needs_overwrite`). Nothing is changed either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not made_by(out):
        raise OutputExistsError(
            f"{out} is not empty and was not written by `pipeline {command}` (it holds "
            f"{_sample(out)}); choose another --out, or empty it yourself"
        )
    if needs_overwrite and not overwrite:
        raise OutputExistsError(
            f"{out} holds an earlier output of `pipeline {command}`; pass --overwrite to replace "
            "it, or choose another --out"
        )


def holds_only(out: Path, names: set[str], *, folders: dict[str, str] | None = None) -> bool:
    """Whether every entry of `out` is one of `names`, or a folder of `folders` holding only files ending
    with its suffix: the shape of a command's own output."""
    folders = folders or {}
    for entry in out.iterdir():
        if entry.is_symlink():
            return False
        if entry.name in folders and entry.is_dir():
            if any(
                not f.is_file() or f.is_symlink() or not f.name.endswith(folders[entry.name]) for f in entry.iterdir()
            ):
                return False
        elif entry.name not in names or not entry.is_file():
            return False
    return True


def is_analysis_output(out: Path, files: set[str], record: str, command: str) -> bool:
    """Whether `out` holds only what an analysis command writes (its CSV, its JSON record naming the command,
    heatmaps/*.png): it can be recomputed, so it is replaced."""
    if not holds_only(out, files, folders={"heatmaps": ".png"}):
        return False
    try:
        return not (out / record).exists() or json.loads((out / record).read_text()).get("command") == command
    except (OSError, ValueError):
        return False


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    """`rows` as a CSV file with a header of `columns`."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


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


@contextmanager
def output_lock(target: Path, command: str) -> Iterator[None]:
    """Hold `target` (a run directory, or a sweep's results root) for this process while the block runs; a
    second process asking for it is refused with an OutputLockedError naming the holder.

    The lock is a `flock` on the hidden file `.<name>.lock` beside `target`, which the operating system
    releases when its holder dies (kill -9 included); the file is removed when the block ends, so a
    finished output holds nothing of it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{target} is being written by another process ({holder}); wait for it to "
                "finish, or write to another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its last holder removed it between our open and our lock: take a fresh one
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = {
            "command": f"pipeline {command}",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a process waiting on the old file then retries
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"`{record['command']}`, host {record['host']}, pid {record['pid']}, writing since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder is starting"
