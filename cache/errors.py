"""Errors: the project's one user-error base class, and the feature store's own errors.

`UserError` marks a problem the user can fix (bad input, a file or store in a state that needs
their action). The command line prints its message and exits 1; any other exception is a bug and
keeps its traceback. It lives here because `cache` is the package every other one depends on.
Messages name the file or store and say what to do.
"""


class UserError(Exception):
    """Base class of every error about input or state that the user can act on."""


class ConfigError(UserError, ValueError):
    """A setting or argument outside what it may be (checked where it enters, before any work)."""


class StoreError(UserError):
    """Base class: anything wrong with a feature store."""


class StoreMismatchError(StoreError):
    """The store was made with other settings than the ones asked for."""


class StoreLockedError(StoreError):
    """Another process is writing to the store."""


class IncompleteStoreError(StoreError):
    """Some chunks of the requested arrays were never finished."""


class NotInStoreError(StoreError, KeyError):
    """The store has no such split, block or timestep; the message says what it has."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class IntegrityError(StoreError):
    """Part of the store is damaged or missing (a chunk, a completion flag, a metadata file); the message
    names it and how to repair it."""


class StoreInUseError(StoreError):
    """The store is open in another process in a way that forbids what was asked (replacing it while read)."""


class StoreReplacedError(StoreError):
    """The store was replaced (or its settings rewritten) after this process opened it."""


class StoreFullError(StoreError):
    """The disk holding the store is full; finished chunks are kept."""


class DataChangedError(StoreError):
    """Images changed since the store's features were computed from them."""


class NonFiniteFeaturesError(StoreError):
    """The model produced NaN or infinite features; the store does not record them as finished."""
