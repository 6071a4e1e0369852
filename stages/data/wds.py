"""WebDataset shards as a data set: `--data wds:PATTERN`.

    --data wds:/data/imagenet-wds                     every <name>-<split>-<number>.tar in the folder, by split
    --data 'wds:train=/data/train-{000000..001281}.tar,val=/data/val-{000000..000049}.tar'
    --data 'wds:s3://bucket/train-{0000..0146}.tar'    one pattern: the split "train" (--storage-option for S3)

A sample is the run of consecutive tar members that share a key (the member name up to the first
dot of its file name, WebDataset's convention): `key.jpg` (or png, webp ...; `--image-column EXT`
picks one), `key.cls` (the label, an integer) or `key.json` with the label in the field that
`--label-column FIELD` names. Class names come from `classes.txt` beside the shards (line l names
label l) when there is one, else they are the label numbers.

Sample order is shard order (the pattern's expansion order; a glob's matches sorted), then member
order, so the same shards always make the same store. The store records the keys as its paths, and
per sample the content hash of its image bytes and the tar's modification time. Listing reads the
tar headers only (`stages.data.tarindex`); extraction then reads each sample by its byte range, so
ranks and a resumed run read only the samples of their own chunks.

A shard's index is saved at its first listing (`index_cache`), under the shard's location, size and
modification time: a later listing (a resumed run, another rank, the next extraction) reads it instead of
the shard's headers, and a shard that changed (another size or time) is indexed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from cache.extras import require
from stages.data.errors import DataError, MissingDataError
from stages.data.kind import IMAGE_SUFFIXES
from stages.data.packed import PackedSplit, Remote, Source
from stages.data.tarindex import tar_members

IMAGE_EXTENSIONS = tuple(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SHARD = re.compile(r"(?:.*[-_])?([A-Za-z][A-Za-z0-9]*)[-_]\d+\.tar$")
CLASS_FILE = "classes.txt"
INDEX_CACHE = "WDS_INDEX_CACHE"  # the variable naming where shard indexes are saved; "off" saves none
INDEX_FORMAT = 1  # of a saved index: another number makes every saved index stale


def parse_spec(text: str) -> dict[str, str]:
    """{split: pattern} of what follows `wds:`: `split=PATTERN,split=PATTERN`, or one PATTERN (a folder of
    shards named by split, or the split "train"). Commas inside {...} belong to the pattern."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "{"
        depth -= char == "}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    named = [re.fullmatch(r"([A-Za-z][A-Za-z0-9_-]*)=(.+)", part) for part in parts]
    if len(parts) == 1 and not named[0]:
        return {"": parts[0]}
    if not all(named):
        raise DataError(
            f"--data wds:{text}: expected wds:PATTERN or wds:SPLIT=PATTERN,SPLIT=PATTERN "
            "(e.g. wds:train=/data/train-{000000..001281}.tar,val=/data/val-{000000..000049}.tar)"
        )
    return {match.group(1): match.group(2) for match in named}


def _filesystem(url: str, storage_options: dict):
    import fsspec

    if _URL.match(url):
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(url)


def expand(pattern: str, storage_options: dict) -> list[str]:
    """The shards a pattern names, in order: brace ranges and lists expanded in order, globs sorted."""
    braceexpand = require("braceexpand", "wds", "--data wds:").braceexpand
    shards = []
    for single in braceexpand(pattern):
        if any(c in single for c in "*?["):
            fs, path = _filesystem(single, storage_options)
            matches = sorted(fs.glob(path))
            protocol = single.split("://", 1)[0] + "://" if _URL.match(single) else ""
            shards += [protocol + m if protocol and not m.startswith(protocol) else m for m in matches]
        else:
            shards.append(single)
    return shards


def split_shards(text: str, storage_options: dict) -> dict[str, list[str]]:
    """{split: shards} of a `wds:` value (module docstring)."""
    patterns = parse_spec(text)
    if "" in patterns:
        pattern = patterns[""]
        fs, path = _filesystem(pattern, storage_options)
        if not any(c in pattern for c in "{*?[") and fs.isdir(path):
            return _shards_by_split(pattern, fs, path)
        patterns = {"train": pattern}
    found = {split: expand(pattern, storage_options) for split, pattern in patterns.items()}
    for split, shards in found.items():
        if not shards:
            raise MissingDataError(f"--data wds:{text}: the pattern of split {split!r} matches no shard")
    return found


def _shards_by_split(folder: str, fs, path: str) -> dict[str, list[str]]:
    """A folder's shards grouped by the word before their number (imagenet1k-train-0000.tar: train)."""
    protocol = folder.split("://", 1)[0] + "://" if _URL.match(folder) else ""
    found: dict[str, list[str]] = {}
    for entry in sorted(fs.ls(path, detail=False)):
        match = _SHARD.match(entry.rsplit("/", 1)[-1])
        if match:
            found.setdefault(match.group(1), []).append(protocol + entry if protocol else entry)
    if not found:
        raise MissingDataError(
            f"--data wds:{folder}: no shards named <name>-<split>-<number>.tar in it; name them "
            "with wds:train=PATTERN,val=PATTERN"
        )
    return found


class TarSource(Source):
    """Samples as byte ranges of tar shards: shard number, offset and size per sample."""

    def __init__(
        self,
        shards: list[str],
        shard: np.ndarray,
        offset: np.ndarray,
        size: np.ndarray,
        names: list[str],
        mtimes: list[int],
        storage_options: dict,
    ):
        self.shards, self.shard, self.offset, self.size = shards, shard, offset, size
        self.names, self.shard_mtimes, self.storage_options = names, mtimes, storage_options
        self._files: dict[int, object] = {}

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}  # open files stay in the process that opened them

    def _file(self, number: int):
        file = self._files.get(number)
        if file is None:
            url = self.shards[number]
            if _URL.match(url):
                fs, path = _filesystem(url, self.storage_options)
                file = fs.open(path, "rb", block_size=0)  # a range request per sample, no read-ahead
            else:
                file = open(url, "rb", buffering=0)  # noqa: SIM115 (kept open for the process's later reads)
            self._files[number] = file
        return file

    def fetch(self, index: int) -> tuple[bytes, int]:
        number = int(self.shard[index])
        file = self._file(number)
        file.seek(int(self.offset[index]))
        data = file.read(int(self.size[index]))
        if len(data) != int(self.size[index]):
            raise OSError(f"{self.where(index)}: the tar ends inside the member")
        return data, self.shard_mtimes[number]

    def where(self, index: int) -> str:
        return f"{self.shards[int(self.shard[index])]}:{self.names[index]}"

    def mtimes(self, rows: np.ndarray) -> np.ndarray:
        now = {}
        for number in np.unique(self.shard[rows]):
            now[int(number)] = stat(self.shards[number], self.storage_options)[1]
        return np.asarray([now[int(self.shard[row])] for row in rows], dtype=np.int64)

    def subset(self, rows: np.ndarray) -> TarSource:
        return TarSource(
            self.shards,
            self.shard[rows],
            self.offset[rows],
            self.size[rows],
            [self.names[i] for i in rows],
            self.shard_mtimes,
            self.storage_options,
        )


def stat(url: str, storage_options: dict) -> tuple[int, int]:
    """(size, modification time in ns) of a shard; a missing one is a MissingDataError."""
    try:
        if not _URL.match(url):
            result = os.stat(url)
            return result.st_size, result.st_mtime_ns
        fs, path = _filesystem(url, storage_options)
        info = fs.info(path)
    except FileNotFoundError:
        raise MissingDataError(f"{url}: no such shard") from None
    return int(info["size"]), modified_ns(info)


def modified_ns(info: dict) -> int:
    """A file's modification time in ns from fsspec's `info` (local: mtime; S3: LastModified ...)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1e9)
        try:
            return int(float(value) * 1e9)
        except (TypeError, ValueError):
            continue
    return 0


def _split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the extension starts at the first dot of the file name."""
    folder, _, file = name.rpartition("/")
    stem, dot, extension = file.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def index_cache() -> Path | None:
    """Where shard indexes are saved: $WDS_INDEX_CACHE, else $XDG_CACHE_HOME (~/.cache)/diffusion-feature-cache/
    wds-index; None when the variable is "off"."""
    chosen = os.environ.get(INDEX_CACHE)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off") else Path(chosen)
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "diffusion-feature-cache" / "wds-index"


def _saved_index_path(url: str, total: int, mtime: int, image_ext: str | None, label_field: str | None):
    folder = index_cache()
    if folder is None or mtime == 0:  # without a modification time a rewritten tar of the same size looks unchanged
        return None
    where = url if _URL.match(url) else os.path.abspath(url)
    key = hashlib.sha256(json.dumps([INDEX_FORMAT, where, total, mtime, image_ext, label_field]).encode()).hexdigest()
    return folder / key[:2] / f"{key}.json"


def index_shard(url: str, storage_options: dict, *, image_ext: str | None, label_field: str | None):
    """[(key, image member name, offset, size, label)] of one shard, in member order; and its size and mtime.
    Read from the saved index when the shard is the one it was saved for, else from the headers (and saved)."""
    total, mtime = stat(url, storage_options)
    saved = _saved_index_path(url, total, mtime, image_ext, label_field)
    if saved is not None:
        try:
            samples = [tuple(sample) for sample in json.loads(saved.read_text())["samples"]]
            if all(len(sample) == 5 for sample in samples):
                return samples, total, mtime
        except (OSError, ValueError, KeyError, TypeError):  # not saved yet, or damaged: indexed again
            pass
    samples = _read_index(url, storage_options, total, image_ext=image_ext, label_field=label_field)
    if saved is not None:
        partial = saved.with_name(f".{saved.name}.{uuid.uuid4().hex[:8]}")
        try:  # written beside and renamed: a reader never sees half an index
            saved.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"shard": url, "size": total, "mtime_ns": mtime, "samples": samples}))
            os.replace(partial, saved)
        except OSError:  # a read-only or full cache costs the next listing its headers, nothing else
            partial.unlink(missing_ok=True)
    return samples, total, mtime


def _read_index(url: str, storage_options: dict, total: int, *, image_ext: str | None, label_field: str | None):
    fs, path = _filesystem(url, storage_options)
    with fs.open(path, "rb", **({"block_size": 1 << 16} if _URL.match(url) else {})) as file:
        members, small = tar_members(file, total, url, {"json"} if label_field else {"cls"})
    samples, groups = [], {}  # key -> {extension: member}, in the order keys first appear
    for member in members:
        key, extension = _split_key(member.name)
        groups.setdefault(key, {})[extension] = member
    for key, parts in groups.items():
        image = _image_member(parts, image_ext, url, key)
        label = _label(parts, small, label_field, url, key)
        samples.append((key, image.name, image.offset, image.size, label))
    return samples


def _image_member(parts: dict, image_ext: str | None, url: str, key: str):
    if image_ext is not None:
        member = parts.get(image_ext.lower().lstrip("."))
        if member is None:
            raise DataError(
                f"{url}: sample {key!r} has no .{image_ext} member (it has {', '.join(sorted(parts))}); "
                "--image-column names the image's extension"
            )
        return member
    for extension in IMAGE_EXTENSIONS:
        if extension in parts:
            return parts[extension]
    raise DataError(
        f"{url}: sample {key!r} has no image member (it has {', '.join(sorted(parts))}; images are "
        f"{', '.join(IMAGE_EXTENSIONS)}); --image-column names another extension"
    )


def _label(parts: dict, small: dict, label_field: str | None, url: str, key: str) -> int:
    if label_field is None:
        member = parts.get("cls")
        if member is None:
            raise DataError(
                f"{url}: sample {key!r} has no .cls member (it has {', '.join(sorted(parts))}); a label in "
                "its .json is named with --label-column FIELD"
            )
        text = small[member.name].decode("utf-8", "replace").strip()
    else:
        member = parts.get("json")
        if member is None:
            raise DataError(
                f"{url}: sample {key!r} has no .json member for --label-column {label_field} "
                f"(it has {', '.join(sorted(parts))})"
            )
        try:
            record = json.loads(small[member.name])
        except ValueError:
            raise DataError(f"{url}: {member.name} is not JSON") from None
        if not isinstance(record, dict) or label_field not in record:
            raise DataError(f"{url}: {member.name} has no field {label_field!r} (--label-column)")
        text = str(record[label_field]).strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{url}: the label of sample {key!r} is {text[:40]!r}, not a class number") from None
    if label < 0:
        raise DataError(f"{url}: the label of sample {key!r} is {label}; labels are class numbers from 0")
    return label


def _class_names(shards: list[str], storage_options: dict, labels: int) -> tuple[list[str], str | None]:
    """(class names, the side file they came from) for labels 0..labels-1."""
    folder = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    side = f"{folder}/{CLASS_FILE}"
    fs, path = _filesystem(side, storage_options)
    if not fs.exists(path):
        return [str(label) for label in range(labels)], None
    with fs.open(path, "rb") as file:
        names = [line.strip() for line in file.read().decode("utf-8").splitlines() if line.strip()]
    if len(names) < labels:
        raise DataError(f"{side} names {len(names)} classes, but the shards use labels up to {labels - 1}")
    if len(set(names)) != len(names):
        raise DataError(f"{side} names a class twice")
    return names, side


def open_wds(
    text: str,
    *,
    splits: tuple[str, ...] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> dict[str, PackedSplit]:
    """{split: PackedSplit} of a `wds:` value (what follows the prefix); a bar counts the shards indexed
    when there are many."""
    from stages.progress import progress_bar

    storage_options = dict(storage_options or {})
    found = split_shards(text, storage_options)
    if splits is not None:
        unknown = [s for s in splits if s not in found]
        if unknown:
            raise DataError(
                f"--data wds:{text} has no split(s) {', '.join(unknown)}: its splits are "
                f"{', '.join(found)} (--splits picks among them)"
            )
        found = {s: found[s] for s in splits}
    indexed = {}
    count = sum(len(shards) for shards in found.values())
    bar = progress_bar(total=count, desc="index shards", unit="shard", enabled=progress and count > 16)
    for split, shards in found.items():
        rows, sizes, mtimes = [], [], []
        for number, shard in enumerate(shards):
            samples, size, mtime = index_shard(shard, storage_options, image_ext=image_column, label_field=label_column)
            rows += [(number, *sample) for sample in samples]
            sizes.append(size)
            mtimes.append(mtime)
            bar.update(1)
        if not rows:
            raise DataError(f"split {split!r} of --data wds:{text} has no samples")
        counts = Counter(row[1] for row in rows)
        if len(counts) != len(rows):
            duplicate = next(k for k, count in counts.items() if count > 1)
            raise DataError(
                f"split {split!r}: the key {duplicate!r} names two samples; keys identify samples in the "
                "store, so they must be unique within a split"
            )
        indexed[split] = (shards, rows, sizes, mtimes)
    bar.close()
    top = max(max(row[5] for row in rows) for _, rows, _, _ in indexed.values())
    classes, side = _class_names(next(iter(found.values())), storage_options, top + 1)
    # recorded with the data set: every shard's size, so that a tar replaced by another is another data set
    meta = {
        "kind": "wds",
        "label": f"json:{label_column}" if label_column else "cls",
        "shards": {
            split: {shard.rsplit("/", 1)[-1]: size for shard, size in zip(shards, sizes)}
            for split, (shards, _, sizes, _) in indexed.items()
        },
    }
    if image_column:
        meta["image"] = image_column
    if side:
        meta["class_file"] = side.rsplit("/", 1)[-1]
    result = {}
    for split, (shards, rows, _sizes, mtimes) in indexed.items():
        names = [shard.rsplit("/", 1)[-1] for shard in shards]
        column = list(zip(*rows))  # shard number, key, member name, offset, size, label
        source = TarSource(
            shards,
            np.asarray(column[0], np.int32),
            np.asarray(column[3], np.int64),
            np.asarray(column[4], np.int64),
            list(column[2]),
            mtimes,
            storage_options,
        )
        lines = [f"{names[r[0]]}\t{r[1]}\t{r[4]}" for r in rows]
        root = Remote(shards[0].rsplit("/", 1)[0]) if _URL.match(shards[0]) else Path(shards[0]).parent
        result[split] = PackedSplit(
            root,
            split,
            classes,
            [r[1] for r in rows],
            np.asarray([r[5] for r in rows], np.int64),
            source,
            lines,
            meta=meta,
        )
    return result
