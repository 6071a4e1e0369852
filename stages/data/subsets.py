"""`--classes` and `--subset`: select classes or images of a data set before anything is extracted.

A class list has one class per line: a class of the data set by its name (the whole line, or its
first word: "n01601694 Dipper" selects n01601694), or by its readable name where the data set has
them (ImageNet's devkit). An image list has one image per line: its path under the data root,
under its split folder, or its file name ("n04235860_14959.JPEG"). Blank lines and lines starting
with '#' are skipped. Selected classes keep the data set's order and are relabelled 0..K-1; a split
none of whose images an image list names is kept whole (the 1% ImageNet lists name train images:
val stays complete). Every line must select something; with `--classes` too, image-list lines
outside the selected classes are dropped and counted.

Named lists ship in `stages/data/lists/` (`sources.json` records where each comes from, with the
git blob id of the verbatim file). The store records the list's name, sha256 and counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from stages.data.errors import DataError, MissingDataError
from stages.data.kind import Listing

LISTS = Path(__file__).resolve().parent / "lists"


def named_lists() -> dict[str, dict]:
    """{name: its sources.json record} of the lists that ship with the project."""
    return json.loads((LISTS / "sources.json").read_text())


def resolve_list(value: str, selects: str) -> tuple[Path, dict]:
    """(file, record) of a list given as a shipped name (imagenet50, imagenet1pct, ...) or a file path."""
    shipped = named_lists()
    option = "--classes" if selects == "classes" else "--subset"
    if value in shipped:
        entry = shipped[value]
        if entry["selects"] != selects:
            other = "--subset" if option == "--classes" else "--classes"
            raise DataError(f"{option} {value}: that list selects {entry['selects']}; give it as {other} {value}")
        source = {k: entry[k] for k in ("repository", "path", "commit", "git_blob")}
        return LISTS / entry["file"], {"name": value, "source": source}
    path = Path(value)
    if not path.is_file():
        names = ", ".join(n for n, e in shipped.items() if e["selects"] == selects)
        raise MissingDataError(f"{option} {value}: no such file, and not a shipped list ({names})")
    return path, {"name": path.name, "source": str(path.resolve())}


def read_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise DataError(f"{path} lists nothing (one entry per line; '#' starts a comment)")
    return lines


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def select_classes(listing: Listing, value: str) -> tuple[Listing, dict]:
    """The listing reduced to the classes of list `value`, relabelled 0..K-1, and what the store records."""
    path, record = resolve_list(value, "classes")
    lines = read_lines(path)
    index = {name: i for i, name in enumerate(listing.classes)}
    readable = listing.extra.get("per_class", {}).get("class_names", [])
    by_name = {name: i for i, name in enumerate(readable)}
    chosen, unmatched = set(), []
    for line in lines:
        label = index.get(line, index.get(line.split()[0], by_name.get(line)))
        if label is None:
            unmatched.append(line)
        else:
            chosen.add(label)
    if unmatched:
        raise DataError(
            f"{len(unmatched)} of the {len(lines)} lines of {path} name no class of the data set, e.g. "
            f"{unmatched[:3]}; its classes are named like {listing.classes[:3]}"
        )
    keep = sorted(chosen)
    relabel = np.full(len(listing.classes), -1, dtype=np.int64)
    relabel[keep] = np.arange(len(keep))
    splits = {}
    for split, (paths, labels) in listing.splits.items():
        rows = np.flatnonzero(relabel[labels] >= 0)
        splits[split] = ([paths[i] for i in rows], relabel[labels[rows]])
    per_class = {key: [values[i] for i in keep] for key, values in listing.extra.get("per_class", {}).items()}
    extra = {**listing.extra, "per_class": per_class} if per_class else listing.extra
    record = {**record, "sha256": _sha256(path), "classes": len(keep)}
    return replace(listing, classes=[listing.classes[i] for i in keep], splits=splits, extra=extra), record


def select_images(listing: Listing, value: str, *, classes_selected: bool) -> tuple[Listing, dict]:
    """The listing reduced to the images of list `value` (in the splits it names), and what the store records."""
    path, record = resolve_list(value, "images")
    lines = read_lines(path)
    wanted = {line.replace("\\", "/") for line in lines}
    chosen: dict[str, list[int]] = {}
    hit: set[str] = set()
    for split, (paths, _) in listing.splits.items():
        rows = []
        for i, image in enumerate(paths):
            # an image answers to its path, its path under the split folder, and its file name
            keys = {image, image.split("/", 1)[-1], image.rsplit("/", 1)[-1]} & wanted
            if keys:
                rows.append(i)
                hit |= keys
        if rows:
            chosen[split] = rows
    unmatched = [line for line in lines if line.replace("\\", "/") not in hit]
    if unmatched and not classes_selected:
        raise DataError(
            f"{len(unmatched)} of the {len(lines)} lines of {path} name no image of the data set, e.g. "
            f"{unmatched[:3]}; lines are image paths under the data root or its split folders, or file "
            "names (with --classes, lines outside the selected classes are dropped)"
        )
    splits = {}
    for split, (paths, labels) in listing.splits.items():
        if split not in chosen:
            splits[split] = (paths, labels)
            continue
        rows = chosen[split]
        splits[split] = ([paths[i] for i in rows], labels[np.asarray(rows, dtype=np.int64)])
    record = {
        **record,
        "sha256": _sha256(path),
        "lines": len(lines),
        "dropped": len(unmatched),
        "splits": {split: len(chosen[split]) for split in sorted(chosen)},
    }
    return replace(listing, splits=splits), record
