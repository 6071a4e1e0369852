"""FGVC-Aircraft 2013b: `data/images_<level>_<split>.txt` lines `<image id> <class name>`.

Class names contain spaces and slashes ("Boeing 707", "F/A-18"), so a line is split at its first
space only. Classes are in the order of `data/variants.txt` (`families.txt`, `manufacturers.txt`
for the coarser levels, kinds `aircraft-family` and `aircraft-manufacturer`). Every image carries
a 20-pixel copyright banner at the bottom, which its authors ask users to remove: the reader asks
for it to be cropped off before the project's resize and crop (`Listing.crop_bottom`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from stages.data.errors import DataError
from stages.data.kind import Kind, Listing, labels_of, read_table, requested, require

BANNER_PIXELS = 20
_CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


def read_aircraft(root: Path, splits: tuple[str, ...] | None, *, level: str) -> Listing:
    kind = KINDS[level]
    splits = requested(kind, splits)
    class_file = f"data/{_CLASS_FILES[level]}"
    path = require(kind, root, class_file)
    classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(classes)) != len(classes):
        raise DataError(f"{path} names a class twice")
    require(kind, root, "data/images", "the image folder")
    out, files = {}, [class_file]
    for split in splits:
        listed = f"data/images_{level}_{split}.txt"
        rows = read_table(kind, root, listed, 2)
        out[split] = (
            [f"data/images/{image_id}.jpg" for image_id, _ in rows],
            labels_of([name for _, name in rows], classes, root / listed),
        )
        files.append(listed)
    return Listing(root, classes, out, tuple(files), crop_bottom=BANNER_PIXELS)


def _kind(level: str, name: str, count: str, recognised: bool) -> Kind:
    return Kind(
        name=name,
        title=f"FGVC-Aircraft 2013b ({level})",
        layout=f"data/images/<id>.jpg, data/{_CLASS_FILES[level]} and data/images_{level}_{{train,val,test}}.txt "
        "(<id> <class name>); the 20-pixel banner at the bottom is cropped off",
        splits=("train", "val", "test"),
        roles={"train": "train", "val": "val", "test": "test"},
        classes=count,
        read=partial(read_aircraft, level=level),
        signature=("data/variants.txt", "data/images_variant_train.txt"),
        archive_dir="fgvc-aircraft-2013b",
        recognised=recognised,
    )


KINDS = {
    "variant": _kind("variant", "aircraft", "100 variants", True),
    "family": _kind("family", "aircraft-family", "70 families", False),
    "manufacturer": _kind("manufacturer", "aircraft-manufacturer", "30 manufacturers", False),
}
AIRCRAFT, AIRCRAFT_FAMILY, AIRCRAFT_MANUFACTURER = KINDS.values()
