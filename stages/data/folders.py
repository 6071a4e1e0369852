"""Image folders: `root/<split>/<class>/<image>`, read in a fixed order and preprocessed as ADM expects.

Sample index i of a split is its i-th file in (class name, file name) order, the order the store's
`paths` record. Preprocessing: RGB or grayscale to the model's input channels, short side resized
to the model's sample size (bicubic), centre crop, scaled to [-1, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class ImageFolderSplit:
    root: Path  # the data root (paths are relative to it)
    name: str
    classes: list[str]
    paths: list[str]  # relative to root, in sample-index order
    labels: np.ndarray  # (N,) int64


def find_classes(root: Path, splits: list[str]) -> list[str]:
    """The class names of the data set: the sub-folders of the first split (every split must agree)."""
    reference = None
    for split in splits:
        directory = root / split
        if not directory.is_dir():
            raise DataError(f"no split folder {directory}: expected {root}/<split>/<class>/<images>")
        classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{directory} has no class folders: expected {directory}/<class>/<images>")
        if reference is None:
            reference = classes
        elif set(classes) - set(reference):
            raise DataError(
                f"{directory} has classes {sorted(set(classes) - set(reference))} that {root / splits[0]} lacks"
            )
    return reference


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
        raise DataError(f"--data {root}: no such directory")
    classes = find_classes(root, splits)
    return {split: scan_split(root, split, classes) for split in splits}


def dataset_identity(splits: dict[str, ImageFolderSplit]) -> dict:
    """A hash of the file list (relative path, size, label): cheap at ImageNet scale, yet it changes
    when a file is added, removed, relabelled or replaced by one of another size."""
    digest = hashlib.sha256()
    for name, split in splits.items():
        for path, label in zip(split.paths, split.labels):
            size = (split.root / path).stat().st_size
            digest.update(f"{name}\t{path}\t{size}\t{label}\n".encode())
    first = next(iter(splits.values()))
    return {
        "file_list_sha256": digest.hexdigest(),
        "classes": first.classes,
        "splits": {name: len(split.paths) for name, split in splits.items()},
    }


def preprocessing(size: int, channels: int) -> dict:
    return {"resize": "short side, bicubic", "size": size, "crop": "centre", "channels": channels, "range": [-1, 1]}


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """(channels, size, size) float32 in [-1, 1]."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            width, height = image.size
            scale = size / min(width, height)
            resized = (max(size, round(width * scale)), max(size, round(height * scale)))
            if resized != image.size:
                image = image.resize(resized, Image.BICUBIC)
            left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    if channels not in (1, 3):
        raise DataError(f"models with {channels} input channels are not supported (1 or 3)")
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array / 127.5 - 1.0)
