"""Errors of the feature store; each message names the store and what to do."""


class StoreError(RuntimeError):
    """Base class: anything wrong with a feature store."""


class StoreMismatchError(StoreError):
    """The store was made with other settings than the ones asked for."""


class StoreLockedError(StoreError):
    """Another process is writing to the store."""


class IncompleteStoreError(StoreError):
    """Some chunks of the requested arrays were never finished."""
