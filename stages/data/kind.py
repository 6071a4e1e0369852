"""What every data-set reader shares: a `Kind` (the registry row) and the `Listing` a reader returns.

A reader turns a data set as its authors publish it into a listing: image paths relative to the
data root, labels 0..K-1 and class names per official split, and the metadata files it was read
from (hashed into the store's identity). `stages.data.registry` holds the kinds; `pipeline
datasets` prints them. Nothing here decodes an image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.data.errors import DataError, MissingDataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Listing:
    root: Path  # image paths are relative to it
    classes: list[str]  # label l is classes[l]
    splits: dict[str, tuple[list[str], np.ndarray]]  # split -> (paths, labels (N,) int64), official order
    files: tuple[str, ...] = ()  # metadata files (relative to root) the listing was read from
    extra: dict = field(default_factory=dict)  # recorded with the data set, e.g. NABirds' original class ids
    crop_bottom: int = 0  # rows cut off the bottom of every image before preprocessing (Aircraft's banner)


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    layout: str  # the expected layout, as `pipeline datasets` and missing-file errors print it
    splits: tuple[str, ...]  # the official splits
    roles: dict  # default probe split roles: {"train": ..., "val": ... or None, "test": ...}
    classes: str  # how many classes, e.g. "200"
    read: Callable[[Path, tuple[str, ...]], Listing]  # (data root, splits requested) -> listing
    signature: tuple[str, ...] = ()  # files (relative to the root) that recognise the layout
    archive_dir: str | None = None  # the folder the official archive unpacks to, accepted as the root's child
    overlaps: str | None = None  # pre-training data its images are drawn from (marked in transfer tables)
    recognised: bool = True  # False: only by an explicit `kind:` prefix (e.g. Aircraft's coarser levels)
    detect: Callable[[Path], bool] | None = None  # recognises the layout where files alone cannot

    def root_of(self, path: Path) -> Path | None:
        """`path` or its archive folder when the layout is recognised there, else None."""
        for candidate in (path, path / self.archive_dir) if self.archive_dir else (path,):
            if self.detect is not None:
                if self.detect(candidate):
                    return candidate
            elif self.signature and all((candidate / name).exists() for name in self.signature):
                return candidate
        return None

    def missing(self, path: Path, what: str) -> MissingDataError:
        return MissingDataError(
            f"{path} is missing: {self.title} ({self.name}:) expects {self.layout}" + (f" ({what})" if what else "")
        )


def require(kind: Kind, root: Path, relative: str, what: str = "") -> Path:
    """root/relative, which must exist; else the kind's missing-file error naming it and the layout."""
    path = root / relative
    if not path.exists():
        raise kind.missing(path, what)
    return path


def read_table(kind: Kind, root: Path, relative: str, columns: int) -> list[list[str]]:
    """The rows of a whitespace-separated text file, split into `columns` fields (the last one keeps its
    spaces: class names such as "Boeing 707-320" or "Black-footed Albatross")."""
    path = require(kind, root, relative)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split(None, columns - 1)
        if len(fields) != columns:
            raise DataError(f"{path} line {number}: expected {columns} fields, got {line.strip()!r}")
        rows.append(fields)
    if not rows:
        raise DataError(f"{path} is empty: {kind.title} ({kind.name}:) expects {kind.layout}")
    return rows


def labels_of(names: list[str], classes: list[str], where: Path) -> np.ndarray:
    """Labels (N,) int64 of class names, in `classes` order; an unknown name is an error naming `where`."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise DataError(f"{where} names class(es) {unknown[:5]} that its class list lacks")
    return np.asarray([index[n] for n in names], dtype=np.int64)


def requested(kind: Kind, splits: tuple[str, ...] | None) -> tuple[str, ...]:
    """The splits asked for (None: all official ones), each of which must be official."""
    if splits is None:
        return kind.splits
    unknown = [s for s in splits if s not in kind.splits]
    if unknown:
        raise DataError(
            f"{kind.title} has no split(s) {', '.join(unknown)}: its official splits are "
            f"{', '.join(kind.splits)} (--splits picks among them)"
        )
    return tuple(splits)
