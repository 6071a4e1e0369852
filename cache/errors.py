"""Errors: the project's one user-error base class, and the feature store's own errors.

`UserError` marks a problem the user can fix (bad input, a file or store in a state that needs
their action). The command line prints its message and exits 1; any other exception is a bug and
keeps its traceback. It lives here because `cache` is the package every other one depends on.

A store's errors say what is wrong and where in plain words, and carry typed fields: `store` (the
`cache.storage.Location`, or its text), `damage` (the `cache.integrity.Damage` found) and `remedy`
(one of `REMEDIES`: what the store needs). They never name a command or a flag: `cache` is usable
alone, and the command line turns the fields into advice (`pipeline.advice`).
"""

from __future__ import annotations

from dataclasses import dataclass

# What a store in a given state needs (StoreError.remedy):
REPAIR = "repair"  # recompute what is damaged or unfinished, from the recipe (model, data) the store records
REPLACE = "replace"  # its settings are lost or differ: extract again over it, or into another store
ELSEWHERE = "elsewhere"  # the location is not usable as a store (a file, not writable, not a feature store)
WAIT = "wait"  # another process writes or reads it: wait, or write to another store
WIDER_DTYPE = "wider-dtype"  # features overflowed the stored dtype: store float32 (and compute in fp32)
RESTORE_DATA = "restore-data"  # images changed: restore them, or re-extract everything over the store
CREATE = "create"  # there is no store yet: make it
RERUN = "rerun"  # damage is marked unfinished, but the store does not say how it was made: run its maker again
REMEDIES = (REPAIR, REPLACE, ELSEWHERE, WAIT, WIDER_DTYPE, RESTORE_DATA, CREATE, RERUN)


@dataclass(frozen=True)
class Damage:
    """One damaged or missing piece of a store."""

    path: str  # the array, relative to the store, e.g. "train/block3/t10" or "_progress/train/set-..."
    shard: int | None  # its shard: the unit of writing (a chunk in stores without sharding; None: the metadata)
    problem: str  # e.g. "fails its checksum"

    def describe(self, store: str) -> str:
        where = f"{store}/{self.path}" + ("" if self.shard is None else f" shard {self.shard}")
        return f"{where} {self.problem}"


class UserError(Exception):
    """Base class of every error about input or state that the user can act on."""


class ConfigError(UserError, ValueError):
    """A setting or argument outside what it may be (checked where it enters, before any work)."""


class StoreError(UserError):
    """Base class: anything wrong with a feature store (typed fields: module docstring)."""

    remedy: str | None = None

    def __init__(self, message: str = "", *, store=None, damage=(), remedy: str | None = None):
        super().__init__(message)
        if remedy is not None and remedy not in REMEDIES:
            raise ValueError(f"unknown remedy {remedy!r}")
        self.store, self.damage = store, tuple(damage)
        if remedy is not None:
            self.remedy = remedy

    def __reduce__(self):  # keep the fields across processes (dask workers, torchrun ranks)
        return _rebuild, (type(self), str(self), {k: v for k, v in self.__dict__.items()})


class StoreMismatchError(StoreError):
    """The store was made with other settings than the ones asked for."""

    remedy = REPLACE


class StoreLockedError(StoreError):
    """Another process is writing to the store."""

    remedy = WAIT


class IncompleteStoreError(StoreError):
    """Some chunks of the requested arrays were never finished (or the store itself never was)."""

    remedy = REPAIR


class NotInStoreError(StoreError, KeyError):
    """The store has no such split, block or timestep; the message says what it has."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class IntegrityError(StoreError):
    """Part of the store is damaged or missing (a chunk, a completion flag, a digest, a metadata file);
    `damage` names each piece."""

    remedy = REPAIR


class StoreInUseError(StoreError):
    """The store is open in another process in a way that forbids what was asked (replacing it while read)."""

    remedy = WAIT


class StoreReplacedError(StoreError):
    """The store was replaced (or its settings rewritten) after this process opened it."""


class StoreFullError(StoreError):
    """The disk holding the store is full; finished chunks are kept."""


class DataChangedError(StoreError):
    """Images changed since the store's features were computed from them."""

    remedy = RESTORE_DATA


class NonFiniteFeaturesError(StoreError):
    """The model produced NaN or infinite features; the store does not record them as finished."""

    remedy = WIDER_DTYPE


def _rebuild(cls, message: str, fields: dict) -> StoreError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(fields)
    return error
