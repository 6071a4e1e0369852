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

import json
import logging
from contextlib import contextmanager
from dataclasses import replace as replaced

import numpy as np
import zarr

from cache import digests, layout, locks, repair
from cache.creation import (
    FEATURE_CODECS,
    FULL,
    SMALL_CODECS,
    SplitIndex,
    differences,
    inspect_directory,
    make_directory,
    replace,
    sample_chunking,
)
from cache.errors import (
    REPLACE,
    DataChangedError,
    IncompleteStoreError,
    NonFiniteFeaturesError,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    StoreReplacedError,
)
from cache.integrity import (
    DECODE_ERRORS,
    Damage,
    WriteSet,
    digest_columns,
    done_shards,
    load_write_sets,
    read_root_attrs,
    settings_damaged,
)
from cache.manifest import Manifest, write_manifest
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
        self._manifest = Manifest.parse(dict(group.attrs), self.path)  # typed once; every change is a new one
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
        recipe: dict | None = None,
    ) -> FeatureStoreWriter:
        """Create the store, or reopen one made with the same `settings` (keys in layout.IDENTITY_KEYS).

        `grids` (block -> stored grid) are the grids this run will write; a block already stored at
        another grid is a difference too. A store that differs is refused with the differences
        named, or, with `overwrite`, replaced (never while a reader holds it). A store that agrees is
        reopened either way and repaired where needed (module docstring), so finished shards are kept
        and only what is missing gets computed. `verify` also decodes every finished shard.
        `path` is a local directory or an object store URL (`cache.storage.Location`). `recipe` is
        recorded as it is (root attribute "recipe"): what the caller needs to make the store again.
        """
        settings = layout.normalised(settings)
        missing = [key for key in layout.IDENTITY_KEYS if key not in settings]
        if missing:
            raise ValueError(f"settings lack {missing}")
        if not splits:
            raise ValueError("a store needs at least one split")
        if layout.shard_samples(settings) % int(settings["chunk_samples"]):
            raise ValueError(
                f"shard_samples {settings['shard_samples']} is not a multiple of chunk_samples "
                f"{settings['chunk_samples']}"
            )
        directory = Location.parse(path)
        make_directory(directory)
        lock = locks.lock_writer(directory)
        try:
            state, existing = inspect_directory(directory)
            changed = differences(existing, settings, grids or {}) if state == "valid" else []
            if state == "valid" and not changed:
                writer = cls(directory, zarr.open_group(directory.zarr_store(read_only=False), mode="r+"), lock)
                with writer._writing("reopening the store"):
                    repair.reopen(writer, splits, verify=verify, recipe=recipe)
                return writer
            if state == "valid" and not overwrite:
                raise StoreMismatchError(
                    f"{directory} was made with other settings:\n  " + "\n  ".join(changed), store=directory
                )
            if state == "damaged" and not overwrite:
                raise settings_damaged(directory)
            if state == "unfinished":
                log.warning(
                    "%s was left unfinished by a run that stopped while making it: building it again", directory
                )
            writer = cls(directory, replace(directory, settings, splits, block_table, recipe), lock)
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
    def manifest(self) -> Manifest:
        """The settings as they are now, typed (`cache.manifest`)."""
        return self._manifest

    @property
    def _attrs(self) -> dict:
        """The settings in their stored form (what digests are bound to, `cache.digests.binding`)."""
        return self._manifest.to_attrs()

    @property
    def chunk_samples(self) -> int:
        return self._manifest.chunk_samples

    def num_samples(self, split: str) -> int:
        return int(self._manifest.splits[split])

    @property
    def shard_samples(self) -> int:
        return self._manifest.shard_samples

    def num_shards(self, split: str) -> int:
        return layout.num_chunks(self.num_samples(split), self.shard_samples)

    def shard_rows(self, split: str, shard: int) -> slice:
        return layout.chunk_slice(shard, self.num_samples(split), self.shard_samples)

    def grid(self, block: int) -> int | None:
        stored = self.manifest.features.get(int(block))
        return None if stored is None else stored.grid

    def add_arrays(self, features: dict[int, int], timesteps: list[int], pools: list[int]) -> None:
        """Make sure an array exists for every (split, block, timestep); `features` maps block -> grid.

        An existing block must have been stored at the same grid (a finer one cannot be derived).
        """
        manifest = self.manifest
        for block, grid in features.items():
            stored = manifest.features.get(int(block))
            if stored is not None and stored.grid != grid:
                raise StoreMismatchError(
                    f"{self.path}: block {block} is stored pooled to {stored.grid}x{stored.grid}, "
                    f"this run needs {grid}x{grid} for pools {sorted(pools)}. Ask only for pools that divide "
                    f"{stored.grid}, or extract again",
                    store=self.location,
                )
        dtype = manifest.identity["dtype"]
        wanted = {(int(block), int(t)): int(grid) for block, grid in features.items() for t in timesteps}
        with self._writing("creating arrays", unlisted=wanted):
            for block, grid in features.items():
                channels = manifest.block(block).channels
                for timestep in timesteps:
                    for split in manifest.splits:
                        self._ensure_array(split, block, timestep, channels, grid, dtype)
            # Arrays first, then the attributes that list them: a crash in between leaves unlisted
            # (and unfinished) arrays that the next run adopts.
            self._record(manifest.with_arrays(features, timesteps, pools))

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
            if (
                existing.shape == shape
                and existing.chunks == chunking["chunks"]
                and existing.shards == chunking.get("shards")
                and str(existing.dtype) == dtype
            ):
                return  # (stores made before sharding keep their unsharded arrays: a shard is a chunk there)
            if self.done(split, block, timestep).any():
                raise StoreMismatchError(
                    f"{self.path}/{name} is {existing.shape} in chunks of {existing.chunks} "
                    f"({existing.dtype}), this run needs {shape} in chunks of "
                    f"{chunking['chunks']} ({dtype}) and it holds finished shards",
                    store=self.location,
                )
            self._forget_array(split, block, timestep)
        self._group.create_array(
            name,
            shape=shape,
            **chunking,
            dtype=dtype,
            fill_value=np.nan,  # unfinished samples read as NaN, never as plausible zeros
            compressors=FEATURE_CODECS,
            dimension_names=layout.DIMENSIONS,
        )

    def update_info(self, **info) -> None:
        """Record descriptive attributes (not part of the identity), e.g. where the model came from."""
        with self._writing("recording the settings"):
            self._record(replaced(self._manifest, info={**self._manifest.info, **info}))

    def _record(self, new: Manifest) -> None:
        """Store the settings `new` (`cache.manifest.write`), this writer's copy with them."""
        if self._lock is not None and self._lock.may_be_lost:
            self._check_attrs_unchanged()
        write_manifest(self._group, new)
        self._manifest = new

    def _check_attrs_unchanged(self) -> None:
        # the whole settings file is written from this writer's copy: never from a copy that another writer
        # has since changed (a lease lost in a stall between its check and this write)
        stored = json.loads(self.location.read_text("zarr.json")).get("attributes", {})
        if Manifest.parse(stored, self.path) != self._manifest:
            raise StoreReplacedError(
                f"{self.path}: its settings were changed by another writer while this one ran; "
                "this run stops without writing them (finished shards are kept). Run the same "
                "command again to finish the store"
            )

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
        known = next((s for s in self._sets[split] if s.path == path), None)
        if known is not None and known.digests is None:  # a set of format 1: its new shards get digests
            with self._writing("creating digest records"):
                known.digests = self._digest_array(split, path, keys)
        if known is None:
            with self._writing("creating completion flags"):
                digests_table = self._digest_array(split, path, keys)  # before the flags that point to it
                # one object per flag: shards are written by different processes, never one object by two
                array = self._group.create_array(
                    path,
                    shape=(self.num_shards(split),),
                    chunks=(1,),
                    dtype="uint8",
                    fill_value=0,
                    compressors=SMALL_CODECS,
                    dimension_names=("shard",),
                    attributes={"arrays": [layout.array_key(b, t) for b, t in keys]},
                )
                del array
            self._sets[split].append(
                WriteSet(
                    path,
                    frozenset(keys),
                    np.zeros(self.num_shards(split), np.uint8),
                    digest_columns(keys),
                    digests_table,
                )
            )
        return path

    def _digest_array(self, split: str, flags_path: str, keys) -> np.ndarray:
        """Make (or adopt) the set's digest record: one object per shard, like its features (`cache.digests`)."""
        path = layout.digests_path(flags_path)
        columns = digest_columns(keys)
        shape = (layout.num_chunks(self.num_samples(split), self.chunk_samples), len(columns))
        try:
            existing = self._group[path]
            if existing.shape == shape:
                return np.asarray(existing[:], dtype=np.uint64)
        except (KeyError, *DECODE_ERRORS):
            pass
        self._group.create_array(
            path,
            shape=shape,
            chunks=(self.shard_samples // self.chunk_samples, len(columns)),
            dtype="uint64",
            fill_value=0,
            compressors=SMALL_CODECS,
            dimension_names=("chunk", "column"),
            attributes={"columns": list(columns)},
            overwrite=True,
        )
        return np.zeros(shape, np.uint64)

    def reload_write_sets(self) -> None:
        """Read the completion flags again (a process attached to the store, after the holder made new sets)."""
        self._load_sets()

    # -- writing -------------------------------------------------------------------------------------
    def write_shard(
        self,
        split: str,
        shard: int,
        features: dict[tuple[int, int], np.ndarray],
        *,
        write_set: str | None = None,
        files: np.ndarray | None = None,
    ) -> None:
        """Write shard `shard` (`shard_rows`) of several arrays, keyed (block, timestep), whole, then mark it
        done in one write.

        `files` (n, 2) uint64 are the shard's images' content hashes and mtimes, as read for this
        shard; where the store recorded other hashes for them, nothing is written (DataChangedError).
        `write_set` defaults to the set of exactly these arrays.
        """
        rows = self.shard_rows(split, shard)
        for (block, timestep), values in features.items():
            if values.shape[0] != rows.stop - rows.start:
                raise ValueError(
                    f"shard {shard} of {split} holds {rows.stop - rows.start} samples, got {values.shape[0]}"
                )
            if not np.isfinite(values).all():
                bad = rows.start + np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
                raise NonFiniteFeaturesError(
                    f"block {block} at timestep {timestep} gave NaN or infinite features for {split} samples "
                    f"{format_ranges(bad.tolist())}; they are not stored. Features beyond float16's range "
                    "(65504) overflow",
                    store=self.location,
                )
        if files is not None:
            self._check_files(split, rows, files)
        path = write_set or self.write_set(split, features)
        target = next(s for s in self._sets[split] if s.path == path)
        missing = set(features) - target.arrays
        if missing:
            raise ValueError(f"write set {path} does not hold {sorted(missing)}")
        if target.digests is None:  # attached before the holder gave a set of format 1 its digest record
            target.digests = self._digest_array(split, path, target.arrays)
        chunks = range(rows.start // self.chunk_samples, layout.num_chunks(rows.stop, self.chunk_samples))
        table = np.zeros((len(chunks), len(target.columns)), np.uint64)
        key = digests.binding(self._attrs)
        with self._writing(f"shard {shard} of {split}"):
            for (block, timestep), values in features.items():
                name = layout.feature_path(split, block, timestep)
                array = self._group[name]
                stored = values.astype(array.dtype, copy=False)
                column = target.columns.index(layout.array_key(block, timestep))
                for i, chunk in enumerate(chunks):
                    part = stored[i * self.chunk_samples : (i + 1) * self.chunk_samples]
                    table[i, column] = digests.chunk_digest(key, name, chunk, part)
                # An unfinished shard's old object holds nothing of value, and zarr would read it (a damaged
                # one fails) to merge the new rows into it: start from nothing.
                self._discard(layout.shard_file(name, shard, array.ndim))
                array[rows] = stored
            if files is not None and layout.files_path(split) in self._group:
                for i, chunk in enumerate(chunks):
                    part = files[i * self.chunk_samples : (i + 1) * self.chunk_samples]
                    table[i, -1] = digests.file_digest(key, split, chunk, part)
                self._discard(layout.shard_file(layout.files_path(split), shard, 2))
                self._group[layout.files_path(split)][rows] = files
            # the digests, then the flag that says they are there: a kill in between leaves the shard unfinished
            self._group[layout.digests_path(path)][chunks.start : chunks.stop] = table
            self._group[path][shard] = layout.FLAG_DIGESTS
        target.digests[chunks.start : chunks.stop] = table
        target.flags[shard] = layout.FLAG_DIGESTS

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
                f"(content hash differs): {', '.join(map(str, names[:5]))}{' ...' if len(names) > 5 else ''}",
                store=self.location,
            )

    def remaining_bytes(self, unlisted: dict[tuple[int, int], int] | None = None) -> int:
        """Uncompressed bytes of every shard not yet finished: what a run still writes, at most; `unlisted`
        ((block, timestep) -> grid) adds arrays about to be created."""
        manifest = self.manifest
        itemsize = np.dtype(manifest.identity["dtype"]).itemsize
        arrays = {(b, t): manifest.features[b].grid for b, t in manifest.arrays()}
        total = 0
        for split in manifest.splits:
            for (block, timestep), grid in {**(unlisted or {}), **arrays}.items():
                per_sample = manifest.block(block).channels * grid**2 * itemsize
                listed = (block, timestep) in arrays
                pending = len(self.pending_shards(split, block, timestep)) if listed else self.num_shards(split)
                total += min(pending * self.shard_samples, self.num_samples(split)) * per_sample
        return total

    @contextmanager
    def _writing(self, what: str, unlisted: dict | None = None):
        if self._lock is not None:
            self._lock.check()  # an object store's lease lost to another writer: stop before writing
        try:
            yield
        except OSError as error:
            free = self.location.free_bytes() if error.errno in FULL else None
            if free is None:
                raise
            raise StoreFullError(
                f"{self.path}: no space left on the device while {what}; {format_bytes(free)} free, and the "
                f"unfinished shards need up to {format_bytes(self.remaining_bytes(unlisted))} more (before "
                f"compression). "
                "Free some space and run the same command again: finished shards are kept."
            ) from None

    # -- reopening and repairs (cache.repair) ---------------------------------------------------------
    def _load_sets(self) -> list[Damage]:
        damage = []
        for split in self._manifest.splits:
            self._sets[split], found = load_write_sets(
                self._group, split, self.num_shards(split), self.shard_samples // self.chunk_samples
            )
            damage += found
        return damage

    @classmethod
    def restore_settings(cls, path: str | Location) -> list[Damage]:
        """A root zarr.json that does not parse, written again from the settings' copy (`cache.manifest`); [] where
        it parses. Without an intact copy the settings are lost: the IntegrityError says so."""
        directory = Location.parse(path)
        try:
            if inspect_directory(directory)[0] != "damaged":
                return []
        except StoreError:  # not a feature store at all: what reads it next says so, as it always did
            return []
        lock = locks.lock_writer(directory)
        try:
            return repair.restore_settings(directory)
        finally:
            lock.release()

    @classmethod
    def repair(cls, path: str | Location) -> list[Damage]:
        """Verify every finished shard of the store at `path` and repair what needs no data set: damaged
        flags rebuilt, damaged, missing or foreign shards marked unfinished (`cache.repair`), for the next
        extraction to recompute. Returns what was found."""
        directory = Location.parse(path)
        read_root_attrs(directory)  # a store that is not there, or not a store, is named first
        lock = locks.lock_writer(directory)
        try:
            state, _ = inspect_directory(directory)
            if state == "unfinished":
                raise IncompleteStoreError(
                    f"{directory} was never finished being made: a run stopped while making or replacing it",
                    store=directory,
                )
            if state != "valid":
                raise StoreError(f"{directory} is {state}", store=directory, remedy=REPLACE)
            writer = cls(directory, zarr.open_group(directory.zarr_store(read_only=False), mode="r+"), lock)
            with writer._writing("repairing the store"):
                return repair.repair_alone(writer)
        finally:
            lock.release()

    def _mark_unfinished(self, split: str, block: int, timestep: int, shard: int) -> None:
        for write_set in self._sets[split]:
            if (block, timestep) in write_set.arrays and write_set.flags[shard]:
                self._set_flag(write_set, shard, 0)

    def _set_flag(self, write_set: WriteSet, shard: int, value: int) -> None:
        self._group[write_set.path][shard] = value
        write_set.flags[shard] = value

    def _discard(self, key: str) -> None:
        self.location.delete(key)

    def _forget_array(self, split: str, block: int, timestep: int) -> None:
        """Delete a feature array and mark all of its shards unfinished."""
        self.location.delete(layout.feature_path(split, block, timestep))
        for shard in range(self.num_shards(split)):
            self._mark_unfinished(split, block, timestep, shard)
