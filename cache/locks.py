"""Locks of a store: one writer at a time, and no replacing a store that a reader holds.

On a local disk, two `flock`s that the operating system releases when their holder dies (kill -9
included), and neither a file of its own in the hierarchy:

- the writer lock, exclusive, on the store directory: held by every writer for its whole run;
- the reader lock, shared, on the store's `_progress` directory: held by readers that pin the store
  (a probe, for its whole run). A writer that would *replace* the store (an extraction with
  other settings, told to overwrite it) first takes it exclusively, and is refused while any
  reader holds it. Writers that only add to the store (resume, new blocks or timesteps) never
  touch it: readers see finished chunks only, so both can run at once.

On object stores the writer holds a lease object instead (`cache.lease`), and there is no reader
lock: a reader notices a replacement by the store's identity, which it checks on every read.
"""

from __future__ import annotations

import fcntl
import os

from cache.errors import StoreInUseError, StoreLockedError
from cache.layout import PROGRESS
from cache.storage import Location


class WriterLock:
    """The writer's hold on a store: a flock on a local directory, a lease on an object store."""

    def __init__(self, location: Location):
        self.location = location
        try:
            self._hold = location.hold_writer()  # a flock (`cache.storage`)
        except BlockingIOError:
            raise StoreLockedError(f"{location} is being written by another process", store=location) from None
        if self._hold is None:  # none on an object store: a lease instead
            from cache.lease import Lease

            self._hold = Lease(location).acquire()

    @property
    def may_be_lost(self) -> bool:
        """Whether another writer can take the store over while this one holds it (a lease that expired in a
        stall); a flock is held until its holder ends."""
        return self._hold is not None and self._hold.may_be_lost

    def check(self) -> None:
        """Raise if the hold was lost (an object store's lease taken over after it expired)."""
        if self._hold is not None:
            self._hold.check()

    def release(self) -> None:
        if self._hold is not None:
            self._hold.release()
            self._hold = None


def lock_writer(location: Location) -> WriterLock:
    return WriterLock(location)


def unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def hold_for_reading(location: Location) -> int | None:
    """A shared lock on the store's readers' directory, or None where the store has none (half-built,
    or on an object store)."""
    return _lock_readers(
        location, fcntl.LOCK_SH, f"{location} is being replaced by another process (an extraction over it)"
    )


def claim_for_replacing(location: Location) -> int | None:
    """The readers' lock taken exclusively before a writer replaces the store; refused while a reader holds it."""
    return _lock_readers(
        location,
        fcntl.LOCK_EX,
        f"{location} is open for reading in another process (a probe?); replacing it now would "
        "change the features under that reader",
    )


def _lock_readers(location: Location, mode: int, refusal: str) -> int | None:
    try:
        return location.flock(PROGRESS, mode)
    except BlockingIOError:
        raise StoreInUseError(refusal, store=location) from None
