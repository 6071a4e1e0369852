"""Image folders: `root/<split>/<class>/<image>`, read in a fixed order; and the split object every
data-set kind (`stages.data.registry`) hands to extraction.

Sample index i of a split is its i-th file in (class name, file name) order, the order the store's
`paths` record. How an image becomes model input: `stages.data.images`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.data.errors import DataError, MissingDataError
from stages.data.images import file_record, read_image
from stages.data.kind import IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageFolderSplit:
    root: Path  # the data root (paths are relative to it)
    name: str
    classes: list[str]
    paths: list[str]  # relative to root, in sample-index order
    labels: np.ndarray  # (N,) int64
    crop_bottom: int = 0  # rows cut off the bottom of each image before preprocessing (Aircraft's banner)
    meta: dict = field(default_factory=dict)  # what the store records of the data set beyond the file list

    def read(self, index: int, size: int, channels: int, **options):
        """`stages.data.images.read_image` of sample `index` (`options`: a model's resize, filter ...), with this
        data set's own crop: ((channels, size, size) tensor, file record)."""
        return read_image(self.root / self.paths[index], size, channels, crop_bottom=self.crop_bottom, **options)


def find_classes(root: Path, splits: list[str]) -> list[str]:
    """The class names of the data set: the sub-folders of the first split (every split must agree)."""
    reference = None
    for split in splits:
        directory = root / split
        if not directory.is_dir():
            raise MissingDataError(f"no split folder {directory}: expected {root}/<split>/<class>/<images>")
        entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
        for entry in entries:
            _check_link(entry, directory)
        classes = sorted(p.name for p in entries if p.is_dir())
        if not classes:
            raise DataError(f"{directory} has no class folders: expected {directory}/<class>/<images>")
        if reference is None:
            reference = classes
        elif set(classes) - set(reference):
            raise DataError(
                f"{directory} has classes {sorted(set(classes) - set(reference))} that {root / splits[0]} lacks"
            )
    return reference


def _check_link(entry: Path, folder: Path) -> None:
    """A class folder that is a symbolic link must lead to a folder outside the split (no loop)."""
    if not entry.is_symlink():
        return
    try:
        target = entry.resolve(strict=True)
    except (OSError, RuntimeError):
        raise DataError(
            f"{entry} is a symbolic link that leads nowhere (a loop, or a missing target); fix it or remove it"
        ) from None
    if folder.resolve().is_relative_to(target):
        raise DataError(
            f"{entry} links to {target}, which contains it (a loop): it would be a class without images; "
            "fix it or remove it"
        )


def scan_split(root: str | Path, split: str, classes: list[str]) -> ImageFolderSplit:
    root = Path(root)
    paths, labels = [], []
    for label, name in enumerate(classes):
        directory = root / split / name
        if not directory.is_dir():
            continue
        for file in sorted(directory.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                paths.append(file.relative_to(root).as_posix())
                labels.append(label)
    if not paths:
        raise DataError(f"split {split!r} in {root} has no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFolderSplit(root, split, list(classes), paths, np.asarray(labels, dtype=np.int64))


def scan(root: str | Path, splits: list[str]) -> dict[str, ImageFolderSplit]:
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"--data {root}: no such directory")
    classes = find_classes(root, splits)
    scanned = {split: scan_split(root, split, classes) for split in splits}
    first = scanned[splits[0]]
    empty = [name for label, name in enumerate(classes) if not np.any(first.labels == label)]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} of {root / splits[0]} hold no images (looked for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}); put images in them or remove them"
        )
    return scanned


def dataset_identity(splits: dict[str, ImageFolderSplit]) -> dict:
    """A hash of the file list (relative path, size, label): cheap at ImageNet scale, yet it changes
    when a file is added, removed, relabelled or replaced by one of another size. Data sets of other
    kinds, or with selections, add their `meta` (kind, metadata file hashes, roles, ...). Packed data
    (wds:, hf:) hashes its index instead (`stages.data.packed.packed_identity`)."""
    if not isinstance(next(iter(splits.values())), ImageFolderSplit):
        from stages.data.packed import packed_identity

        return packed_identity(splits)
    digest = hashlib.sha256()
    for name, split in splits.items():
        for path, label in zip(split.paths, split.labels):
            try:
                size = (split.root / path).stat().st_size
            except OSError:
                raise MissingDataError(
                    f"{split.root / path} is missing: the data set lists it in split {name!r}"
                    + (f" ({split.meta['kind']} metadata)" if split.meta else "")
                ) from None
            digest.update(f"{name}\t{path}\t{size}\t{label}\n".encode())
    first = next(iter(splits.values()))
    return {
        "file_list_sha256": digest.hexdigest(),
        "classes": first.classes,
        "splits": {name: len(split.paths) for name, split in splits.items()},
        **first.meta,
    }


def changed_images(split: ImageFolderSplit, records: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """(changed rows, touched rows, the touched rows' new records) of the images a store recorded.

    `records` (N, 2) are (content hash, mtime in ns) per image when it was read, 0 where never read. An
    image whose mtime differs is hashed again: another hash means it changed; the same hash means
    it was only touched (copied, checked out), and its new mtime should be recorded. Packed data
    (wds:, hf:) compares its containers' mtimes instead (`stages.data.packed.changed_samples`)."""
    if not isinstance(split, ImageFolderSplit):
        from stages.data.packed import changed_samples

        return changed_samples(split, records)
    changed, touched, updated = [], [], []
    for row in np.flatnonzero(records[:, 0] != 0):
        path = split.root / split.paths[row]
        try:
            if os.stat(path).st_mtime_ns == int(records[row, 1]):
                continue
            content, mtime = file_record(path)
        except OSError:
            changed.append(int(row))
            continue
        if content != int(records[row, 0]):
            changed.append(int(row))
        else:
            touched.append(int(row))
            updated.append((content, mtime))
    return changed, touched, np.asarray(updated, dtype=np.uint64).reshape(-1, 2)
