"""Creating and inspecting a store: what is there, and making it a store in crash-safe steps.

`inspect_directory` tells an empty location, a valid store, an unfinished one (a run stopped while
making or clearing it: no settings yet) and one whose settings file is damaged, and refuses anything
that is not a feature store. `replace` clears a store (never while a reader holds it; it is marked
unfinished first) and creates it again, writing the settings last. Locations are local directories
or object stores (`cache.storage.Location`); every step is one atomic write on either.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache import digests, layout, locks
from cache.errors import ELSEWHERE, StoreError, StoreFullError
from cache.manifest import Manifest, unfinished_attrs, write_manifest
from cache.storage import Location
from cache.text import format_bytes

COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
# Every chunk carries a crc32c of its bytes, which zarr verifies as it decodes.
FEATURE_CODECS = (COMPRESSOR, Crc32cCodec())
SMALL_CODECS = (ZstdCodec(level=3), Crc32cCodec())  # labels, paths, file records, flags
FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class SplitIndex:
    """What a split holds, in sample-index order."""

    labels: np.ndarray  # (N,) int64
    paths: list[str]  # (N,) paths relative to the data root

    def __post_init__(self):
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} paths")


def describe_difference(key: str, stored, wanted, prefix: str = "") -> list[str]:
    name = f"{prefix}{key}"
    if isinstance(stored, dict) and isinstance(wanted, dict):
        lines = []
        for sub in sorted(set(stored) | set(wanted)):
            lines += describe_difference(sub, stored.get(sub), wanted.get(sub), f"{name}.")
        return lines
    if stored == wanted:
        return []

    def short(value) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{name}: the store has {short(stored)}, this run asks for {short(wanted)}"]


def differences(existing: dict, settings: dict, grids: dict[int, int]) -> list[str]:
    lines = []
    existing = layout.normalised(existing)
    for key in layout.IDENTITY_KEYS:
        lines += describe_difference(key, existing.get(key), settings[key])
    for key in layout.OPTIONAL_IDENTITY_KEYS:  # issue 14: augmented views
        lines += describe_difference(key, existing.get(key), settings.get(key))
    for block, grid in sorted(grids.items()):
        stored = existing.get("features", {}).get(str(block))
        if stored is not None and stored["grid"] != grid:
            lines.append(
                f"block {block}: the store has it pooled to {stored['grid']}x{stored['grid']}, this run needs "
                f"{grid}x{grid} (ask only for pools that divide {stored['grid']})"
            )
    return lines


def make_directory(location: Location) -> None:
    """Make sure the store's location can be written: a local directory made, an object store reachable."""
    location.prepare()


def inspect_directory(location: Location) -> tuple[str, dict]:
    """(state, root attributes): "empty", "valid", "unfinished" (no settings yet) or "damaged"; a location
    that is not a feature store is refused."""
    children = set(location.children()) - {layout.LEASE}
    if not children:
        return "empty", {}
    if "zarr.json" not in children:
        raise StoreError(
            f"{location} exists and is not a feature store (no zarr.json)", store=location, remedy=ELSEWHERE
        )
    try:
        metadata = json.loads(location.read_text("zarr.json"))
        attrs = dict(metadata.get("attributes", {}))
    except (OSError, ValueError, AttributeError):
        if layout.PROGRESS in children:
            return "damaged", {}
        raise StoreError(
            f"{location} holds a damaged zarr.json and is not a feature store", store=location, remedy=ELSEWHERE
        ) from None
    if attrs.get("format") not in layout.FORMATS:
        raise StoreError(f"{location} is a Zarr group but not a feature store", store=location, remedy=ELSEWHERE)
    if any(key not in attrs for key in layout.REQUIRED_KEYS):
        return "unfinished", attrs
    return "valid", attrs


def remove_partial_writes(location: Location) -> None:
    location.remove_partial_writes()


def mark_root(location: Location, attrs: dict) -> None:
    """Write the root group's zarr.json directly, in one atomic write: also over a damaged one."""
    text = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, indent=2)
    location.write_bytes("zarr.json", text.encode())


def replace(
    location: Location,
    settings: dict,
    splits: dict[str, SplitIndex],
    block_table: list[dict],
    recipe: dict | None = None,
) -> zarr.Group:
    """Clear the store (never while a reader holds it) and create it again, settings last.

    `recipe` (opaque here: what its maker needs to make the store again) is written first, with the
    format marker, so that a store left unfinished still says how to finish it."""
    try:
        _clear(location, recipe)
        return _create(location, settings, splits, block_table, recipe)
    except OSError as error:
        free = location.free_bytes() if error.errno in FULL else None
        if free is None:
            raise
        raise StoreFullError(
            f"{location}: no space left on the device while creating the store ({format_bytes(free)} "
            "free). Free some space and run again",
            store=location,
        ) from None


def _clear(location: Location, recipe: dict | None) -> None:
    claim = locks.claim_for_replacing(location)
    try:
        # from here on the store is unfinished
        mark_root(location, unfinished_attrs(recipe))
        for child in location.children():
            if child in ("zarr.json", layout.LEASE):
                continue
            location.delete(child)
    finally:
        locks.unlock(claim)


def _create(
    location: Location, settings: dict, splits: dict[str, SplitIndex], block_table: list[dict], recipe: dict | None
) -> zarr.Group:
    group = zarr.open_group(location.zarr_store(read_only=False), mode="r+")
    chunk_samples = int(settings["chunk_samples"])
    shard_samples = layout.shard_samples(settings)
    group.create_group(layout.PROGRESS)
    group.create_group(layout.DIGESTS)
    for name, index in splits.items():
        group.create_group(name)
        group.create_group(layout.progress_group(name))
        group.create_group(f"{layout.DIGESTS}/{name}")
        write_index_array(group, layout.labels_path(name), np.asarray(index.labels, dtype=np.int64))
        write_index_array(group, layout.paths_path(name), np.asarray(index.paths, dtype=str))
        create_files_array(group, name, len(index.paths), chunk_samples, shard_samples)
    key = digests.binding(settings)
    write_manifest(
        group,
        Manifest.create(
            settings,
            block_table,
            {name: len(index.paths) for name, index in splits.items()},
            {name: digests.index_digests(key, name, index.labels, index.paths) for name, index in splits.items()},
            recipe,
            str(location),
        ),
    )
    return group


def sample_chunking(n: int, chunk_samples: int, shard_samples: int, row_shape: tuple = ()) -> dict:
    """`create_array` keywords that chunk an (n, *row_shape) array along samples, sharded where shards
    hold more than one chunk (never more rows than the array has)."""
    chunks = (chunk_samples, *row_shape)
    if shard_samples <= chunk_samples or n <= chunk_samples:
        return {"chunks": chunks}
    return {"chunks": chunks, "shards": (shard_samples, *row_shape)}


def write_index_array(group: zarr.Group, path: str, values: np.ndarray) -> None:
    n = len(values)
    dtype = str if values.dtype.kind in "UO" else values.dtype  # zarr's variable-length strings
    array = group.create_array(
        path,
        shape=(n,),
        chunks=(max(1, min(n, 65536)),),
        dtype=dtype,
        compressors=SMALL_CODECS,
        dimension_names=("sample",),
        overwrite=True,
    )
    array[:] = values


def create_files_array(group: zarr.Group, split: str, n: int, chunk_samples: int, shard_samples: int) -> None:
    group.create_array(
        layout.files_path(split),
        shape=(n, 2),
        **sample_chunking(n, chunk_samples, shard_samples, (2,)),
        dtype="uint64",
        fill_value=0,
        compressors=SMALL_CODECS,
        dimension_names=("sample", "field"),
        attributes={"fields": list(layout.FILE_FIELDS)},
        overwrite=True,
    )
