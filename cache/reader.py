"""Reading a feature store (read-only: it never writes or repairs anything).

    store = FeatureStore.open("features/pretrained.zarr")    # or "s3://bucket/features.zarr", storage options
    store.blocks, store.timesteps, store.splits, store.attrs["noise_seed"]
    x = store.read("train", block=24, timestep=90, pool=2)   # (N, C, 2, 2) float32
    y = store.labels("train")                                 # (N,) int64
    lazy = store.read_dask("train", 24, 90, pool=1)           # same values, chunked by samples
    store.views("train")                                      # 1, or K in a store extracted with K views
    selection = store.select(blocks=[24], pools=[1, 2], split="train", view=1)   # what to read (cache.selection)
    x3 = store.read("train", 24, 90, pool=2, view=3)          # augmented view 3 of every train image
    with store.hold(): ...                                    # no writer may replace it meanwhile

What is read can be trusted or fails loudly. Opening checks the settings against the arrays (split
sizes, shapes, completion flags), naming the file that disagrees. Every chunk read is checked: its
checksum (zarr's crc32c codec, verified as it decodes), and, where it is marked finished, that it
is there and finite, and that its values match the digests recorded when it was written
(`cache.digests`: a chunk missing, copied in from another store or edited in place is named, never
read as its fill value). Labels, paths and file records are checked the same way. Every read also
checks that the store is still the one that was opened (its identity settings), so a store replaced
under a reader stops it instead of feeding it other features. `verify` checks every finished chunk of
the store at once. Errors carry the damage found (`IntegrityError.damage`) and what it needs (`remedy`).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

import numpy as np
import zarr

from cache import digests, layout, locks
from cache.errors import (
    REPLACE,
    ConfigError,
    IncompleteStoreError,
    IntegrityError,
    NotInStoreError,
    StoreError,
    StoreReplacedError,
)
from cache.integrity import (
    DECODE_ERRORS,
    Damage,
    WriteSet,
    chunk_rows,
    decode_error,
    digest_mismatch,
    done_shards,
    expected_digests,
    files_damage,
    find_damage,
    finished_attrs,
    identity,
    index_problem,
    load_write_sets,
    read_root_attrs,
)
from cache.manifest import Manifest
from cache.pooling import adaptive_avg_pool, derivable, read_grid
from cache.selection import Selection, base_splits, describe_holdings, readable_pools, select, stored_views
from cache.storage import Location
from cache.text import format_ranges


class FeatureStore:
    def __init__(self, group: zarr.Group, location: Location, attrs: dict):
        self._group = group
        self.location = location
        self.path = str(location)
        self._attrs = layout.normalised(attrs)
        self._identity = identity(attrs)
        self._hold = None
        self._arrays: dict[str, zarr.Array] = {}
        self._key = digests.binding(attrs)
        self.manifest = Manifest.parse(attrs, self.path)  # the settings, typed and checked once
        self._root_seen = self._root_stamp()
        self._check_shapes()  # the settings first: a wrong split size would look like damaged flags
        self._sets = {split: self._load_sets(split) for split in self.manifest.splits}  # views too

    @classmethod
    def open(cls, path, storage_options: dict | None = None) -> FeatureStore:
        """The store at a local path or an fsspec URL (`s3://...`, with `storage_options` for its file system)."""
        location = Location.parse(path, storage_options)
        attrs = finished_attrs(location)
        return cls(zarr.open_group(location.zarr_store(read_only=True), mode="r"), location, attrs)

    # -- holding ---------------------------------------------------------------------------------------
    def hold(self) -> FeatureStore:
        """Pin the store while it is read: a writer that would replace it is refused until `release`.

        Use as a context manager (`with store.hold(): ...`). Only local stores have the lock; on any
        store every read still checks that the store was not replaced."""
        if self._hold is None:
            self._hold = locks.hold_for_reading(self.location)  # None on an object store: it has no such lock
            self._check_current()
        return self

    def release(self) -> None:
        locks.unlock(self._hold)
        self._hold = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- what the store holds --------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The recorded settings: model, data, preprocessing, noise_seed, dtype, block_table, ..."""
        return json.loads(json.dumps(self._attrs))

    @property
    def splits(self) -> list[str]:
        """The data set's splits (augmented views of a split are not splits of their own: `views`)."""
        return base_splits(self.manifest)

    def views(self, split: str) -> int:
        """How many views of each image of `split` the store holds: 1 (the centre view), or K in a store
        extracted with K views (view 0 the centre view, 1..K-1 augmented; attrs["views"] says how)."""
        self._check_split(split)
        return stored_views(self.manifest, split)

    def view_split(self, split: str, view: int = 0) -> str:
        """The stored split that holds view `view` of `split` (`cache.layout.view_split`)."""
        views = self.views(split)
        if not isinstance(view, (int, np.integer)) or not 0 <= view < views:
            raise NotInStoreError(
                f"{self.path} holds {views} view(s) of {split!r} (0 to {views - 1}), not view {view!r}"
            )
        return layout.view_split(split, int(view))

    @property
    def blocks(self) -> list[int]:
        return sorted(self.manifest.features)

    @property
    def timesteps(self) -> list[int]:
        return sorted({t for stored in self.manifest.features.values() for t in stored.timesteps})

    @property
    def classes(self) -> list[str]:
        return list(self._attrs["data"].get("classes", []))

    @property
    def chunk_samples(self) -> int:
        """Samples per stored chunk: every array of the store is chunked along samples by this."""
        return self.manifest.chunk_samples

    @property
    def shard_samples(self) -> int:
        """Samples per shard, the unit of writing and completion (`chunk_samples` in stores without sharding)."""
        return self.manifest.shard_samples

    @property
    def extracted_pools(self) -> list[int]:
        """The pools the extraction was asked to make readable (a probe's default)."""
        return [int(p) for p in self._attrs.get("pools", [])]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the recorded settings: two stores with equal fingerprints hold the same features."""
        return hashlib.sha256(json.dumps(self._attrs, sort_keys=True).encode()).hexdigest()

    def select(
        self,
        *,
        blocks=None,
        timesteps=None,
        pools=None,
        split: str | None = None,
        view: int = 0,
        full_above: bool = True,
        partial: bool = False,
    ) -> Selection:
        """What a request reads: every (block, timestep) at every pool, of view `view` of `split`, resolved
        against this store (`cache.selection.select`: None means all the store holds; a `SelectionError`
        lists everything it lacks, or with `partial` the selection's `problems` do)."""
        return select(
            self.manifest,
            self.path,
            blocks=blocks,
            timesteps=timesteps,
            pools=pools,
            split=split,
            view=view,
            full_above=full_above,
            partial=partial,
            store=self.location,
        )

    def describe(self) -> str:
        """What the store holds, block by block (timesteps, readable pools, channels, resolution)."""
        return describe_holdings(self.manifest, self.path)

    def has(self, block: int, timestep: int) -> bool:
        stored = self.manifest.features.get(int(block))
        return stored is not None and int(timestep) in stored.timesteps

    def arrays(self) -> list[tuple[int, int]]:
        """Every (block, timestep) the store lists."""
        return self.manifest.arrays()

    def block_info(self, block: int) -> dict:
        """The block's row of the model's table plus the stored `grid`."""
        if int(block) not in self.manifest.features:
            raise NotInStoreError(self._missing_message(block, None))
        return {**self.manifest.block(block).row, "grid": self.manifest.features[int(block)].grid}

    def pools(self, block: int) -> list[int]:
        """Every pool size that can be read exactly for this block."""
        self.block_info(block)  # an unknown block is a NotInStoreError naming what the store holds
        return readable_pools(self.manifest, block)

    def num_samples(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest.splits[split])

    def num_chunks(self, split: str) -> int:
        return layout.num_chunks(self.num_samples(split), self.chunk_samples)

    def num_shards(self, split: str) -> int:
        return layout.num_chunks(self.num_samples(split), self.shard_samples)

    def chunk_rows(self, split: str, chunk: int) -> slice:
        """The sample rows of chunk `chunk` of `split`."""
        return layout.chunk_slice(chunk, self.num_samples(split), self.chunk_samples)

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        return np.asarray(self._read_index(split, layout.labels_path(split)), dtype=np.int64)

    def paths(self, split: str) -> list[str]:
        self._check_split(split)
        return [str(p) for p in self._read_index(split, layout.paths_path(split))]

    def file_records(self, split: str) -> np.ndarray | None:
        """(N, 2) uint64: each image's content hash and mtime (ns) when it was read, 0 where not read yet;
        None for stores written before they were recorded."""
        self._check_split(split)
        path = layout.files_path(split)
        if path not in self._group:
            return None
        values = np.asarray(self._read_whole(path), dtype=np.uint64)
        per_shard = self.shard_samples // self.chunk_samples
        damage = files_damage(
            self._metadata(path),
            split,
            self._sets[split],
            self._key,
            self.num_shards(split),
            per_shard,
            self.chunk_samples,
        )
        if damage:
            self._fail(damage)
        return values

    # -- completeness ----------------------------------------------------------------------------------
    def write_sets(self, split: str) -> list[WriteSet]:
        self._check_split(split)
        return list(self._sets[split])

    def done_chunks(self, split: str, block: int, timestep: int) -> np.ndarray:
        """(n_chunks,) bool: True where sample chunk k of the array is finished (its shard is)."""
        self._check(split, block, timestep)
        shards = done_shards(self._sets[split], block, timestep, self.num_shards(split))
        return shards[self._shard_of(np.arange(self.num_chunks(split)))]

    def missing_chunks(self, split: str, block: int, timestep: int) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done_chunks(split, block, timestep))]

    def missing(self) -> dict[tuple[str, int, int], list[int]]:
        """Every array with unfinished sample chunks: (split, block, timestep) -> chunk indices."""
        result = {}
        for split in self.manifest.splits:  # views too ("<split>@view<v>")
            for block, timestep in self.arrays():
                chunks = self.missing_chunks(split, block, timestep)
                if chunks:
                    result[(split, block, timestep)] = chunks
        return result

    def finished_mask(self, split: str, block: int, timestep: int) -> np.ndarray:
        """(N,) bool: True where the sample's chunk is finished."""
        done = self.done_chunks(split, block, timestep)
        return np.repeat(done, self.chunk_samples)[: self.num_samples(split)]

    # -- features --------------------------------------------------------------------------------------
    def read(
        self,
        split: str,
        block: int,
        timestep: int,
        pool: int | None = None,
        view: int = 0,
        *,
        allow_incomplete: bool = False,
    ) -> np.ndarray:
        """(N, C, p, p) float32 features (p = pool, or the stored grid when pool is None) of view `view`.

        Unfinished chunks are an IncompleteStoreError; with `allow_incomplete` they read as NaN
        (see `finished_mask`). A finished chunk that is damaged, missing or not finite is an
        IntegrityError naming it.
        """
        split = self.view_split(split, view) if view else split
        array = self._array(split, block, timestep, allow_incomplete)
        size = self._output_size(block, pool)
        path = layout.feature_path(split, block, timestep)
        try:
            values = array[:]
        except DECODE_ERRORS as error:  # find the chunk that does not decode
            for chunk in range(self.num_chunks(split)):
                self._decode(array, path, chunk)
            raise IntegrityError(f"{self.path}/{path} cannot be read ({error})") from None
        done = self.done_chunks(split, block, timestep)
        for chunk in np.flatnonzero(done):
            self._check_chunk(values[self.chunk_rows(split, chunk)], split, block, timestep, int(chunk))
        self._check_current()
        return adaptive_avg_pool(values, size)

    def read_chunk(
        self,
        split: str,
        block: int,
        timestep: int,
        chunk: int,
        pool: int | None = None,
        *,
        allow_incomplete: bool = False,
        view: int = 0,
    ) -> np.ndarray:
        """The rows of one sample chunk (`chunk_rows`), as `read` gives them: (n, C, p, p) float32."""
        split = self.view_split(split, view) if view else split
        array = self._array(split, block, timestep, allow_incomplete)
        path = layout.feature_path(split, block, timestep)
        values = self._decode(array, path, chunk)
        if self.done_chunks(split, block, timestep)[chunk]:
            self._check_chunk(values, split, block, timestep, chunk)
        self._check_current()
        return adaptive_avg_pool(values, self._output_size(block, pool))

    def read_dask(
        self, split: str, block: int, timestep: int, pool: int | None = None, *, allow_incomplete: bool = False
    ):
        """The same as `read`, as a dask array chunked along samples like the store (lazy, bounded memory).
        Views other than 0: `read_dask(store.view_split(split, v), ...)`."""
        import dask.array as da

        self._array(split, block, timestep, allow_incomplete)
        size = self._output_size(block, pool)
        chunks = self.num_chunks(split)
        sizes = [self.chunk_rows(split, k).stop - self.chunk_rows(split, k).start for k in range(chunks)]
        info = self.block_info(block)
        parts = [
            da.from_delayed(
                _delayed_chunk(self, split, block, timestep, k, pool, allow_incomplete),
                shape=(sizes[k], info["channels"], size, size),
                dtype=np.float32,
            )
            for k in range(chunks)
        ]
        return da.concatenate(parts, axis=0)

    # -- verification ----------------------------------------------------------------------------------
    def verify(self) -> list[Damage]:
        """Every damaged or missing piece of the store: each finished chunk of every array decoded and
        checked (checksum, presence, finite values), every label, path, file record and flag chunk."""
        return find_damage(self.location, full=True)

    # -- internals -------------------------------------------------------------------------------------
    def _shard_of(self, chunk):
        return chunk * self.chunk_samples // self.shard_samples

    def _where(self, chunk: int) -> str:
        """Damage is named by shard, the unit that is written and repaired (a chunk where unsharded)."""
        shard = int(self._shard_of(chunk))
        return f"shard {shard}" if self.shard_samples == self.chunk_samples else f"shard {shard} (chunk {chunk})"

    def _chunk_file(self, path: str, chunk: int, ndim: int) -> str:
        return layout.shard_file(path, int(self._shard_of(chunk)), ndim)

    def _load_sets(self, split: str) -> list[WriteSet]:
        sets, damage = load_write_sets(
            self._group, split, self.num_shards(split), self.shard_samples // self.chunk_samples
        )
        if damage:
            lines = [d.describe(self.path) for d in damage[:5]]
            raise IntegrityError(
                "completion flags or digests are damaged:\n  " + "\n  ".join(lines), store=self.location, damage=damage
            )
        return sets

    def _fail(self, damage: list[Damage]) -> None:
        raise IntegrityError("; ".join(d.describe(self.path) for d in damage[:5]), store=self.location, damage=damage)

    def _check_shapes(self) -> None:
        """The settings agree with the arrays: split sizes, feature shapes, flag counts (named file on failure)."""
        settings = f"{self.path}/zarr.json"
        for split, n in self.manifest.splits.items():
            for path in (layout.labels_path(split), layout.paths_path(split)):
                shape = self._metadata(path).shape
                if shape != (int(n),):
                    raise IntegrityError(
                        f"{settings} says split {split!r} has {n} samples, but {path} holds "
                        f"{shape[0]}: the settings were edited or damaged",
                        store=self.location,
                        damage=[Damage("zarr.json", None, f"lists {n} samples of {split}")],
                    )
            for block, timestep in self.arrays():
                path = layout.feature_path(split, block, timestep)
                expected = self.manifest.shape(split, block)
                shape = self._metadata(path).shape
                if shape != expected:
                    raise IntegrityError(
                        f"{settings} describes {path} as {expected}, but it is {shape}: the settings "
                        "were edited or damaged",
                        store=self.location,
                        remedy=REPLACE,
                        damage=[Damage(path, None, f"is {shape}, the settings say {expected}")],
                    )

    def _metadata(self, path: str) -> zarr.Array:
        if path in self._arrays:
            return self._arrays[path]
        try:
            self._arrays[path] = self._group[path]
            return self._arrays[path]
        except KeyError:
            self._fail([Damage(path, None, "is missing (the settings list it)")])
        except DECODE_ERRORS as error:
            self._fail([Damage(path, None, f"has a damaged zarr.json ({error})")])

    def _read_whole(self, path: str) -> np.ndarray:
        array = self._metadata(path)
        try:
            values = array[:]
        except DECODE_ERRORS:
            chunks = -(-array.shape[0] // array.chunks[0])
            bad = [k for k in range(chunks) if decode_error(array, chunk_rows(array, k))]
            raise IntegrityError(
                f"{self.path}/{path} chunk(s) {format_ranges(bad)} are damaged",
                store=self.location,
                damage=[Damage(path, None, f"chunk(s) {format_ranges(bad)} are damaged")],
            ) from None
        self._check_current()
        return values

    def _read_index(self, split: str, path: str) -> np.ndarray:
        """Labels or paths, every chunk present and matching the recorded digest (`index_problem`)."""
        values = self._read_whole(path)
        problem = index_problem(self.location, self._attrs, split, path, self._metadata(path))
        if problem:
            self._fail([Damage(path, None, problem)])
        return values

    def _decode(self, array: zarr.Array, path: str, chunk: int) -> np.ndarray:
        try:
            return array[chunk_rows(array, chunk)]
        except DECODE_ERRORS:
            problem = decode_error(array, chunk_rows(array, chunk))
            raise IntegrityError(
                f"{self.path}/{path} {self._where(chunk)} {problem} ({self._chunk_file(path, chunk, array.ndim)})",
                store=self.location,
                damage=[Damage(path, int(self._shard_of(chunk)), problem)],
            ) from None

    def _check_chunk(self, values: np.ndarray, split: str, block: int, timestep: int, chunk: int) -> None:
        """A finished chunk: finite, there, and holding the values written for this place of this store."""
        path = layout.feature_path(split, block, timestep)
        shard = int(self._shard_of(chunk))
        file = self._chunk_file(path, chunk, values.ndim)
        problem = None
        if not np.isfinite(values).all():
            problem = "holds non-finite values" if self.location.exists(file) else "is missing"
        else:
            expected = expected_digests(
                self._sets[split], (block, timestep), shard, self.shard_samples // self.chunk_samples
            )
            if digest_mismatch(self._key, path, values, chunk, self.chunk_samples, expected) is not None:
                problem = "does not match its digest: written for another store or place, or edited"
        if problem:
            self._check_current()  # a store replaced under the reader is that, not damage
            raise IntegrityError(
                f"{self.path}/{path} {self._where(chunk)} is marked finished but {problem} ({file})",
                store=self.location,
                damage=[Damage(path, shard, problem)],
            )

    def _root_stamp(self):
        """(inode, mtime) of the root zarr.json: every rewrite of the settings changes it (local stores)."""
        return self.location.stamp("zarr.json")

    def _check_current(self) -> None:
        stamp = self._root_stamp()
        if stamp is not None and stamp == self._root_seen:
            return  # the settings file was not rewritten since it was last checked
        try:
            now = identity(read_root_attrs(self.location))
        except StoreError as error:
            raise StoreReplacedError(f"{self.path} changed after it was opened ({error})") from None
        if now != self._identity:
            changed = sorted(key for key in now if now[key] != self._identity[key])
            raise StoreReplacedError(
                f"{self.path} was replaced after it was opened (its {', '.join(changed)} "
                "changed): what was read so far is from the old store. Run again on the new one"
            )
        self._root_seen = stamp

    def _array(self, split: str, block: int, timestep: int, allow_incomplete: bool) -> zarr.Array:
        self._check(split, block, timestep)
        if not allow_incomplete:
            missing = self.missing_chunks(split, block, timestep)
            if missing:
                raise IncompleteStoreError(
                    f"{self.path}: {split} block {block} timestep {timestep} is unfinished: "
                    f"{len(missing)} of {self.num_chunks(split)} sample chunks "
                    f"missing ({format_ranges(missing)})",
                    store=self.location,
                )
        return self._metadata(layout.feature_path(split, block, timestep))

    def _output_size(self, block: int, pool: int | None) -> int:
        info = self.block_info(block)
        if pool is None:
            return info["grid"]
        if not isinstance(pool, (int, np.integer)) or pool < 1:
            raise ConfigError(f"pool must be a positive integer, got {pool!r}")
        if not derivable(info["grid"], info["resolution"], int(pool)):
            raise ConfigError(
                f"pool {pool} cannot be derived exactly from block {block}'s stored {info['grid']}x{info['grid']} "
                f"grid; this store can give pools {self.pools(block)} for it"
            )
        return read_grid(pool, info["resolution"])

    def _check_split(self, split: str) -> None:
        if split not in self.manifest.splits:
            raise NotInStoreError(f"{self.path} has no split {split!r}; it has {self.splits}")

    def _check(self, split: str, block: int, timestep: int) -> None:
        self._check_split(split)
        if not self.has(block, timestep):
            raise NotInStoreError(self._missing_message(block, timestep))

    def _missing_message(self, block: int, timestep: int | None) -> str:
        held = "; ".join(f"block {b}: timesteps {list(self.manifest.features[b].timesteps)}" for b in self.blocks)
        what = f"block {block}" if timestep is None else f"block {block} at timestep {timestep}"
        return f"{self.path} has no {what}; it holds {held or 'nothing yet'}"


def _delayed_chunk(store: FeatureStore, split, block, timestep, chunk, pool, allow_incomplete):
    import dask

    return dask.delayed(store.read_chunk, pure=True)(
        split, block, timestep, chunk, pool, allow_incomplete=allow_incomplete
    )
