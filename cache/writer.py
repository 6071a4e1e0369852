"""Writing a feature store: created once, then filled chunk by chunk, resumable and single-writer.

Completion is recorded per (array, sample chunk) in `_progress/...` only after the chunk's data is
written, and local writes are atomic renames, so a process killed at any moment leaves a store whose
finished chunks are whole and whose unfinished chunks are simply not marked done.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from cache import layout
from cache.errors import StoreError, StoreLockedError, StoreMismatchError
from cache.reader import FeatureStore

COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


@dataclass(frozen=True)
class SplitIndex:
    """What a split holds, in sample-index order."""

    labels: np.ndarray  # (N,) int64
    paths: list[str]  # (N,) paths relative to the data root

    def __post_init__(self):
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} paths")


def _describe_difference(key: str, stored, wanted, prefix: str = "") -> list[str]:
    name = f"{prefix}{key}"
    if isinstance(stored, dict) and isinstance(wanted, dict):
        lines = []
        for sub in sorted(set(stored) | set(wanted)):
            lines += _describe_difference(sub, stored.get(sub), wanted.get(sub), f"{name}.")
        return lines
    if stored == wanted:
        return []
    short = lambda value: (text if len(text := json.dumps(value, default=str)) <= 80 else text[:77] + "...")  # noqa: E731
    return [f"{name}: the store has {short(stored)}, this run asks for {short(wanted)}"]


def _differences(existing: dict, settings: dict, grids: dict[int, int]) -> list[str]:
    lines = []
    for key in layout.IDENTITY_KEYS:
        lines += _describe_difference(key, existing.get(key), settings[key])
    for block, grid in sorted(grids.items()):
        stored = existing.get("features", {}).get(str(block))
        if stored is not None and stored["grid"] != grid:
            lines.append(
                f"block {block}: the store has it pooled to {stored['grid']}x{stored['grid']}, this run needs "
                f"{grid}x{grid} (ask only for pools that divide {stored['grid']})"
            )
    return lines


class FeatureStoreWriter:
    """The one process allowed to write a store; use as a context manager (it holds a lock)."""

    def __init__(self, path: str | Path, group: zarr.Group, lock_fd: int | None):
        self.path = str(path)
        self._group = group
        self._lock_fd = lock_fd
        self._attrs = dict(group.attrs)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        settings: dict,
        splits: dict[str, SplitIndex],
        block_table: list[dict],
        grids: dict[int, int] | None = None,
        overwrite: bool = False,
    ) -> FeatureStoreWriter:
        """Create the store, or reopen one made with the same `settings` (keys in layout.IDENTITY_KEYS).

        `grids` (block -> stored grid) are the grids this run will write; a block already stored at
        another grid is a difference too. A store that differs is refused with the differences
        named, or, with `overwrite`, replaced. A store that agrees is reopened either way, so
        finished chunks are kept and only what is missing gets computed.
        """
        missing = [key for key in layout.IDENTITY_KEYS if key not in settings]
        if missing:
            raise ValueError(f"settings lack {missing}")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory)
        try:
            existing = _existing_attrs(directory)
            differences = [] if existing is None else _differences(existing, settings, grids or {})
            if existing is not None and not differences:
                group = zarr.open_group(directory, mode="r+")
                _remove_partial_writes(directory)
            elif existing is None or overwrite:
                _clear(directory)
                group = _create(directory, settings, splits, block_table)
            else:
                raise StoreMismatchError(
                    f"{directory} was made with other settings:\n  "
                    + "\n  ".join(differences)
                    + "\nUse another --out, or --overwrite to replace the store."
                )
            return cls(directory, group, lock_fd)
        except BaseException:
            _unlock(lock_fd)
            raise

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        _unlock(self._lock_fd)
        self._lock_fd = None

    # -- planning --------------------------------------------------------------------------------
    @property
    def chunk_samples(self) -> int:
        return int(self._attrs["chunk_samples"])

    def num_samples(self, split: str) -> int:
        return int(self._attrs["splits"][split])

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
        for block, grid in features.items():
            channels = table[block]["channels"]
            entry = contents.setdefault(str(block), {"grid": grid, "timesteps": []})
            for timestep in timesteps:
                for split in self._attrs["splits"]:
                    self._ensure_array(split, block, timestep, channels, grid, dtype)
                if timestep not in entry["timesteps"]:
                    entry["timesteps"] = sorted([*entry["timesteps"], timestep])
        # Arrays first, then the attributes that list them: a crash in between leaves unlisted
        # (and unmarked) arrays that the next run adopts.
        self._update_attrs(
            features=contents,
            pools=sorted(set(self._attrs.get("pools", [])) | {int(p) for p in pools}),
        )

    def _ensure_array(self, split: str, block: int, timestep: int, channels: int, grid: int, dtype: str) -> None:
        n = self.num_samples(split)
        name = layout.feature_path(split, block, timestep)
        shape = (n, channels, grid, grid)
        if name in self._group:
            if self._group[name].shape != shape:
                raise StoreError(f"{self.path}/{name} has shape {self._group[name].shape}, expected {shape}")
            return
        self._group.create_array(
            name,
            shape=shape,
            chunks=(self.chunk_samples, channels, grid, grid),
            dtype=dtype,
            fill_value=np.nan,  # unfinished samples read as NaN, never as plausible zeros
            compressors=COMPRESSOR,
            dimension_names=layout.DIMENSIONS,
        )
        self._group.create_array(
            layout.progress_path(split, block, timestep),
            shape=(layout.num_chunks(n, self.chunk_samples),),
            chunks=(1,),
            dtype="uint8",
            fill_value=0,
            dimension_names=("chunk",),
        )

    def update_info(self, **info) -> None:
        """Record descriptive attributes (not part of the identity), e.g. where the model came from."""
        self._update_attrs(**info)

    def _update_attrs(self, **changes) -> None:
        self._attrs.update(changes)
        self._group.attrs.update(changes)

    # -- writing ---------------------------------------------------------------------------------
    def pending_chunks(self, split: str, block: int, timestep: int) -> list[int]:
        """Sample chunks of this array not yet marked done."""
        done = FeatureStore.progress_of(self._group, split, block, timestep)
        return [int(k) for k in np.flatnonzero(done == 0)]

    def write_chunk(self, split: str, chunk: int, features: dict[tuple[int, int], np.ndarray]) -> None:
        """Write sample chunk `chunk` of several arrays, keyed (block, timestep), then mark each done."""
        rows = layout.chunk_slice(chunk, self.num_samples(split), self.chunk_samples)
        for (block, timestep), values in features.items():
            array = self._group[layout.feature_path(split, block, timestep)]
            if values.shape[0] != rows.stop - rows.start:
                raise ValueError(f"chunk {chunk} of {split} holds {rows.stop - rows.start} samples, got {values.shape[0]}")
            array[rows] = values.astype(array.dtype, copy=False)
        for block, timestep in features:
            self._group[layout.progress_path(split, block, timestep)][chunk] = 1


# -- helpers ---------------------------------------------------------------------------------------
def _lock(directory: Path) -> int:
    # flock on the store directory itself: no stray lock file in the hierarchy, released by the OS
    # when the holder dies (kill -9 included).
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            f"{directory} is being written by another process; wait for it to finish or write to another --out"
        ) from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _existing_attrs(directory: Path) -> dict | None:
    if not any(directory.iterdir()):
        return None
    try:
        attrs = dict(zarr.open_group(directory, mode="r").attrs)
    except Exception as error:
        raise StoreError(f"{directory} exists and is not a feature store ({error}); choose another --out") from error
    if attrs.get("format") != layout.FORMAT:
        raise StoreError(f"{directory} is a Zarr group but not a feature store; choose another --out")
    return attrs


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _remove_partial_writes(directory: Path) -> None:
    # An atomic write killed before its rename leaves "<key>.<uuid>.partial"; the key itself is intact.
    for leftover in directory.rglob("*.partial"):
        leftover.unlink()


def _create(directory: Path, settings: dict, splits: dict[str, SplitIndex], block_table: list[dict]) -> zarr.Group:
    if not splits:
        raise ValueError("a store needs at least one split")
    attrs = {
        "format": layout.FORMAT,
        **settings,
        "block_table": block_table,
        "splits": {name: len(index.paths) for name, index in splits.items()},
        "features": {},
        "pools": [],
    }
    group = zarr.open_group(directory, mode="w-", attributes=attrs)
    for name, index in splits.items():
        n = len(index.paths)
        chunk = max(1, min(n, 65536))
        group.create_array(f"{name}/labels", shape=(n,), chunks=(chunk,), dtype="int64", dimension_names=("sample",))
        group[f"{name}/labels"][:] = np.asarray(index.labels, dtype=np.int64)
        group.create_array(f"{name}/paths", shape=(n,), chunks=(chunk,), dtype=str, dimension_names=("sample",))
        group[f"{name}/paths"][:] = np.asarray(index.paths, dtype=str)
    return group

