"""Writing a feature store: created once, then filled shard by shard; resumable, crash-safe, single-writer.

Crash safety, step by step (a process may be killed between any two writes; local writes are
atomic renames, zarr-python >= 3.1.3):

- Creation. The root attributes are first only the format marker, then the groups, the labels,
  paths and file records are written, and the settings last, in one write: a store becomes valid in
  that one step. A store found without its settings (a run stopped while making it, or while
  clearing it) holds nothing of value and is rebuilt.
- Arrays. A feature array is created before the settings list it; one found without flags is simply
  unfinished, one found with damaged metadata is made again (its shards unfinished).
- Shards. Shard k of a write set's arrays (see `cache.layout`; a chunk in stores without sharding)
  is written whole, in one write per array, then marked done with one write. A shard is never
  marked done with non-finite values, nor with images whose content changed since the store's other
  features were computed from them.
- Reopening checks what the settings imply (labels, paths, every array, every flag) and repairs
  what it can: damaged flags are rebuilt from the shards that verify; finished shards whose objects
  are gone (or, with `verify`, that fail their checksum) are marked unfinished, to be recomputed.
- A full disk is a `StoreFullError` naming the space needed; finished shards are kept.

The same steps hold on object stores (`cache.storage`), where every write is one atomic PUT and the
single writer holds a lease instead of a flock (`cache.locks`). Several processes of one job
(`stages.extract.distributed`) write one store: the first opens it with `open` (lock, creation,
repairs, attributes), the others `attach` to it and write only the shards they are given.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager

import numpy as np
import zarr

from cache import layout, locks
from cache.creation import (
    FEATURE_CODECS,
    FULL,
    SMALL_CODECS,
    SplitIndex,
    create_files_array,
    differences,
    inspect_directory,
    make_directory,
    remove_partial_writes,
    replace,
    sample_chunking,
    write_index_array,
)
from cache.errors import DataChangedError, NonFiniteFeaturesError, StoreError, StoreFullError, StoreMismatchError
from cache.integrity import (
    DECODE_ERRORS,
    Damage,
    WriteSet,
    chunk_rows,
    decode_error,
    done_shards,
    find_damage,
    load_write_sets,
    read_root_attrs,
    shard_problem,
)
from cache.storage import Location
from cache.text import format_bytes, format_ranges

log = logging.getLogger(__name__)


class FeatureStoreWriter:
    """The one process allowed to write a store; use as a context manager (it holds a lock)."""

    def __init__(self, location: Location, group: zarr.Group, lock: locks.WriterLock | None):
        self.location = location
        self.path = str(location)
        self._group = group
        self._lock = lock
        self._attrs = layout.normalised(dict(group.attrs))
        self._sets: dict[str, list[WriteSet]] = {}

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Location,
        *,
        settings: dict,
        splits: dict[str, SplitIndex],
        block_table: list[dict],
        grids: dict[int, int] | None = None,
        overwrite: bool = False,
        verify: bool = False,
    ) -> FeatureStoreWriter:
        """Create the store, or reopen one made with the same `settings` (keys in layout.IDENTITY_KEYS).

        `grids` (block -> stored grid) are the grids this run will write; a block already stored at
        another grid is a difference too. A store that differs is refused with the differences
        named, or, with `overwrite`, replaced (never while a reader holds it). A store that agrees is
        reopened either way and repaired where needed (module docstring), so finished shards are kept
        and only what is missing gets computed. `verify` also decodes every finished shard.
        `path` is a local directory or an object store URL (`cache.storage.Location`).
        """
        settings = layout.normalised(settings)
        missing = [key for key in layout.IDENTITY_KEYS if key not in settings]
        if missing:
            raise ValueError(f"settings lack {missing}")
        if not splits:
            raise ValueError("a store needs at least one split")
        if layout.shard_samples(settings) % int(settings["chunk_samples"]):
            raise ValueError(f"shard_samples {settings['shard_samples']} is not a multiple of chunk_samples "
                             f"{settings['chunk_samples']}")
        directory = Location.parse(path)
        make_directory(directory)
        lock = locks.lock_writer(directory)
        try:
            state, existing = inspect_directory(directory)
            changed = differences(existing, settings, grids or {}) if state == "valid" else []
            if state == "valid" and not changed:
                writer = cls(directory, zarr.open_group(directory.zarr_store(read_only=False), mode="r+"), lock)
                with writer._writing("reopening the store"):
                    writer._reopen(splits, verify=verify)
                return writer
            if state == "valid" and not overwrite:
                raise StoreMismatchError(
                    f"{directory} was made with other settings:\n  " + "\n  ".join(changed)
                    + "\nUse another --out, or --overwrite to replace the store."
                )
            if state == "damaged" and not overwrite:
                raise StoreError(f"{directory}/zarr.json, the store's settings, is damaged: its features cannot be "
                                 "trusted. Pass --overwrite to replace the store, or use another --out")
            if state == "unfinished":
                log.warning("%s was left unfinished by a run that stopped while making it: building it again",
                            directory)
            writer = cls(directory, replace(directory, settings, splits, block_table), lock)
            writer._load_sets()
            return writer
        except BaseException:
            lock.release()
            raise

    @classmethod
    def attach(cls, path: str | Location) -> FeatureStoreWriter:
        """Another process of the job that holds the store open (`open`): it writes the shards it is
        given and nothing else (no lock, no attributes, no repairs; its writes are the holder's)."""
        location = Location.parse(path)
        writer = cls(location, zarr.open_group(location.zarr_store(read_only=False), mode="r+"), None)
        writer._load_sets()
        return writer

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- planning ------------------------------------------------------------------------------------
    @property
    def chunk_samples(self) -> int:
        return int(self._attrs["chunk_samples"])

    def num_samples(self, split: str) -> int:
        return int(self._attrs["splits"][split])

    @property
    def shard_samples(self) -> int:
        return layout.shard_samples(self._attrs)

    def num_shards(self, split: str) -> int:
        return layout.num_chunks(self.num_samples(split), self.shard_samples)

    def shard_rows(self, split: str, shard: int) -> slice:
        return layout.chunk_slice(shard, self.num_samples(split), self.shard_samples)

    def grid(self, block: int) -> int | None:
        entry = self._attrs["features"].get(str(block))
        return None if entry is None else int(entry["grid"])

    def add_arrays(self, features: dict[int, int], timesteps: list[int], pools: list[int]) -> None:
        """Make sure an array exists for every (split, block, timestep); `features` maps block -> grid.

        An existing block must have been stored at the same grid (a finer one cannot be derived).
        """
        table = {row["number"]: row for row in self._attrs["block_table"]}
        contents = {key: dict(value) for key, value in self._attrs["features"].items()}
        for block, grid in features.items():
            entry = contents.get(str(block))
            if entry is not None and entry["grid"] != grid:
                raise StoreMismatchError(
                    f"{self.path}: block {block} is stored pooled to {entry['grid']}x{entry['grid']}, "
                    f"this run needs {grid}x{grid} for pools {sorted(pools)}. Ask only for pools that divide "
                    f"{entry['grid']}, or use --overwrite (or another --out) to re-extract."
                )
        dtype = self._attrs["dtype"]
        wanted = {(int(block), int(t)): int(grid) for block, grid in features.items() for t in timesteps}
        with self._writing("creating arrays", unlisted=wanted):
            for block, grid in features.items():
                channels = table[block]["channels"]
                entry = contents.setdefault(str(block), {"grid": grid, "timesteps": []})
                for timestep in timesteps:
                    for split in self._attrs["splits"]:
                        self._ensure_array(split, block, timestep, channels, grid, dtype)
                    if timestep not in entry["timesteps"]:
                        entry["timesteps"] = sorted([*entry["timesteps"], timestep])
            # Arrays first, then the attributes that list them: a crash in between leaves unlisted
            # (and unfinished) arrays that the next run adopts.
            self._update_attrs(
                features=contents,
                pools=sorted(set(self._attrs.get("pools", [])) | {int(p) for p in pools}),
            )

    def _ensure_array(self, split: str, block: int, timestep: int, channels: int, grid: int, dtype: str) -> None:
        n = self.num_samples(split)
        name = layout.feature_path(split, block, timestep)
        shape = (n, channels, grid, grid)
        chunking = sample_chunking(n, self.chunk_samples, self.shard_samples, (channels, grid, grid))
        try:
            existing = self._group[name]
        except KeyError:
            existing = None
        except DECODE_ERRORS:  # its zarr.json is damaged: its chunks cannot be trusted either
            log.warning("%s/%s has damaged metadata: made again, its chunks to be recomputed", self.path, name)
            self._forget_array(split, block, timestep)
            existing = None
        if existing is not None:
            if (existing.shape == shape and existing.chunks == chunking["chunks"]
                    and existing.shards == chunking.get("shards") and str(existing.dtype) == dtype):
                return  # (stores made before sharding keep their unsharded arrays: a shard is a chunk there)
            if self.done(split, block, timestep).any():
                raise StoreError(f"{self.path}/{name} is {existing.shape} in chunks of {existing.chunks} "
                                 f"({existing.dtype}), this run needs {shape} in chunks of {chunking['chunks']} "
                                 f"({dtype}) and it holds finished shards: use --overwrite (or another --out) to "
                                 "re-extract")
            self._forget_array(split, block, timestep)
        self._group.create_array(
            name, shape=shape, **chunking, dtype=dtype,
            fill_value=np.nan,  # unfinished samples read as NaN, never as plausible zeros
            compressors=FEATURE_CODECS, dimension_names=layout.DIMENSIONS,
        )

    def update_info(self, **info) -> None:
        """Record descriptive attributes (not part of the identity), e.g. where the model came from."""
        with self._writing("recording the settings"):
            self._update_attrs(**info)

    def _update_attrs(self, **changes) -> None:
        self._attrs.update(changes)
        self._group.attrs.update(changes)

    # -- completion ----------------------------------------------------------------------------------
    def done(self, split: str, block: int, timestep: int) -> np.ndarray:
        """(n_shards,) bool: shards of the array marked finished."""
        return done_shards(self._sets.get(split, []), block, timestep, self.num_shards(split))

    def pending_shards(self, split: str, block: int, timestep: int) -> list[int]:
        """Shards of this array not yet marked done."""
        return [int(k) for k in np.flatnonzero(~self.done(split, block, timestep))]

    def write_set(self, split: str, arrays) -> str:
        """The write set of these (block, timestep) arrays in `split` (created if new); pass it to `write_shard`."""
        keys = sorted({(int(b), int(t)) for b, t in arrays})
        path = f"{layout.progress_group(split)}/{layout.write_set_name(keys)}"
        if not any(s.path == path for s in self._sets[split]):
            with self._writing("creating completion flags"):
                # one object per flag: shards are written by different processes, never one object by two
                array = self._group.create_array(
                    path, shape=(self.num_shards(split),), chunks=(1,), dtype="uint8", fill_value=0,
                    compressors=SMALL_CODECS, dimension_names=("shard",),
                    attributes={"arrays": [layout.array_key(b, t) for b, t in keys]},
                )
                del array
            self._sets[split].append(WriteSet(path, frozenset(keys), np.zeros(self.num_shards(split), np.uint8)))
        return path

    def reload_write_sets(self) -> None:
        """Read the completion flags again (a process attached to the store, after the holder made new sets)."""
        self._load_sets()

    # -- writing -------------------------------------------------------------------------------------
    def write_shard(self, split: str, shard: int, features: dict[tuple[int, int], np.ndarray], *,
                    write_set: str | None = None, files: np.ndarray | None = None) -> None:
        """Write shard `shard` (`shard_rows`) of several arrays, keyed (block, timestep), whole, then mark it
        done in one write.

        `files` (n, 2) uint64 are the shard's images' content hashes and mtimes, as read for this
        shard; where the store recorded other hashes for them, nothing is written (DataChangedError).
        `write_set` defaults to the set of exactly these arrays.
        """
        rows = self.shard_rows(split, shard)
        for (block, timestep), values in features.items():
            if values.shape[0] != rows.stop - rows.start:
                raise ValueError(f"shard {shard} of {split} holds {rows.stop - rows.start} samples, got "
                                 f"{values.shape[0]}")
            if not np.isfinite(values).all():
                bad = rows.start + np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
                raise NonFiniteFeaturesError(
                    f"block {block} at timestep {timestep} gave NaN or infinite features for {split} samples "
                    f"{format_ranges(bad.tolist())}; they are not stored. Features beyond float16's range "
                    "(65504) overflow: try --dtype float32, and --precision fp32 if the model ran in bf16 or fp16"
                )
        if files is not None:
            self._check_files(split, rows, files)
        path = write_set or self.write_set(split, features)
        target = next(s for s in self._sets[split] if s.path == path)
        missing = set(features) - target.arrays
        if missing:
            raise ValueError(f"write set {path} does not hold {sorted(missing)}")
        if self._lock is not None:
            self._lock.check()  # an object store's lease lost to another writer: stop before writing
        with self._writing(f"shard {shard} of {split}"):
            for (block, timestep), values in features.items():
                name = layout.feature_path(split, block, timestep)
                array = self._group[name]
                # An unfinished shard's old object holds nothing of value, and zarr would read it (a damaged
                # one fails) to merge the new rows into it: start from nothing.
                self._discard(layout.shard_file(name, shard, array.ndim))
                array[rows] = values.astype(array.dtype, copy=False)
            if files is not None and layout.files_path(split) in self._group:
                self._discard(layout.shard_file(layout.files_path(split), shard, 2))
                self._group[layout.files_path(split)][rows] = files
            self._group[path][shard] = 1
        target.flags[shard] = 1

    def file_records(self, split: str) -> np.ndarray:
        """(N, 2) uint64 content hash and mtime (ns) of each image when it was read; 0 where not yet read."""
        return np.asarray(self._group[layout.files_path(split)][:], dtype=np.uint64)

    def update_file_records(self, split: str, rows: np.ndarray, records: np.ndarray) -> None:
        """Record new mtimes of images whose content was checked unchanged (so they are not hashed again)."""
        array = self._group[layout.files_path(split)]
        current = np.asarray(array[:], dtype=np.uint64)
        current[rows] = records
        with self._writing("recording file checks"):
            array[:] = current

    def _check_files(self, split: str, rows: slice, files: np.ndarray) -> None:
        stored = np.asarray(self._group[layout.files_path(split)][rows], dtype=np.uint64)
        recorded = stored[:, 0] != 0
        changed = recorded & (stored[:, 0] != files[:, 0])
        if changed.any():
            names = self._group[layout.paths_path(split)][rows][changed]
            raise DataChangedError(
                f"{len(names)} image(s) of {split} changed since the store's features were computed from them "
                f"(content hash differs): {', '.join(map(str, names[:5]))}{' ...' if len(names) > 5 else ''}. "
                "Restore them, or re-extract everything with --overwrite"
            )

    def remaining_bytes(self, unlisted: dict[tuple[int, int], int] | None = None) -> int:
        """Uncompressed bytes of every shard not yet finished: what a run still writes, at most; `unlisted`
        ((block, timestep) -> grid) adds arrays about to be created."""
        itemsize = np.dtype(self._attrs["dtype"]).itemsize
        table = {row["number"]: row for row in self._attrs["block_table"]}
        arrays = {(int(b), int(t)): int(e["grid"]) for b, e in self._attrs["features"].items() for t in e["timesteps"]}
        total = 0
        for split in self._attrs["splits"]:
            for (block, timestep), grid in {**(unlisted or {}), **arrays}.items():
                per_sample = table[block]["channels"] * grid ** 2 * itemsize
                listed = (block, timestep) in arrays
                pending = len(self.pending_shards(split, block, timestep)) if listed else self.num_shards(split)
                total += min(pending * self.shard_samples, self.num_samples(split)) * per_sample
        return total

    @contextmanager
    def _writing(self, what: str, unlisted: dict | None = None):
        try:
            yield
        except OSError as error:
            if error.errno not in FULL or not self.location.local:
                raise
            free = shutil.disk_usage(self.location.path).free
            raise StoreFullError(
                f"{self.path}: no space left on the device while {what}; {format_bytes(free)} free, and the "
                f"unfinished shards need up to {format_bytes(self.remaining_bytes(unlisted))} more (before "
                f"compression). "
                "Free some space and run the same command again: finished shards are kept."
            ) from None

    # -- reopening and repairs -----------------------------------------------------------------------
    def _load_sets(self) -> list[Damage]:
        damage = []
        for split in self._attrs["splits"]:
            self._sets[split], found = load_write_sets(self._group, split, self.num_shards(split))
            damage += found
        return damage

    def _reopen(self, splits: dict[str, SplitIndex], *, verify: bool) -> None:
        remove_partial_writes(self.location)
        sizes = {split: len(index.paths) for split, index in splits.items()}
        if {**self._attrs["splits"], **sizes} != self._attrs["splits"]:  # edited: the data set says what they are
            log.warning("%s/zarr.json listed split sizes %s; the data set has %s: corrected", self.path,
                        self._attrs["splits"], sizes)
            self._update_attrs(splits={**self._attrs["splits"], **sizes})
        for split, index in splits.items():
            self._repair_index(split, index)
        self._repair(verify=verify)

    @classmethod
    def repair(cls, path: str | Location) -> list[Damage]:
        """Verify every finished shard of the store at `path` and repair what needs no data set: damaged
        flags are rebuilt, damaged or missing shards marked unfinished (`pipeline extract` recomputes
        them). Returns what was found; labels and paths can only be written again by `pipeline extract`."""
        directory = Location.parse(path)
        read_root_attrs(directory)  # a store that is not there, or not a store, is named first
        lock = locks.lock_writer(directory)
        try:
            state, _ = inspect_directory(directory)
            if state != "valid":
                raise StoreError(f"{directory} is {state}: only `pipeline extract ... --overwrite` can rebuild it")
            writer = cls(directory, zarr.open_group(directory.zarr_store(read_only=False), mode="r+"), lock)
            found = find_damage(directory, full=True)
            with writer._writing("repairing the store"):
                writer._repair(verify=True)
            return found
        finally:
            lock.release()

    def _repair(self, *, verify: bool) -> None:
        """Flags, arrays and finished shards: what the settings imply is there, and sound."""
        damage = self._load_sets()
        for item in damage:
            if item.shard is None:  # flags of the wrong length: they are rebuilt from scratch
                log.warning("%s: rebuilt", item.describe(self.path))
                del self._group[item.path]
        if any(d.shard is None for d in damage):
            damage = [d for d in damage if d.shard is not None] + self._load_sets()
        for item in damage:
            self._rebuild_flag(item)
        table = {row["number"]: row for row in self._attrs["block_table"]}
        for split in self._attrs["splits"]:
            for block, entry in self._attrs["features"].items():
                for timestep in entry["timesteps"]:
                    self._ensure_array(split, int(block), int(timestep), table[int(block)]["channels"],
                                       int(entry["grid"]), self._attrs["dtype"])
        for item in find_damage(self.location, full=verify):
            if item.shard is not None and "/block" in item.path:
                log.warning("%s: marked unfinished, to be recomputed", item.describe(self.path))
                split = item.path.split("/")[0]
                self._mark_unfinished(split, *layout.parse_array_key(item.path.split("/", 1)[1]), item.shard)

    def _repair_index(self, split: str, index: SplitIndex) -> None:
        """Labels, paths and file records exist and hold what the data set says (identity already matched)."""
        n = len(index.paths)
        group = self._group.require_group(split)
        self._group.require_group(layout.progress_group(split))
        expected = {layout.labels_path(split): np.asarray(index.labels, dtype=np.int64),
                    layout.paths_path(split): np.asarray(index.paths, dtype=str)}
        for path, values in expected.items():
            try:
                array = self._group[path]
                current = array[:]
                if array.shape == (n,) and np.array_equal(current, values):
                    continue
            except (KeyError, *DECODE_ERRORS):
                pass
            log.warning("%s/%s was missing or damaged: written again from the data set", self.path, path)
            write_index_array(self._group, path, values)
        try:
            files = self._group[layout.files_path(split)]
            if files.shape != (n, 2):
                raise KeyError(layout.files_path(split))
            for k in range(-(-n // files.chunks[0])):
                rows = chunk_rows(files, k)
                if decode_error(files, rows):  # unknown hashes: checked again when the images are next read
                    files[rows] = np.zeros((rows.stop - rows.start, 2), np.uint64)
        except (KeyError, *DECODE_ERRORS):
            if layout.files_path(split) in group:
                del self._group[layout.files_path(split)]
            create_files_array(self._group, split, n, self.chunk_samples, self.shard_samples)

    def _rebuild_flag(self, item: Damage) -> None:
        """A damaged flag of shard k: 1 if every array of its set verifies at shard k, else 0."""
        split = item.path.split("/")[1]
        write_set = next(s for s in self._sets[split] if s.path == item.path)
        ok = all(shard_problem(self.location, layout.feature_path(split, b, t),
                               self._group[layout.feature_path(split, b, t)], item.shard, self.shard_samples,
                               full=True) is None
                 for b, t in write_set.arrays if layout.feature_path(split, b, t) in self._group)
        log.warning("%s: rebuilt as %s", item.describe(self.path), "finished" if ok else "unfinished")
        self._group[item.path][item.shard] = int(ok)
        write_set.flags[item.shard] = int(ok)

    def _mark_unfinished(self, split: str, block: int, timestep: int, shard: int) -> None:
        for write_set in self._sets[split]:
            if (block, timestep) in write_set.arrays and write_set.flags[shard]:
                self._group[write_set.path][shard] = 0
                write_set.flags[shard] = 0

    def _discard(self, key: str) -> None:
        if self.location.local:
            (self.location.path / key).unlink(missing_ok=True)
        else:
            self.location.delete(key)

    def _forget_array(self, split: str, block: int, timestep: int) -> None:
        """Delete a feature array and mark all of its shards unfinished."""
        path = layout.feature_path(split, block, timestep)
        if self.location.local:
            shutil.rmtree(self.location.path / path, ignore_errors=True)
        else:
            self.location.delete(path)
        for shard in range(self.num_shards(split)):
            self._mark_unfinished(split, block, timestep, shard)
