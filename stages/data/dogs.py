"""Stanford Dogs: `Images/<wnid>-<breed>/<image>.jpg` with `train_list.mat` and `test_list.mat`
(`file_list`: paths under Images/, `labels`: 1-based). The class of label l is the folder its
images are in (e.g. "n02085620-Chihuahua"). Its images come from ImageNet's training set, so
features of a model trained on ImageNet have seen them (marked in transfer tables).
"""

from __future__ import annotations

from pathlib import Path

from stages.data import matfiles
from stages.data.errors import DataError
from stages.data.kind import Kind, Listing, requested, require


def read_dogs(root: Path, splits: tuple[str, ...] | None) -> Listing:
    splits = requested(DOGS, splits)
    require(DOGS, root, "Images", "the image folder")
    lists, folders = {}, {}
    for split in ("train", "test"):  # both lists name the classes, whichever splits are read
        listed = require(DOGS, root, f"{split}_list.mat")
        with matfiles.reading(listed):
            contents = matfiles.load(listed, ("file_list", "labels"))
            paths, labels = matfiles.strings(contents["file_list"]), matfiles.integers(contents["labels"])
        if len(paths) != len(labels):
            raise DataError(f"{listed}: {len(paths)} files but {len(labels)} labels")
        for path, label in zip(paths, labels.tolist()):
            folder = path.replace("\\", "/").split("/")[0]
            if folders.setdefault(label, folder) != folder:
                raise DataError(f"{listed}: label {label} is given to images of {folders[label]} and of {folder}")
        lists[split] = (paths, labels)
    ids = sorted(folders)
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(f"{root / 'train_list.mat'} and test_list.mat: labels must run 1..{len(ids)}")
    out = {split: ([f"Images/{p}" for p in lists[split][0]], lists[split][1] - 1) for split in splits}
    return Listing(root, [folders[i] for i in ids], out, ("train_list.mat", "test_list.mat"))


DOGS = Kind(
    name="dogs",
    title="Stanford Dogs",
    layout="Images/<wnid>-<breed>/<image>.jpg, train_list.mat and test_list.mat (file_list, labels)",
    splits=("train", "test"),
    roles={"train": "train", "val": None, "test": "test"},
    classes="120",
    read=read_dogs,
    signature=("Images", "train_list.mat"),
    overlaps="ImageNet-1k train (Stanford Dogs is drawn from it)",
)
