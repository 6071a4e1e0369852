"""Hugging Face datasets as a data set: `--data hf:PATH_OR_ID[:CONFIG]`, through the `datasets` library.

    --data hf:/data/imagenet-disk          a `save_to_disk` folder (datasets.load_from_disk)
    --data hf:/data/imagenet-parquet       a folder of parquet files named by split (datasets.load_dataset)
    --data hf:ILSVRC/imagenet-1k           a Hub id (downloaded by `datasets`; offline it is a one-line error)
    --data hf:user/set:CONFIG              a Hub data set's configuration

The image column is the one whose feature is `Image` and the label column the one whose feature is
`ClassLabel` (its names are the class names), unless `--image-column` / `--label-column` name
them; a label column of plain integers has the label numbers as class names. The splits are the
data set's own (`--splits` picks among them). Sample i of a split is its row i: the store records
"SPLIT/ROW" as its path, and per sample the content hash of the image's bytes (decoded from the
bytes the data set holds, never re-encoded) and the modification time of the split's arrow files.
A parquet folder is converted once into the `datasets` cache by `load_dataset` (its own behaviour:
the disk space of the data set again, in HF_DATASETS_CACHE); a `save_to_disk` folder is used in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache.extras import require
from stages.data.errors import DataError, MissingDataError
from stages.data.packed import PackedSplit, Remote, Source


def _datasets():
    return require("datasets", "hf", "--data hf:")


def load(text: str):
    """(DatasetDict, where: a local folder Path or a Hub id) of what follows `hf:`."""
    datasets = _datasets()
    path, config = text, None
    if not Path(text).exists() and text.count(":") >= 1:
        path, config = text.rsplit(":", 1)
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise MissingDataError(
                f"--data hf:{text}: {local} is not a folder (a save_to_disk folder, or one of parquet files)"
            )
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            loaded = datasets.load_from_disk(str(local))
        else:
            try:
                loaded = datasets.load_dataset(str(local), config)
            except (FileNotFoundError, ValueError) as error:
                raise DataError(
                    f"--data hf:{text}: datasets cannot read {local} ({_first_line(error)}); it expects a "
                    "save_to_disk folder or a folder of parquet files named by split"
                ) from None
        where = local.resolve()
    elif "/" in path.strip("/") and not path.startswith((".", "/")) and path.count("/") == 1:
        try:
            loaded = datasets.load_dataset(path, config)
        except Exception as error:  # datasets and the hub client raise many types for "offline" and "not found"
            raise DataError(
                f"--data hf:{text}: could not load it from the Hugging Face Hub ({type(error).__name__}: "
                f"{_first_line(error)}). Without network, save it elsewhere with datasets' save_to_disk, copy the "
                f"folder here and pass --data hf:FOLDER"
            ) from None
        where = Remote(f"hf:{path}")
    else:
        raise MissingDataError(f"--data hf:{text}: no such folder, and not a Hub id (OWNER/NAME)")
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({str(loaded.split or "train"): loaded})
    return loaded, where


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def find_columns(features, image_column: str | None, label_column: str | None, where: str) -> tuple[str, str]:
    """(image column, label column) from the features (`Image`, `ClassLabel`) or as named."""
    datasets = _datasets()
    columns = ", ".join(features)

    def pick(named, feature_type, option, what):
        if named is not None:
            if named not in features:
                raise DataError(f"{where} has no column {named!r} ({option}); its columns are {columns}")
            return named
        found = [name for name, feature in features.items() if isinstance(feature, feature_type)]
        if len(found) == 1:
            return found[0]
        if not found and what == "label" and "label" in features:
            return "label"
        how = (
            f"no {feature_type.__name__} column"
            if not found
            else f"{len(found)} {feature_type.__name__} columns ({', '.join(found)})"
        )
        raise DataError(f"{where} has {how} (its columns: {columns}): name the {what} column with {option} NAME")

    return (
        pick(image_column, datasets.Image, "--image-column", "image"),
        pick(label_column, datasets.ClassLabel, "--label-column", "label"),
    )


class ArrowSource(Source):
    """Samples as rows of a `datasets.Dataset`: the image column's bytes, read from its arrow table."""

    def __init__(self, dataset, column: str, rows: np.ndarray, files: list[str]):
        self.dataset, self.column, self.rows, self.files = dataset, column, rows, files
        self._values = None

    def __getstate__(self):
        return {**self.__dict__, "_values": None}

    def _mtime(self) -> int:
        return max((os.stat(f).st_mtime_ns for f in self.files), default=0)

    def fetch(self, index: int) -> tuple[bytes, int]:
        if self._values is None:
            self._values = self.dataset.data.column(self.column)
        row = int(self.rows[index])
        indices = self.dataset._indices  # a Dataset.select() not flattened: rows are looked up
        if indices is not None:
            row = int(indices.column(0)[row].as_py())
        value = self._values[row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            data = Path(value["path"]).read_bytes()
        if not isinstance(data, bytes):
            raise OSError(f"{self.where(index)} holds no image bytes")
        return data, self._mtime()

    def where(self, index: int) -> str:
        return f"{self.dataset.split or 'split'} row {int(self.rows[index])} ({self.column})"

    def mtimes(self, rows: np.ndarray) -> np.ndarray:
        return np.full(len(rows), self._mtime(), dtype=np.int64)

    def subset(self, rows: np.ndarray) -> ArrowSource:
        return ArrowSource(self.dataset, self.column, self.rows[rows], self.files)


def open_hf(
    text: str,
    *,
    splits: tuple[str, ...] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, PackedSplit]:
    """{split: PackedSplit} of an `hf:` value (what follows the prefix)."""
    loaded, where = load(text)
    if splits is not None:
        unknown = [s for s in splits if s not in loaded]
        if unknown:
            raise DataError(
                f"--data hf:{text} has no split(s) {', '.join(unknown)}: its splits are "
                f"{', '.join(loaded)} (--splits picks among them)"
            )
        names = list(splits)
    else:
        names = list(loaded)
    first = loaded[names[0]]
    image, label = find_columns(first.features, image_column, label_column, f"--data hf:{text}")
    datasets = _datasets()
    feature = first.features[label]
    labels = {}
    for name in names:
        split = loaded[name]
        if split.features[label] != feature:
            raise DataError(f"--data hf:{text}: split {name!r} has another {label!r} feature than {names[0]!r}")
        values = np.asarray(split.data.column(label).to_numpy(zero_copy_only=False))
        if split._indices is not None:
            values = values[np.asarray(split._indices.column(0).to_numpy())]
        if not np.issubdtype(values.dtype, np.integer):
            raise DataError(
                f"--data hf:{text}: column {label!r} holds {values.dtype} values, not class numbers; "
                "name the label column with --label-column NAME"
            )
        if len(values) == 0:
            raise DataError(f"split {name!r} of --data hf:{text} has no rows")
        if values.min() < 0:
            keep = ",".join(n for n in names if n != name) or "SPLIT"
            raise DataError(
                f"split {name!r} of --data hf:{text} has rows without a label ({int((values < 0).sum())} "
                f"of -1): leave it out with --splits {keep}"
            )
        labels[name] = values.astype(np.int64)
    top = max(int(values.max()) for values in labels.values())
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        if top >= len(classes):
            raise DataError(f"--data hf:{text}: label {top} is beyond the {len(classes)} names of {label!r}")
    else:
        classes = [str(n) for n in range(top + 1)]
    meta = {
        "kind": "hf",
        "image_column": image,
        "label_column": label,
        "arrow_bytes": {name: sum(os.path.getsize(f["filename"]) for f in loaded[name].cache_files) for name in names},
    }
    if isinstance(where, Remote):
        meta["hub_id"] = str(where)[3:]
    result = {}
    for name in names:
        split, count = loaded[name], len(labels[name])
        files = [f["filename"] for f in split.cache_files]
        source = ArrowSource(split, image, np.arange(count), files)
        paths = [f"{name}/{row}" for row in range(count)]
        result[name] = PackedSplit(where, name, classes, paths, labels[name], source, paths, meta=meta)
    return result
