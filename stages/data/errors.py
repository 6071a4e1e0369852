"""The data layer's error: a data set, split or image that cannot be used as it is."""

from cache.errors import UserError


class DataError(UserError, ValueError):
    """The message names the folder or file and what is wrong with it."""


class MissingDataError(DataError, FileNotFoundError):
    """A data folder or split folder that does not exist."""
