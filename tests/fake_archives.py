"""Tiny fake data sets in each official layout, written the way their archives are: the archives'
own directory names, text files, .mat files through scipy.io.savemat (cells as object arrays,
structs as record arrays, MATLAB's row vectors), and small JPEGs.

Each writer returns the path to pass as --data and what the official files say (the expectations).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def jpeg(path: Path, seed: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=90)


def text(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def cell(strings, shape) -> np.ndarray:
    """A MATLAB cell array of strings."""
    out = np.empty(len(strings), dtype=object)
    for i, s in enumerate(strings):
        out[i] = np.array([s])
    return out.reshape(shape)


def struct_array(rows: list[dict]) -> np.ndarray:
    """A 1xN MATLAB struct array, each field a MATLAB value (numbers as 1x1 matrices, strings as char)."""
    fields = list(rows[0])
    array = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            value = row[f]
            array[0, i][f] = np.array([value]) if isinstance(value, str) else np.array([[value]], dtype=np.uint16)
    return array


# -- CUB-200-2011 ---------------------------------------------------------------------------------
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(parent: Path, *, per_class=(3, 2)) -> tuple[Path, dict]:
    """parent/CUB_200_2011 with `per_class` = (train, test) images of each of 3 classes."""
    root = parent / "CUB_200_2011"
    images, labels, split, expected = [], [], [], {"train": [], "test": []}
    image_id = 0
    for label, name in enumerate(CUB_CLASSES):
        for k in range(sum(per_class)):
            image_id += 1
            relative = f"{name}/{name.split('.')[1]}_{k:04d}_{image_id}.jpg"
            jpeg(root / "images" / relative, image_id)
            is_train = int(k < per_class[0])
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {is_train}")
            expected["train" if is_train else "test"].append((f"images/{relative}", label))
    text(root / "images.txt", images)
    text(root / "image_class_labels.txt", labels)
    text(root / "train_test_split.txt", split)
    text(root / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(CUB_CLASSES)])
    text(parent / "attributes.txt", ["1 has_bill_shape::curved"])  # beside the archive folder, as in the tgz
    return root, expected


# -- NABirds --------------------------------------------------------------------------------------
NABIRDS_CLASSES = {
    0: "Birds",
    1: "Perching Birds",
    295: "Oak Titmouse",
    817: "Cedar Waxwing (Adult)",
    1000: "Red-tailed Hawk (Dark morph)",
}
NABIRDS_PARENTS = {1: 0, 295: 1, 817: 1, 1000: 0}


def make_nabirds(parent: Path) -> tuple[Path, dict]:
    """parent/nabirds: leaves 295, 817, 1000 (labels 0, 1, 2), 2 train and 1 test image each."""
    root = parent / "nabirds"
    images, labels, split, expected = [], [], [], {"train": [], "test": []}
    for n, (class_id, k) in enumerate((c, k) for c in (1000, 295, 817) for k in range(3)):
        image_id = f"{n:08x}-21dc-4d0c-bfe1-4cae3c85c829"
        relative = f"{class_id:04d}/{image_id.replace('-', '')}.jpg"
        jpeg(root / "images" / relative, n)
        images.append(f"{image_id} {relative}")
        labels.append(f"{image_id} {class_id}")
        split.append(f"{image_id} {int(k < 2)}")
        expected["train" if k < 2 else "test"].append((f"images/{relative}", {295: 0, 817: 1, 1000: 2}[class_id]))
    text(root / "images.txt", images)
    text(root / "image_class_labels.txt", labels)
    text(root / "train_test_split.txt", split)
    text(root / "classes.txt", [f"{i} {name}" for i, name in NABIRDS_CLASSES.items()])
    text(root / "hierarchy.txt", [f"{child} {parent}" for child, parent in NABIRDS_PARENTS.items()])
    return root, expected


# -- FGVC-Aircraft 2013b --------------------------------------------------------------------------
AIRCRAFT = [
    ("Cessna 172", "Cessna 172", "Cessna"),
    ("F/A-18", "F/A-18", "McDonnell Douglas"),
    ("707-320", "Boeing 707", "Boeing"),
]


def banner_jpeg(path: Path, *, width=24, height=44, banner=20) -> None:
    """Black above, a white banner of `banner` rows at the bottom (as FGVC-Aircraft's images carry)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[height - banner :] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="PNG")  # .jpg name, lossless bytes: exact pixels


def make_aircraft(parent: Path) -> tuple[Path, dict]:
    root = parent / "fgvc-aircraft-2013b"
    data = root / "data"
    expected = {}
    number = 1000000
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        rows = {"variant": [], "family": [], "manufacturer": []}
        expected[split] = []
        for label, names in enumerate(AIRCRAFT):
            for _ in range(count):
                number += 7
                banner_jpeg(data / "images" / f"{number:07d}.jpg")
                for level, name in zip(rows, names):
                    rows[level].append(f"{number:07d} {name}")
                expected[split].append((f"data/images/{number:07d}.jpg", label))
        for level, lines in rows.items():
            text(data / f"images_{level}_{split}.txt", lines)
    text(data / "variants.txt", [v for v, _, _ in AIRCRAFT])
    text(data / "families.txt", sorted({f for _, f, _ in AIRCRAFT}))
    text(data / "manufacturers.txt", sorted({m for _, _, m in AIRCRAFT}))
    return root, expected


# -- Stanford Cars --------------------------------------------------------------------------------
CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]


def make_cars(root: Path, *, test_count=1) -> tuple[Path, dict]:
    """The devkit beside cars_train/ and cars_test/; the test annotations (one sample by default: MATLAB's
    1x1 struct quirk) at the top level."""
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(CARS, (1, len(CARS)))})
    expected = {}
    for split, count, annotation_file in (
        ("train", 4, root / "devkit" / "cars_train_annos.mat"),
        ("test", test_count, root / "cars_test_annos_withlabels.mat"),
    ):
        rows, expected[split] = [], []
        for i in range(count):
            name = f"{i + 1:05d}.jpg"
            label = (i * 2 + (split == "test")) % len(CARS)
            jpeg(root / f"cars_{split}" / name, i + 100 * (split == "test"))
            rows.append({"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 8, "class": label + 1, "fname": name})
            expected[split].append((f"cars_{split}/{name}", label))
        scipy.io.savemat(annotation_file, {"annotations": struct_array(rows)})
    return root, expected


# -- Stanford Dogs --------------------------------------------------------------------------------
DOGS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02116738-African_hunting_dog"]


def make_dogs(root: Path) -> tuple[Path, dict]:
    expected = {}
    for split, count in (("train", 2), ("test", 1)):
        files, labels, expected[split] = [], [], []
        for label, folder in enumerate(DOGS):
            for k in range(count):
                relative = f"{folder}/{folder.split('-')[0]}_{k + 10 * (split == 'test')}.jpg"
                jpeg(root / "Images" / relative, len(files) + 50 * (split == "test"))
                files.append(relative)
                labels.append(label + 1)
                expected[split].append((f"Images/{relative}", label))
        scipy.io.savemat(
            root / f"{split}_list.mat",
            {
                "file_list": cell(files, (len(files), 1)),
                "annotation_list": cell([f[:-4] for f in files], (len(files), 1)),
                "labels": np.asarray(labels, dtype=np.float64).reshape(-1, 1),
            },
        )
    return root, expected


# -- Oxford Flowers-102 ---------------------------------------------------------------------------
def make_flowers(root: Path) -> tuple[Path, dict]:
    """12 images of 3 classes; the published split order is not sorted (kept as published)."""
    labels = np.array([3, 1, 2, 1, 2, 3, 3, 2, 1, 1, 2, 3], dtype=np.uint8)
    for i in range(len(labels)):
        jpeg(root / "jpg" / f"image_{i + 1:05d}.jpg", i)
    sets = {"trnid": [5, 2, 1], "valid": [3, 4, 6], "tstid": [12, 7, 8, 9, 10, 11]}
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    scipy.io.savemat(root / "setid.mat", {k: np.asarray(v, dtype=np.uint16).reshape(1, -1) for k, v in sets.items()})
    expected = {
        split: [(f"jpg/image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in sets[key]]
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }
    return root, expected


# -- ImageNet -------------------------------------------------------------------------------------
# (ILSVRC2012 id, wnid, words): the devkit's ids are not in wnid order
IMAGENET = [
    (1, "n02119789", "kit fox, Vulpes macrotis"),
    (2, "n01601694", "water ouzel, dipper"),
    (3, "n01440764", "tench, Tinca tinca"),
]


def make_imagenet(root: Path, *, flat_val=True, devkit=True, train_names=None) -> tuple[Path, dict]:
    """train/<wnid>/ (2 images each, or the file names `train_names` gives per wnid) and val/ flat with the
    devkit (or in class folders)."""
    wnids = sorted(w for _, w, _ in IMAGENET)
    expected = {"train": [], "val": []}
    for wnid in wnids:
        for name in (train_names or {}).get(wnid, [f"{wnid}_{k}.JPEG" for k in (7, 3)]):
            jpeg(root / "train" / wnid / name, zlib.crc32(name.encode()))
        for name in sorted((train_names or {}).get(wnid, [f"{wnid}_{k}.JPEG" for k in (7, 3)])):
            expected["train"].append((f"train/{wnid}/{name}", wnids.index(wnid)))
    truth = [3, 1, 2, 1]  # ILSVRC2012 ids of val images 1..4
    by_id = {i: w for i, w, _ in IMAGENET}
    for number, class_id in enumerate(truth, 1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        wnid = by_id[class_id]
        jpeg(root / "val" / (name if flat_val else f"{wnid}/{name}"), 500 + number)
        expected["val"].append((f"val/{name}" if flat_val else f"val/{wnid}/{name}", wnids.index(wnid)))
    if not flat_val:
        expected["val"].sort(key=lambda item: item[0])
    if devkit:
        data = root / "ILSVRC2012_devkit_t12" / "data"
        text(data / "ILSVRC2012_validation_ground_truth.txt", truth)
        rows = [{"ILSVRC2012_ID": i, "WNID": w, "words": words, "num_children": 0} for i, w, words in IMAGENET]
        rows.append({"ILSVRC2012_ID": 1001, "WNID": "n00001740", "words": "entity", "num_children": 3})
        scipy.io.savemat(data / "meta.mat", {"synsets": struct_array(rows).reshape(-1, 1)})
    return root, expected
