"""ImageNet ILSVRC-2012: `train/<wnid>/*.JPEG`, and `val/` either in class folders or flat as
published (`ILSVRC2012_val_<00000001>.JPEG`) with the devkit's ground truth
(`ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`, ILSVRC2012 ids, and
`meta.mat`, which maps those ids to wnids). Classes are the wnids in sorted order (torchvision's
order); their names ("tench, Tinca tinca") come from the devkit's `meta.mat` where it is present.

A layout is recognised as ImageNet only when its val/ is flat: with class folders it reads the
same as a plain image folder, and stays one (its stores keep their identity); `imagenet:PATH`
asks for this reader explicitly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stages.data import matfiles
from stages.data.errors import DataError
from stages.data.kind import IMAGE_SUFFIXES, Kind, Listing, requested, require

DEVKIT = "ILSVRC2012_devkit_t12/data"
GROUND_TRUTH = f"{DEVKIT}/ILSVRC2012_validation_ground_truth.txt"
META = f"{DEVKIT}/meta.mat"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG", re.IGNORECASE)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_flat(folder: Path) -> bool:
    return folder.is_dir() and any(_VAL_NAME.fullmatch(p.name) for p in folder.iterdir())


def detect(root: Path) -> bool:
    return (root / "train").is_dir() and _is_flat(root / "val")


def _synsets(root: Path) -> dict[int, tuple[str, str]] | None:
    """{ILSVRC2012 id: (wnid, words)} of the 1000 classes (the leaves: meta.mat also lists the inner
    synsets of the hierarchy) in the devkit's meta.mat, or None without a devkit."""
    if not (root / META).exists():
        return None
    with matfiles.reading(root / META):
        rows = matfiles.records(
            matfiles.load(root / META, ("synsets",))["synsets"], ("ILSVRC2012_ID", "WNID", "words", "num_children")
        )
    return {int(r["ILSVRC2012_ID"]): (str(r["WNID"]), str(r["words"])) for r in rows if int(r["num_children"]) == 0}


def read_imagenet(root: Path, splits: tuple[str, ...] | None) -> Listing:
    splits = requested(IMAGENET, splits)
    for split in splits:
        require(IMAGENET, root, split, f"the {split} images")
    synsets = _synsets(root)
    flat = "val" in splits and _is_flat(root / "val")
    reference = "train" if "train" in splits else "val"
    if flat and reference == "val":
        if synsets is None:
            raise IMAGENET.missing(root / META, "it maps the ground truth's ids to wnids")
        classes = sorted(wnid for wnid, _ in synsets.values())
    else:
        classes = _class_folders(root / reference)
    if not classes:
        raise DataError(f"{root / reference} has no class folders: ImageNet (imagenet:) expects {IMAGENET.layout}")
    index = {wnid: label for label, wnid in enumerate(classes)}
    out, files = {}, []
    for split in splits:
        if split == "val" and flat:
            out[split] = _flat_val(root, index, synsets)
            files += [GROUND_TRUTH, META]
            continue
        paths, labels = [], []
        folders = _class_folders(root / split)
        extra = sorted(set(folders) - set(index))
        if extra:
            raise DataError(f"{root / split} has class folders {extra[:5]} that {root / reference} lacks")
        for wnid in folders:
            for image in _images(root / split / wnid):
                paths.append(f"{split}/{wnid}/{image.name}")
                labels.append(index[wnid])
        out[split] = (paths, np.asarray(labels, dtype=np.int64))
    if synsets is not None and META not in files:
        files.append(META)
    extra = {}
    if synsets is not None:
        words = {wnid: name for wnid, name in synsets.values()}
        extra = {"per_class": {"class_names": [words.get(w, w) for w in classes]}}
    return Listing(root, classes, out, tuple(files), extra=extra)


def _flat_val(root: Path, index: dict[str, int], synsets: dict | None) -> tuple[list[str], np.ndarray]:
    truth_file = require(IMAGENET, root, GROUND_TRUTH, "the ids of the flat val/ images' classes")
    if synsets is None:
        raise IMAGENET.missing(root / META, "it maps the ground truth's ids to wnids")
    truth = [int(line) for line in truth_file.read_text().split()]
    paths, labels = [], []
    for image in _images(root / "val"):
        match = _VAL_NAME.fullmatch(image.name)
        if not match:
            raise DataError(f"{image}: a flat val/ holds ILSVRC2012_val_<8 digits>.JPEG files only")
        number = int(match.group(1))
        if not 1 <= number <= len(truth):
            raise DataError(f"{image}: {truth_file} has no line {number}")
        wnid = synsets.get(truth[number - 1], (None,))[0]
        if wnid not in index:
            raise DataError(
                f"{image}: its class {wnid or truth[number - 1]} (in {truth_file}) is not a class folder of train/"
            )
        paths.append(f"val/{image.name}")
        labels.append(index[wnid])
    return paths, np.asarray(labels, dtype=np.int64)


IMAGENET = Kind(
    name="imagenet",
    title="ImageNet ILSVRC-2012",
    layout="train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, or a flat val/ILSVRC2012_val_<00000001>.JPEG with "
    f"{GROUND_TRUTH} and {META}",
    splits=("train", "val"),
    roles={"train": "train", "val": None, "test": "val"},
    classes="1000 (wnids; names from the devkit)",
    read=read_imagenet,
    detect=detect,
    overlaps="ImageNet-1k (the pre-training data of ImageNet models)",
)
