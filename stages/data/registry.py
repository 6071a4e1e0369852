"""The data-set kinds, how `--data` names one, and the one way a data set is opened.

    --data cub:/data/CUB_200_2011      an explicit kind
    --data /data/fgvc-aircraft-2013b    the kind recognised from the layout (a plain image folder if none)

`open_dataset` reads the listing of the kind, applies `--subset` and `--classes`
(`stages.data.subsets`), and returns the splits as `ImageFolderSplit`s, which carry everything
extraction needs (root, paths, labels, how to read one image) and what the store records about the
data set (`ImageFolderSplit.meta`: kind, the metadata files hashed, split roles, class metadata,
the selections). A plain image folder without selections records exactly what it always did.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from stages.data.aircraft import AIRCRAFT, AIRCRAFT_FAMILY, AIRCRAFT_MANUFACTURER
from stages.data.birds import CUB, NABIRDS
from stages.data.cars import CARS
from stages.data.dogs import DOGS
from stages.data.errors import DataError, MissingDataError
from stages.data.flowers import FLOWERS
from stages.data.imagenet import IMAGENET
from stages.data.kind import Kind, Listing


def _read_folder(root: Path, splits: tuple[str, ...] | None) -> Listing:
    from stages.data.folders import scan

    scanned = scan(root, list(splits or FOLDER.splits))
    first = next(iter(scanned.values()))
    return Listing(root, first.classes, {name: (s.paths, s.labels) for name, s in scanned.items()})


FOLDER = Kind(
    name="folder",
    title="An image folder",
    layout="<split>/<class>/<image> (any split names, --splits)",
    splits=("train", "val"),
    roles={},
    classes="one per class folder",
    read=_read_folder,
)
# Recognition order: the more specific layout first (NABirds has CUB's files and more).
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (NABIRDS, CUB, AIRCRAFT, AIRCRAFT_FAMILY, AIRCRAFT_MANUFACTURER, CARS, DOGS, FLOWERS, IMAGENET, FOLDER)
}
_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_-]*):(.*)")


def resolve_data(spec: str) -> tuple[Kind, Path, bool]:
    """(kind, data root, whether the kind was named) of a `--data` value."""
    text = str(spec)
    match = _PREFIX.fullmatch(text)
    if match and (match.group(1).lower() in KINDS or not Path(text).exists()):
        name, path = match.group(1).lower(), Path(match.group(2))
        if name not in KINDS:
            raise DataError(
                f"--data {text}: unknown data-set kind {name!r}; the kinds are {', '.join(KINDS)} "
                "(`pipeline datasets` shows the layout each expects)"
            )
        kind = KINDS[name]
        if not path.is_dir():
            raise MissingDataError(f"--data {text}: no such directory {path}")
        return kind, kind.root_of(path) or path, True
    path = Path(text)
    if not path.is_dir():
        raise MissingDataError(f"--data {text}: no such directory")
    for kind in KINDS.values():
        root = kind.recognised and kind.root_of(path)
        if root:
            return kind, root, False
    return FOLDER, path, False


def open_dataset(
    spec: str,
    *,
    splits: tuple[str, ...] | None = None,
    classes: str | None = None,
    subset: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    storage_options: dict | None = None,
):
    """{split: ImageFolderSplit} of a `--data` value, with `--classes` / `--subset` applied.

    `splits` None: the kind's official splits (an image folder's: train, val). `wds:` and `hf:` values
    (`PACKED`) give `stages.data.packed.PackedSplit`s, which read alike; `image_column` / `label_column`
    name their image and label, and `storage_options` are fsspec's for shards at a URL."""
    from stages.data.folders import ImageFolderSplit
    from stages.data.subsets import select_classes, select_images

    packed = _packed_kind(str(spec))
    if packed is not None:
        return _open_packed(
            packed,
            str(spec),
            splits=splits,
            classes=classes,
            subset=subset,
            image_column=image_column,
            label_column=label_column,
            storage_options=storage_options,
        )
    if image_column is not None or label_column is not None:
        raise DataError(f"--image-column and --label-column apply to wds: and hf: data, not to --data {spec}")
    kind, root, named = resolve_data(spec)
    try:
        listing = kind.read(root, tuple(splits) if splits is not None else None)
    except MissingDataError as error:
        if kind is not FOLDER or named:
            raise
        near = _near_misses(root)
        if near:
            raise MissingDataError(
                f"{root} looks like {near}; name the kind (--data KIND:PATH) if it is one, or "
                f"read it as an image folder: {error}"
            ) from None
        others = "; ".join(f"{k.name}: {k.layout}" for k in KINDS.values() if k.recognised and k is not FOLDER)
        raise MissingDataError(
            f"{error}. {root} matches none of the data-set layouts either ({others}); "
            "name the kind with --data KIND:PATH to hear which file is missing"
        ) from None
    meta = {}
    if classes is not None:
        listing, meta["class_list"] = select_classes(listing, classes)
    if subset is not None:
        listing, meta["subset"] = select_images(listing, subset, classes_selected=classes is not None)
    for name, (paths, _) in listing.splits.items():
        if not paths:
            raise DataError(f"split {name!r} of {root} has no images left after the --classes / --subset selection")
    if kind is not FOLDER or meta:
        meta = {"kind": kind.name, **_recorded(kind, listing), **meta}
    return {
        name: ImageFolderSplit(
            root, name, list(listing.classes), paths, labels, crop_bottom=listing.crop_bottom, meta=meta
        )
        for name, (paths, labels) in listing.splits.items()
    }


def _packed_kind(spec: str) -> str | None:
    """ "wds" or "hf" when `spec` names packed data (a prefix, unless it is an existing folder's name)."""
    prefix, sep, _ = spec.partition(":")
    if sep and prefix.lower() in PACKED and not Path(spec).exists():
        return prefix.lower()
    return None


def _open_packed(kind: str, spec: str, *, splits, classes, subset, image_column, label_column, storage_options):
    """{split: PackedSplit} of a `wds:` or `hf:` value, with `--classes` / `--subset` applied to its index."""
    from stages.data.subsets import select_classes, select_images

    rest = spec.partition(":")[2]
    if kind == "wds":
        from stages.data.wds import open_wds

        opened = open_wds(
            rest, splits=splits, image_column=image_column, label_column=label_column, storage_options=storage_options
        )
    else:
        from stages.data.hf import open_hf

        opened = open_hf(rest, splits=splits, image_column=image_column, label_column=label_column)
    if classes is None and subset is None:
        return opened
    first = next(iter(opened.values()))
    listing = Listing(Path("."), first.classes, {name: (s.paths, s.labels) for name, s in opened.items()})
    meta = dict(first.meta)
    if classes is not None:
        listing, meta["class_list"] = select_classes(listing, classes)
    if subset is not None:
        listing, meta["subset"] = select_images(listing, subset, classes_selected=classes is not None)
    selected = {}
    for name, (paths, labels) in listing.splits.items():
        if not paths:
            raise DataError(f"split {name!r} of {spec} has no images left after the --classes / --subset selection")
        position = {path: row for row, path in enumerate(opened[name].paths)}
        rows = np.asarray([position[path] for path in paths], dtype=np.int64)
        selected[name] = opened[name].select(rows, listing.classes, labels, meta)
    return selected


PACKED = {  # the kinds whose images are packed in containers (`stages.data.packed`), as `pipeline datasets` shows them
    "wds": (
        "WebDataset tar shards: wds:PATTERN, wds:SPLIT=PATTERN,SPLIT=PATTERN or wds:FOLDER "
        "(<name>-<split>-<number>.tar); key.jpg/png/... + key.cls (or --label-column FIELD of key.json); "
        "class names from classes.txt beside the shards"
    ),
    "hf": (
        "Hugging Face datasets: hf:FOLDER (save_to_disk, or parquet files named by split) or hf:OWNER/NAME[:CONFIG] "
        "(the Hub); the Image and ClassLabel columns, or --image-column / --label-column"
    ),
}


def _near_misses(path: Path) -> str:
    """Kinds of which `path` (or its archive folder) has some of the signature files but not all."""
    found = []
    for kind in KINDS.values():
        for candidate in (path, path / kind.archive_dir) if kind.archive_dir else (path,):
            present = [name for name in kind.signature if (candidate / name).exists()]
            if present and len(present) < len(kind.signature):
                lacking = [name for name in kind.signature if name not in present]
                found.append(
                    (
                        len(lacking),
                        f"{kind.title} ({kind.name}:) without {', '.join(str(candidate / n) for n in lacking)}",
                    )
                )
                break
    return "; or ".join(text for _, text in sorted(found, key=lambda item: item[0]))  # the closest first


def _recorded(kind: Kind, listing: Listing) -> dict:
    """What the store records of a kind beyond the file list: metadata file hashes, roles, class metadata."""
    files = {name: hashlib.sha256((listing.root / name).read_bytes()).hexdigest() for name in listing.files}
    record = {"files": files}
    if kind.roles:
        record["roles"] = {role: split for role, split in kind.roles.items() if split in listing.splits}
    record.update({k: v for k, v in listing.extra.items() if k != "per_class"})
    record.update(listing.extra.get("per_class", {}))
    if listing.crop_bottom:
        record["crop_bottom"] = listing.crop_bottom
    return record


def format_kinds() -> str:
    """What `pipeline datasets` prints: each kind, its splits, classes and the layout it expects."""
    lines = []
    for kind in KINDS.values():
        how = "recognised from its layout" if kind.recognised else f"only as {kind.name}:PATH"
        if kind is FOLDER:
            how = "the fallback"
        lines.append(f"{kind.name:<22} {kind.title}; splits {', '.join(kind.splits)}; classes: {kind.classes}; {how}")
        lines.append(
            f"{'':<22} expects {kind.layout}"
            + (f" (or the archive's {kind.archive_dir}/ inside PATH)" if kind.archive_dir else "")
        )
        if kind.overlaps:
            lines.append(f"{'':<22} images overlap {kind.overlaps}")
    for name, text in PACKED.items():
        lines.append(f"{name:<22} {text}; only as {name}:...")
    return "\n".join(lines)
