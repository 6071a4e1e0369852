"""CUB-200-2011 and NABirds: the Caltech/Cornell text-file layout (ids, paths, labels, split flags).

Both archives hold `images.txt` (<image id> <path under images/>), `image_class_labels.txt`
(<image id> <class id>), `train_test_split.txt` (<image id> <1 train, 0 test>) and `classes.txt`
(<class id> <name>). Samples keep the order of `images.txt`. NABirds adds `hierarchy.txt`
(<child id> <parent id>): its images are labelled with the 555 leaf classes (of 1011 ids, most of
them inner nodes of the taxonomy), which are remapped to 0..554 in id order; the original ids are
recorded (`label_ids`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.data.errors import DataError
from stages.data.kind import Kind, Listing, read_table, requested

_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _split_listing(kind: Kind, root: Path, splits: tuple[str, ...]) -> tuple[dict, dict, list[str]]:
    """({split: [(image id, path)]}, {image id: class id}, the image ids in images.txt order)."""
    images = read_table(kind, root, "images.txt", 2)
    labels = dict(read_table(kind, root, "image_class_labels.txt", 2))
    is_train = dict(read_table(kind, root, "train_test_split.txt", 2))
    chosen = {split: [] for split in splits}
    for image_id, path in images:
        if image_id not in labels or image_id not in is_train:
            missing = "image_class_labels.txt" if image_id not in labels else "train_test_split.txt"
            raise DataError(f"{root / missing} has no line for image {image_id} of {root / 'images.txt'}")
        if is_train[image_id] not in ("0", "1"):
            raise DataError(
                f"{root / 'train_test_split.txt'}: image {image_id} is marked {is_train[image_id]!r}, "
                "expected 1 (train) or 0 (test)"
            )
        split = "train" if is_train[image_id] == "1" else "test"
        if split in chosen:
            chosen[split].append((image_id, f"images/{path}"))
    return chosen, labels, [image_id for image_id, _ in images]


def read_cub(root: Path, splits: tuple[str, ...] | None) -> Listing:
    splits = requested(CUB, splits)
    chosen, labels, _ = _split_listing(CUB, root, splits)
    classes = read_table(CUB, root, "classes.txt", 2)
    ids = [int(class_id) for class_id, _ in classes]
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(f"{root / 'classes.txt'}: class ids must run 1..{len(ids)} in order")
    names = [name for _, name in classes]
    out = {}
    for split, items in chosen.items():
        label = np.asarray([int(labels[i]) - 1 for i, _ in items], dtype=np.int64)
        if label.size and (label.min() < 0 or label.max() >= len(names)):
            raise DataError(f"{root / 'image_class_labels.txt'} has class ids outside 1..{len(names)} of classes.txt")
        out[split] = ([p for _, p in items], label)
    return Listing(root, names, out, _FILES)


def read_nabirds(root: Path, splits: tuple[str, ...] | None) -> Listing:
    splits = requested(NABIRDS, splits)
    chosen, labels, order = _split_listing(NABIRDS, root, splits)
    names = {int(class_id): name for class_id, name in read_table(NABIRDS, root, "classes.txt", 2)}
    parents = {int(parent) for _, parent in read_table(NABIRDS, root, "hierarchy.txt", 2)}
    used = sorted({int(labels[i]) for i in order})
    unknown = [c for c in used if c not in names]
    if unknown:
        raise DataError(f"{root / 'image_class_labels.txt'} uses class ids {unknown[:5]} that classes.txt lacks")
    inner = [c for c in used if c in parents]
    if inner:
        raise DataError(
            f"{root / 'image_class_labels.txt'} labels images with class ids {inner[:5]}, which "
            "hierarchy.txt lists as parents: NABirds labels images with leaf classes only"
        )
    remap = {class_id: label for label, class_id in enumerate(used)}
    out = {
        split: ([p for _, p in items], np.asarray([remap[int(labels[i])] for i, _ in items], dtype=np.int64))
        for split, items in chosen.items()
    }
    return Listing(
        root, [names[c] for c in used], out, (*_FILES, "hierarchy.txt"), extra={"per_class": {"label_ids": used}}
    )


_LAYOUT = (
    "images/<class>/<image>.jpg beside images.txt (<id> <path>), image_class_labels.txt (<id> <class id>), "
    "train_test_split.txt (<id> <1|0>), classes.txt (<class id> <name>)"
)
CUB = Kind(
    name="cub",
    title="CUB-200-2011",
    layout=_LAYOUT,
    splits=("train", "test"),
    roles={"train": "train", "val": None, "test": "test"},
    classes="200",
    read=read_cub,
    signature=_FILES + ("images",),
    archive_dir="CUB_200_2011",
)
NABIRDS = Kind(
    name="nabirds",
    title="NABirds",
    layout=_LAYOUT + ", hierarchy.txt (<child id> <parent id>)",
    splits=("train", "test"),
    roles={"train": "train", "val": None, "test": "test"},
    classes="555 leaves (ids remapped to 0..554)",
    read=read_nabirds,
    signature=_FILES + ("hierarchy.txt", "images"),
    archive_dir="nabirds",
)
