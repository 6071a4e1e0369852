"""Data sets whose images are packed in containers (WebDataset tars, Hugging Face datasets), and the split
object they hand to extraction.

A `PackedSplit` looks to extraction exactly like an image folder's split (`stages.data.folders.
ImageFolderSplit`: root, name, classes, paths, labels, meta, `read`), but its images are byte ranges
of a container that a `Source` fetches by sample index: any sample can be read without reading the
samples before it, so a resumed run, or one rank of many, reads only the samples of its own chunks.

What the store records per sample is what it records for a file: the content hash of exactly the
bytes decoded, and the modification time (ns) of the container they came from. A container whose
modification time changed is read again to tell a changed image from a touched container.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.data.images import content_hash, load_image


class Remote(str):
    """An fsspec URL where extraction expects a data root `Path` (it records `root.resolve()`)."""

    def resolve(self) -> Remote:
        return self


class Source:
    """Reads the bytes of sample `index`; subclasses hold an index of where each sample lies.

    Instances travel to DataLoader workers by pickling: open files are kept out of the pickled state."""

    def fetch(self, index: int) -> tuple[bytes, int]:
        """(the image's bytes, the container's modification time in ns) of sample `index`."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """How an error names sample `index` (container and member)."""
        raise NotImplementedError

    def mtimes(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) int64: the current modification time (ns) of the container of each row."""
        raise NotImplementedError

    def subset(self, rows: np.ndarray) -> Source:
        """The source of samples `rows` (in that order): `--classes` and `--subset` selections."""
        raise NotImplementedError


@dataclass(frozen=True)
class PackedSplit:
    root: Path | Remote  # where the data set lies (recorded as the store's data root)
    name: str
    classes: list[str]
    paths: list[str]  # the sample keys the store records, in sample-index order
    labels: np.ndarray  # (N,) int64
    source: Source = field(repr=False)
    identity_lines: list[str] = field(repr=False, default_factory=list)  # what the data set's identity hashes
    crop_bottom: int = 0
    meta: dict = field(default_factory=dict)  # kind, containers and their sizes, columns: recorded with the data set

    def read(self, index: int, size: int, channels: int, **options):
        """`stages.data.images.load_image` of sample `index` (`options`: a model's resize, filter ...):
        ((channels, size, size) tensor, (content hash, container mtime in ns))."""
        data, mtime = self.source.fetch(index)
        image = load_image(self.source.where(index), size, channels, data=data, crop_bottom=self.crop_bottom, **options)
        return image, (content_hash(data), mtime)

    def select(self, rows: np.ndarray, classes: list[str], labels: np.ndarray, meta: dict) -> PackedSplit:
        """The split of samples `rows` (a `--classes` / `--subset` selection), relabelled."""
        rows = np.asarray(rows, dtype=np.int64)
        return PackedSplit(
            self.root,
            self.name,
            list(classes),
            [self.paths[i] for i in rows],
            np.asarray(labels, dtype=np.int64),
            self.source.subset(rows),
            [self.identity_lines[i] for i in rows] if self.identity_lines else [],
            self.crop_bottom,
            meta,
        )


def packed_identity(splits: dict[str, PackedSplit]) -> dict:
    """The data set's identity: a hash of every sample's key, container, stored size and label per split
    (what the container index already knows, so nothing is decoded), with the split sizes and the kind's
    record (containers, columns)."""
    digest = hashlib.sha256()
    for name, split in splits.items():
        for line, label in zip(split.identity_lines, split.labels):
            digest.update(f"{name}\t{line}\t{label}\n".encode())
    first = next(iter(splits.values()))
    return {
        "file_list_sha256": digest.hexdigest(),
        "classes": first.classes,
        "splits": {name: len(split.paths) for name, split in splits.items()},
        **first.meta,
    }


def changed_samples(split: PackedSplit, records: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """`stages.data.folders.changed_images` for packed samples: a sample whose container's modification time
    differs from the recorded one is read and hashed again (changed: another hash; touched: the same)."""
    recorded = np.flatnonzero(records[:, 0] != 0)
    if len(recorded) == 0:
        return [], [], np.zeros((0, 2), np.uint64)
    now = split.source.mtimes(recorded)
    changed, touched, updated = [], [], []
    for row, mtime in zip(recorded, now):
        if int(mtime) == int(records[row, 1]):
            continue
        try:
            data, mtime = split.source.fetch(int(row))
        except OSError:
            changed.append(int(row))
            continue
        if content_hash(data) != int(records[row, 0]):
            changed.append(int(row))
        else:
            touched.append(int(row))
            updated.append((content_hash(data), mtime))
    return changed, touched, np.asarray(updated, dtype=np.uint64).reshape(-1, 2)
