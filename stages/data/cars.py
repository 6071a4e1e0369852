"""Stanford Cars: the devkit's `cars_meta.mat` (class names), `cars_train_annos.mat` and
`cars_test_annos_withlabels.mat` (one struct per image: fname, class, bounding box), images in
`cars_train/` and `cars_test/`. Classes are 1-based in the files, 0-based here; whole images are
used (the bounding boxes are not), as in the paper's transfer setting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.data import matfiles
from stages.data.errors import DataError
from stages.data.kind import Kind, Listing, requested

_ANNOTATIONS = {
    "train": ("devkit/cars_train_annos.mat", "cars_train"),
    "test": ("cars_test_annos_withlabels.mat", "cars_test"),
}


def _find(root: Path, name: str) -> str:
    """The test annotations are a separate download: accepted beside the devkit or inside it."""
    for candidate in (name, f"devkit/{Path(name).name}"):
        if (root / candidate).exists():
            return candidate
    raise CARS.missing(root / name, "or in devkit/")


def read_cars(root: Path, splits: tuple[str, ...] | None) -> Listing:
    splits = requested(CARS, splits)
    meta = _find(root, "devkit/cars_meta.mat")
    with matfiles.reading(root / meta):
        classes = matfiles.strings(matfiles.load(root / meta, ("class_names",))["class_names"])
    out, files = {}, [meta]
    for split in splits:
        annotations, folder = _ANNOTATIONS[split]
        annotations = _find(root, annotations)
        if not (root / folder).is_dir():
            raise CARS.missing(root / folder, "the image folder")
        with matfiles.reading(root / annotations):
            rows = matfiles.records(
                matfiles.load(root / annotations, ("annotations",))["annotations"], ("fname", "class")
            )
        labels = np.asarray([row["class"] - 1 for row in rows], dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{root / annotations}: class ids outside 1..{len(classes)} of {meta}")
        out[split] = ([f"{folder}/{row['fname']}" for row in rows], labels)
        files.append(annotations)
    return Listing(root, classes, out, tuple(files))


CARS = Kind(
    name="cars",
    title="Stanford Cars",
    layout="cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and "
    "cars_test_annos_withlabels.mat (beside devkit/ or in it)",
    splits=("train", "test"),
    roles={"train": "train", "val": None, "test": "test"},
    classes="196",
    read=read_cars,
    signature=("devkit/cars_meta.mat", "cars_train"),
    archive_dir="stanford_cars",
)
