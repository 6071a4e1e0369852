"""Checking a store's pieces: its settings file, completion flags and chunks (used by the reader and writer).

A chunk is *damaged* when it does not decode (its crc32c checksum fails, or the codec cannot read it),
*missing* when it is marked finished but its file is gone, and *bad* when it is marked finished but
holds non-finite values (the writer never marks such a chunk finished). `find_damage` lists every
such piece: quickly (settings, flags, and that every finished chunk's file exists) or fully (every
finished chunk decoded and checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from cache import layout
from cache.errors import IntegrityError, StoreError

DECODE_ERRORS = (ValueError, RuntimeError, TypeError)  # crc32c mismatch, blosc / zstd / json errors


@dataclass(frozen=True)
class Damage:
    """One damaged or missing piece of a store."""

    path: str  # the array, relative to the store, e.g. "train/block3/t10" or "_progress/train/set-..."
    chunk: int | None  # its sample chunk (None: the array's metadata)
    problem: str  # e.g. "fails its checksum"

    def describe(self, store: str) -> str:
        where = f"{store}/{self.path}" + ("" if self.chunk is None else f" chunk {self.chunk}")
        return f"{where} {self.problem}"


@dataclass(frozen=True)
class WriteSet:
    """A completion flag array: flags[k] == 1 once chunk k of every array in `arrays` is written."""

    path: str  # "_progress/<split>/<name>"
    arrays: frozenset  # {(block, timestep)}
    flags: np.ndarray  # (n_chunks,) uint8; a damaged flag reads as 0


def read_root_attrs(path: str) -> dict:
    """The root attributes of the store at `path`; a missing or damaged settings file is a StoreError naming it."""
    local = "://" not in path
    if local and not (Path(path) / "zarr.json").exists():
        if Path(path).is_dir() and any(Path(path).iterdir()):
            raise StoreError(f"{path} is not a feature store (no zarr.json); choose another path")
        raise StoreError(f"no feature store at {path}: run `pipeline extract --out {path}` first")
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except (ValueError, TypeError, KeyError) as error:  # json that does not parse, or is not zarr's
        raise IntegrityError(f"{path}/zarr.json, the store's settings, is damaged ({error}). The settings are "
                             "lost: re-extract with `pipeline extract ... --overwrite`") from None
    if attrs.get("format") != layout.FORMAT:
        raise StoreError(f"{path} is a Zarr group but not a feature store (no format {layout.FORMAT!r})")
    return attrs


def identity(attrs: dict) -> dict:
    return {key: attrs.get(key) for key in (*layout.IDENTITY_KEYS, *layout.OPTIONAL_IDENTITY_KEYS)}


def decode_error(array: zarr.Array, rows: slice) -> str | None:
    """Why `array[rows]` does not decode, or None when it does."""
    try:
        array[rows]
    except DECODE_ERRORS as error:
        return "fails its checksum" if "checksum" in str(error) else f"cannot be decoded ({error})"
    return None


def chunk_rows(array: zarr.Array, chunk: int) -> slice:
    return slice(chunk * array.chunks[0], min((chunk + 1) * array.chunks[0], array.shape[0]))


def set_arrays(name: str, member: zarr.Array) -> set | None:
    """The (block, timestep) arrays a flag array completes: a write set's attribute, or a legacy per-array path."""
    listed = member.attrs.get("arrays")
    if listed is not None:
        return {layout.parse_array_key(key) for key in listed}
    try:
        return {layout.parse_array_key(name)}
    except ValueError:
        return None


def load_write_sets(group: zarr.Group, split: str, n_chunks: int) -> tuple[list[WriteSet], list[Damage]]:
    """Every write set of a split, damaged flags reading as 0, and the damage found."""
    root = layout.progress_group(split)
    sets, damage = [], []
    try:
        members = group[root].members(max_depth=None)
    except KeyError:
        return [], [Damage(root, None, "is missing: the store's completion flags are gone")]
    for name, member in members:
        if not isinstance(member, zarr.Array):
            continue
        path = f"{root}/{name}"
        arrays = set_arrays(name, member)
        if arrays is None:
            continue
        if member.shape != (n_chunks,):
            damage.append(Damage(path, None, f"has {member.shape[0]} completion flags for {n_chunks} chunks"))
            continue
        try:
            flags = np.asarray(member[:], dtype=np.uint8)
        except DECODE_ERRORS:
            flags = np.zeros(n_chunks, np.uint8)
            for k in range(n_chunks):
                problem = decode_error(member, slice(k, k + 1))
                if problem is None:
                    flags[k] = member[k]
                else:
                    damage.append(Damage(path, k, f"(its completion flag) {problem}"))
        sets.append(WriteSet(path, frozenset(arrays), flags))
    return sets, damage


def done_chunks(sets: list[WriteSet], block: int, timestep: int, n_chunks: int) -> np.ndarray:
    done = np.zeros(n_chunks, bool)
    for write_set in sets:
        if (int(block), int(timestep)) in write_set.arrays:
            done |= write_set.flags.astype(bool)
    return done


def find_damage(path: str, *, full: bool) -> list[Damage]:
    """Every damaged or missing piece of the store at `path` (see the module docstring)."""
    attrs = read_root_attrs(path)
    group = zarr.open_group(path, mode="r")
    chunk_samples = int(attrs["chunk_samples"])
    local = "://" not in path
    damage = []
    table = {row["number"]: row for row in attrs["block_table"]}
    for split, n in attrs["splits"].items():
        n_chunks = layout.num_chunks(int(n), chunk_samples)
        for array_path in (layout.labels_path(split), layout.paths_path(split), layout.files_path(split)):
            array = _metadata(group, array_path, damage, required=array_path != layout.files_path(split))
            if array is None:
                continue
            for k in range(-(-array.shape[0] // array.chunks[0])):
                problem = decode_error(array, chunk_rows(array, k))
                if problem:
                    damage.append(Damage(array_path, k, problem))
        sets, flag_damage = load_write_sets(group, split, n_chunks)
        damage += flag_damage
        for block, entry in attrs["features"].items():
            grid = int(entry["grid"])
            for timestep in entry["timesteps"]:
                array_path = layout.feature_path(split, int(block), int(timestep))
                array = _metadata(group, array_path, damage, required=True)
                if array is None:
                    continue
                expected = (int(n), int(table[int(block)]["channels"]), grid, grid)
                if array.shape != expected:
                    damage.append(Damage(array_path, None, f"is {array.shape}, the settings say {expected}"))
                    continue
                for k in np.flatnonzero(done_chunks(sets, int(block), int(timestep), n_chunks)):
                    problem = chunk_problem(group, path, array_path, array, int(k), full=full, local=local)
                    if problem:
                        damage.append(Damage(array_path, int(k), problem))
    return damage


def chunk_problem(group: zarr.Group, store: str, array_path: str, array: zarr.Array, chunk: int, *, full: bool,
                  local: bool) -> str | None:
    """What is wrong with finished chunk `chunk` of a feature array, or None."""
    file = layout.chunk_file(array_path, chunk, array.ndim)
    if local and not (Path(store) / file).exists():
        return f"is marked finished but missing ({file})"
    if not full:
        return None
    rows = chunk_rows(array, chunk)
    try:
        values = array[rows]
    except DECODE_ERRORS as error:
        problem = "fails its checksum" if "checksum" in str(error) else f"cannot be decoded ({error})"
        return f"{problem} ({file})"
    if not np.isfinite(values).all():
        return f"is marked finished but holds non-finite values ({file})"
    return None


def _metadata(group: zarr.Group, path: str, damage: list, *, required: bool) -> zarr.Array | None:
    try:
        return group[path]
    except KeyError:
        if required:
            damage.append(Damage(path, None, "is missing (the settings list it)"))
    except DECODE_ERRORS as error:
        damage.append(Damage(path, None, f"has a damaged zarr.json ({error})"))
    return None
