"""MATLAB .mat metadata (Stanford Cars, Stanford Dogs, Oxford Flowers, ImageNet's devkit) read with scipy.

Files are loaded without `squeeze_me`, so that a one-sample split or a one-class list has the same
shape as a large one, and every cell or struct field is unwrapped here, one way: a cell of strings
comes back as a list of str, a numeric vector as int64, a struct array as a list of dicts.
Row or column vectors, char arrays and nested 1x1 cells all read the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from stages.data.errors import DataError


def load(path: Path, keys: tuple[str, ...]) -> dict:
    """The variables `keys` of a .mat file; a missing variable or an unreadable file names the file."""
    import scipy.io

    try:
        contents = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True)
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; save it as -v7 or use the official download") from None
    except Exception as error:  # noqa: BLE001 - scipy raises MatReadError, ValueError, TypeError ... on a damaged file
        if isinstance(error, FileNotFoundError):
            raise DataError(f"cannot read {path}: {error.strerror}") from None
        raise DataError(
            f"cannot read {path}: it is not a readable MATLAB file ({type(error).__name__}: {error}). "
            "Replace it with the file from the data set's official download, then run the same "
            "command again"
        ) from None
    missing = [key for key in keys if key not in contents]
    if missing:
        present = sorted(k for k in contents if not k.startswith("__"))
        raise DataError(f"{path} lacks the variable(s) {', '.join(missing)} (it has {', '.join(present) or 'none'})")
    return {key: contents[key] for key in keys}


def scalar(value):
    """A Python str, int or float from a MATLAB value wrapped in any number of 1-element arrays."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise DataError(f"expected one value, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    if isinstance(value, (np.integer, np.floating)) and float(value) == int(value):
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def strings(value) -> list[str]:
    """A cell array (or char array) of strings as a list of str, in MATLAB's column-major order."""
    array = np.asarray(value)
    if array.dtype.kind == "U":  # a char matrix: one string per row
        return [str(s).rstrip() for s in array.reshape(-1, order="F")]
    return [str(scalar(v)).rstrip() for v in array.reshape(-1, order="F")]


def integers(value) -> np.ndarray:
    """A numeric vector (row, column, or a cell of 1x1 numbers) as (N,) int64; non-integers are an error."""
    array = np.asarray(value)
    if array.dtype == object:
        array = np.asarray([scalar(v) for v in array.reshape(-1, order="F")])
    flat = array.reshape(-1, order="F").astype(np.float64)
    if flat.size and not np.all(flat == np.round(flat)):
        raise DataError("expected integers, got fractional values")
    return flat.astype(np.int64)


def records(value, fields: tuple[str, ...]) -> list[dict]:
    """A struct array as a list of {field: scalar}; a missing field is an error naming the fields there are."""
    array = np.asarray(value)
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DataError(f"the struct lacks the field(s) {', '.join(missing)} (it has {', '.join(names) or 'none'})")
    return [{f: scalar(item[f]) for f in fields} for item in array.reshape(-1, order="F")]


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Unwrapping errors inside the block name the file they come from."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
