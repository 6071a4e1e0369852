"""Repairs: making a store what its settings say it is, as far as that needs no model and no data.

Three entry points:

- `restore_settings(location)`: a root zarr.json that does not parse, written again from the copy of
  the settings that `cache.manifest.write_manifest` keeps.

- `reopen(writer, splits, ...)`, when a writer opens an existing store: partial writes removed,
  split sizes, labels, paths and file records checked against the data set and written again where
  missing or damaged, then `repair_in_place`.
- `repair_alone(writer)` (`FeatureStoreWriter.repair(location)`): the store alone (no data set):
  every finished shard verified (`find_damage`), then `repair_in_place`.

`repair_in_place` rebuilds damaged completion flags from the shards that verify, and marks every
damaged, missing or foreign piece unfinished: a feature shard, a shard's digest record, a shard of
file records (its features are recomputed with it, which writes the records again). What is marked
unfinished is recomputed by the next extraction (its maker: `cache` holds no model). Labels and
paths cannot be recomputed without the data set: `repair_alone` reports them, `reopen` rewrites them.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import zarr

from cache import digests, layout
from cache.creation import SplitIndex, create_files_array, mark_root, remove_partial_writes, write_index_array
from cache.integrity import (
    DECODE_ERRORS,
    Damage,
    chunk_rows,
    decode_error,
    expected_digests,
    find_damage,
    index_problem,
    settings_damaged,
    shard_problem,
)
from cache.manifest import read_copy, unfinished_attrs, write_manifest

log = logging.getLogger(__name__)


def repair_alone(writer) -> list[Damage]:
    """`FeatureStoreWriter.repair`'s work, the writer holding the store's lock: every finished shard verified,
    what needs no data set repaired (module docstring). Returns what was found."""
    edited = _sizes_from_arrays(writer)
    found = edited + find_damage(writer.location, full=True)
    remove_partial_writes(writer.location)
    repair_in_place(writer, verify=True)
    return found


def restore_settings(location) -> list[Damage]:
    """The root zarr.json written again from the settings' copy, the writer's lock held (`cache.manifest`: the copy
    is never older than the root); the IntegrityError of lost settings where the copy is damaged too."""
    manifest = read_copy(location)
    if manifest is None:
        raise settings_damaged(location)
    mark_root(location, unfinished_attrs(None))  # a group zarr can open again, then its settings in zarr's own form
    write_manifest(zarr.open_group(location.zarr_store(read_only=False), mode="r+"), manifest)
    log.warning("%s/zarr.json was damaged: written again from its copy", location)
    return [Damage("zarr.json", None, "was damaged: written again from its copy")]


def _sizes_from_arrays(writer) -> list[Damage]:
    """Split sizes in the settings that disagree with the split's labels and paths (which agree with each
    other) were edited: the arrays say what they are."""
    found, sizes = [], dict(writer.manifest.splits)
    for split, n in writer.manifest.splits.items():
        try:
            shapes = {writer._group[layout.labels_path(split)].shape, writer._group[layout.paths_path(split)].shape}
        except (KeyError, *DECODE_ERRORS):
            continue
        if len(shapes) == 1 and shapes != {(int(n),)}:
            sizes[split] = shapes.pop()[0]
            found.append(
                Damage(
                    "zarr.json",
                    None,
                    f"listed {n} samples of {split}, its labels and paths hold {sizes[split]}: corrected",
                )
            )
    if found:
        log.warning("%s: %s", writer.path, "; ".join(d.problem for d in found))
        writer._record(replace(writer.manifest, splits=sizes))
    return found


def reopen(writer, splits: dict[str, SplitIndex], *, verify: bool, recipe: dict | None = None) -> None:
    """What a writer does to an existing store it opens (module docstring)."""
    remove_partial_writes(writer.location)
    sizes = {split: len(index.paths) for split, index in splits.items()}
    stored = dict(writer.manifest.splits)
    if {**stored, **sizes} != stored:  # edited: the data set says what they are
        log.warning("%s/zarr.json listed split sizes %s; the data set has %s: corrected", writer.path, stored, sizes)
        writer._record(replace(writer.manifest, splits={**stored, **sizes}))
    for split, index in splits.items():
        repair_index(writer, split, index)
    manifest = writer.manifest
    if manifest.format != layout.FORMAT:  # format 1: from now on every new shard gets digests
        manifest = replace(manifest, format=layout.FORMAT)
    if recipe is not None and manifest.recipe is None:  # kept as made: a repair runs it as it was
        manifest = replace(manifest, recipe=recipe)
    if manifest != writer.manifest or read_copy(writer.location) != manifest:  # stores made before the copy get it
        writer._record(manifest)
    repair_in_place(writer, verify=verify)


def repair_index(writer, split: str, index: SplitIndex) -> None:
    """Labels, paths and file records exist and hold what the data set says (identity already matched);
    the labels' and paths' digests recorded (format 1 stores get them here)."""
    group, n = writer._group, len(index.paths)
    group.require_group(split)
    group.require_group(layout.progress_group(split))
    group.require_group(layout.DIGESTS).require_group(split)  # format 1 stores have none
    expected = {
        layout.labels_path(split): np.asarray(index.labels, dtype=np.int64),
        layout.paths_path(split): np.asarray(index.paths, dtype=str),
    }
    for path, values in expected.items():
        try:
            array = group[path]
            current = array[:]
            unchecked = replace(writer.manifest, index_digests={}).to_attrs()  # present, decodable; values compared
            if (
                array.shape == (n,)
                and np.array_equal(current, values)
                and index_problem(writer.location, unchecked, split, path, array) is None
            ):
                continue
        except (KeyError, *DECODE_ERRORS):
            pass
        log.warning("%s/%s was missing or damaged: written again from the data set", writer.path, path)
        write_index_array(group, path, values)
    recorded = digests.index_digests(digests.binding(writer._attrs), split, *expected.values())
    if writer.manifest.index_digests.get(split) != recorded:
        writer._record(replace(writer.manifest, index_digests={**writer.manifest.index_digests, split: recorded}))
    try:
        files = group[layout.files_path(split)]
        if files.shape != (n, 2):
            raise KeyError(layout.files_path(split))
        for k in range(-(-n // files.chunks[0])):
            rows = chunk_rows(files, k)
            if decode_error(files, rows):  # unknown hashes: checked again when the images are next read
                files[rows] = np.zeros((rows.stop - rows.start, 2), np.uint64)
    except (KeyError, *DECODE_ERRORS):
        if layout.files_path(split) in group:
            del group[layout.files_path(split)]
        create_files_array(group, split, n, writer.chunk_samples, writer.shard_samples)


def repair_in_place(writer, *, verify: bool) -> None:
    """Flags, digests, arrays and finished shards: what the settings imply is there, and sound."""
    damage = writer._load_sets()
    for item in damage:
        if item.shard is None:  # flags of the wrong length: they are rebuilt from scratch
            log.warning("%s: rebuilt", item.describe(writer.path))
            del writer._group[item.path]
    if any(d.shard is None for d in damage):
        damage = [d for d in damage if d.shard is not None] + writer._load_sets()
    for item in damage:
        if item.path.startswith(layout.DIGESTS):  # the shard's digests are gone: its features are unproven
            log.warning("%s: its shard marked unfinished, to be recomputed", item.describe(writer.path))
            _set_flag(writer, layout.PROGRESS + item.path[len(layout.DIGESTS) :], item.shard, 0)
        else:
            rebuild_flag(writer, item)
    manifest = writer.manifest
    for split in manifest.splits:
        for block, timestep in manifest.arrays():
            writer._ensure_array(
                split,
                block,
                timestep,
                manifest.block(block).channels,
                manifest.features[block].grid,
                manifest.identity["dtype"],
            )
    for item in find_damage(writer.location, full=verify):
        if item.shard is None:
            continue  # metadata (made again above), labels and paths (`reopen` rewrites them from the data set)
        split, _, rest = item.path.partition("/")
        if rest.startswith("block"):
            log.warning("%s: marked unfinished, to be recomputed", item.describe(writer.path))
            writer._mark_unfinished(split, *layout.parse_array_key(rest), item.shard)
        elif item.path == layout.files_path(split):  # recomputing the shard writes its records again
            log.warning("%s: its shard marked unfinished, to be recomputed", item.describe(writer.path))
            for write_set in writer._sets[split]:
                if write_set.flags[item.shard]:
                    writer._set_flag(write_set, item.shard, 0)
        elif item.path.startswith(layout.DIGESTS):
            _set_flag(writer, layout.PROGRESS + item.path[len(layout.DIGESTS) :], item.shard, 0)


def _set_flag(writer, flags_path: str, shard: int, value: int) -> None:
    split = flags_path.split("/")[1]
    write_set = next(s for s in writer._sets[split] if s.path == flags_path)
    writer._set_flag(write_set, shard, value)


def rebuild_flag(writer, item: Damage) -> None:
    """A damaged flag of shard k: finished if every array of its set verifies at shard k (against the
    set's own digests where it has them for k: then the flag says so again), else unfinished."""
    split = item.path.split("/")[1]
    write_set = next(s for s in writer._sets[split] if s.path == item.path)
    key = digests.binding(writer._attrs)
    k, per_shard = item.shard, writer.shard_samples // writer.chunk_samples
    rows = slice(k * per_shard, (k + 1) * per_shard)
    own = write_set.digests is not None and bool(write_set.digests[rows].any())

    def expected(b: int, t: int) -> dict[int, set[int]]:
        found = expected_digests(writer._sets[split], (b, t), k, per_shard)
        if own:
            column = write_set.columns.index(layout.array_key(b, t))
            for chunk in range(rows.start, min(rows.stop, len(write_set.digests))):
                if write_set.digests[chunk, column]:
                    found.setdefault(chunk, set()).add(int(write_set.digests[chunk, column]))
        return found

    ok = all(
        shard_problem(
            writer.location,
            layout.feature_path(split, b, t),
            writer._group[layout.feature_path(split, b, t)],
            k,
            writer.shard_samples,
            full=True,
            expected=expected(b, t),
            key=key,
        )
        is None
        for b, t in write_set.arrays
        if layout.feature_path(split, b, t) in writer._group
    )
    log.warning("%s: rebuilt as %s", item.describe(writer.path), "finished" if ok else "unfinished")
    writer._set_flag(write_set, k, (layout.FLAG_DIGESTS if own else layout.FLAG_DONE) if ok else 0)
