"""Oxford Flowers-102: `jpg/image_<00001>.jpg`, `imagelabels.mat` (`labels`, 1..102 per image) and
`setid.mat` (`trnid`, `valid`, `tstid`: 1-based image numbers). The published train and val
splits hold 10 images per class each and test the remaining 6,149: train is the small one. The
archive names no classes, so classes are named by their label, "1".."102".
"""

from __future__ import annotations

from pathlib import Path

from stages.data import matfiles
from stages.data.errors import DataError
from stages.data.kind import Kind, Listing, requested, require

_SET_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def read_flowers(root: Path, splits: tuple[str, ...] | None) -> Listing:
    splits = requested(FLOWERS, splits)
    require(FLOWERS, root, "jpg", "the image folder")
    labels_file, sets_file = require(FLOWERS, root, "imagelabels.mat"), require(FLOWERS, root, "setid.mat")
    with matfiles.reading(labels_file):
        labels = matfiles.integers(matfiles.load(labels_file, ("labels",))["labels"])
    with matfiles.reading(sets_file):
        sets = matfiles.load(sets_file, tuple(_SET_KEYS[s] for s in splits))
        numbers = {split: matfiles.integers(sets[_SET_KEYS[split]]) for split in splits}
    count = int(labels.max()) if labels.size else 0
    if labels.size == 0 or labels.min() < 1:
        raise DataError(f"{labels_file}: labels must be 1..K, got {labels.min() if labels.size else 'none'}")
    out = {}
    for split, ids in numbers.items():
        if ids.size and (ids.min() < 1 or ids.max() > labels.size):
            raise DataError(
                f"{sets_file}: {_SET_KEYS[split]} holds image numbers outside 1..{labels.size} of imagelabels.mat"
            )
        out[split] = ([f"jpg/image_{i:05d}.jpg" for i in ids.tolist()], labels[ids - 1] - 1)
    return Listing(root, [str(c) for c in range(1, count + 1)], out, ("imagelabels.mat", "setid.mat"))


FLOWERS = Kind(
    name="flowers",
    title="Oxford Flowers-102",
    layout="jpg/image_<00001>.jpg, imagelabels.mat (labels) and setid.mat (trnid, valid, tstid)",
    splits=("train", "val", "test"),
    roles={"train": "train", "val": "val", "test": "test"},
    classes="102 (named 1..102: the archive has no names)",
    read=read_flowers,
    signature=("jpg", "imagelabels.mat", "setid.mat"),
    archive_dir="flowers-102",  # torchvision's folder name
)
