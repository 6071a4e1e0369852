"""Tiny WebDataset shards and Hugging Face data sets made from an image folder, sample for sample.

Each holds the folder split's images in the folder's order (class name, then file name), the image
bytes unchanged, so that extraction from them must give the folder's store."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from stages.data.registry import open_dataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path, out: Path, *, per_shard: int, label: str = "cls", prefix: str = "set", class_file: bool = True
) -> dict[str, list[Path]]:
    """{split: shard files} `out/<prefix>-<split>-<number>.tar`: key.png/.jpg + key.cls (or key.json
    {"label": ...} when `label` is "json", or nothing when "none")."""
    out.mkdir(parents=True, exist_ok=True)
    splits = open_dataset(str(folder))
    shards = {}
    for name, split in splits.items():
        shards[name] = []
        for start in range(0, len(split.paths), per_shard):
            path = out / f"{prefix}-{name}-{start // per_shard:06d}.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for row in range(start, min(start + per_shard, len(split.paths))):
                    file = folder / split.paths[row]
                    key = file.stem
                    add_member(tar, f"{key}{file.suffix}", file.read_bytes())
                    if label == "cls":
                        add_member(tar, f"{key}.cls", str(int(split.labels[row])).encode())
                    elif label == "json":
                        add_member(tar, f"{key}.json", json.dumps({"label": int(split.labels[row])}).encode())
            shards[name].append(path)
    if class_file:
        (out / "classes.txt").write_text("\n".join(next(iter(splits.values())).classes) + "\n")
    return shards


def write_parquet(folder: Path, out: Path, *, label: bool = True, split_names: dict | None = None) -> Path:
    """`out/data/<split>-00000-of-00001.parquet` with an `image` (Image) and a `label` (ClassLabel) column,
    written with pyarrow and the features `datasets` reads back (`split_names` renames splits)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits = open_dataset(str(folder))
    classes = next(iter(splits.values())).classes
    columns = {"image": datasets.Image()}
    if label:
        columns["label"] = datasets.ClassLabel(names=classes)
    features = datasets.Features(columns)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        table = {"image": [{"bytes": (folder / p).read_bytes(), "path": Path(p).name} for p in split.paths]}
        if label:
            table["label"] = [int(x) for x in split.labels]
        renamed = (split_names or {}).get(name, name)
        file = out / "data" / f"{renamed}-00000-of-00001.parquet"
        pq.write_table(pa.table(table, schema=features.arrow_schema), file)
    return out


def save_to_disk(parquet: Path, out: Path) -> Path:
    """The parquet folder's data set as `datasets` saves it (`save_to_disk`), for `load_from_disk`."""
    import datasets

    datasets.load_dataset(str(parquet)).save_to_disk(str(out))
    return out
