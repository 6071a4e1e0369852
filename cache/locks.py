"""Locks of a local store: one writer at a time, and no replacing a store that a reader holds.

Two locks, on two directories of the store, both `flock`s that the operating system releases when
their holder dies (kill -9 included), and neither a file of its own in the hierarchy:

- the writer lock, exclusive, on the store directory: held by every writer for its whole run;
- the reader lock, shared, on the store's `_progress` directory: held by readers that pin the store
  (a probe, for its whole run). A writer that would *replace* the store (a mismatching one with
  `--overwrite`) first takes it exclusively, and is refused while any reader holds it. Writers that
  only add to the store (resume, new blocks or timesteps) never touch it: readers see finished
  chunks only, so both can run at once.

Object stores have neither (zarr's `://` paths); there a reader notices a replacement by the store's
identity, which it checks on every read.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cache.errors import StoreInUseError, StoreLockedError
from cache.layout import PROGRESS


def lock_writer(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            f"{directory} is being written by another process; wait for it to finish or write to another --out"
        ) from None
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def hold_for_reading(directory: Path) -> int | None:
    """A shared lock on the store's readers' directory, or None where the store has none (half-built)."""
    return _lock_readers(directory, fcntl.LOCK_SH,
                         f"{directory} is being replaced by another process (`extract --overwrite`); wait for it to "
                         "finish, then run again")


def claim_for_replacing(directory: Path) -> int | None:
    """The readers' lock taken exclusively before a writer replaces the store; refused while a reader holds it."""
    return _lock_readers(directory, fcntl.LOCK_EX,
                         f"{directory} is open for reading in another process (a probe?); replacing it now would "
                         "change the features under that reader. Wait for it to finish, or write to another --out.")


def _lock_readers(directory: Path, mode: int, refusal: str) -> int | None:
    try:
        fd = os.open(Path(directory) / PROGRESS, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUseError(refusal) from None
    return fd
