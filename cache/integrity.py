"""Checking a store's pieces: its settings file, completion flags and shards (used by the reader and writer).

Completion is recorded per shard (`cache.layout`; in stores without sharding a shard is a chunk). A
shard is *damaged* when one of its chunks does not decode (its crc32c checksum fails, or the codec or
the shard's index cannot be read), *missing* when it is marked finished but its object is gone, and
*bad* when it is marked finished but holds non-finite values (the writer never marks such a shard
finished). `find_damage` lists every such piece: quickly (settings, flags, and that every finished
shard's object exists) or fully (every finished shard decoded and checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from cache import layout
from cache.errors import IntegrityError, StoreError
from cache.storage import Location

DECODE_ERRORS = (ValueError, RuntimeError, TypeError)  # crc32c mismatch, blosc / zstd / json errors


@dataclass(frozen=True)
class Damage:
    """One damaged or missing piece of a store."""

    path: str  # the array, relative to the store, e.g. "train/block3/t10" or "_progress/train/set-..."
    shard: int | None  # its shard: the unit of writing (a chunk in stores without sharding; None: the metadata)
    problem: str  # e.g. "fails its checksum"

    def describe(self, store: str) -> str:
        where = f"{store}/{self.path}" + ("" if self.shard is None else f" shard {self.shard}")
        return f"{where} {self.problem}"


@dataclass(frozen=True)
class WriteSet:
    """A completion flag array: flags[k] == 1 once shard k of every array in `arrays` is written."""

    path: str  # "_progress/<split>/<name>"
    arrays: frozenset  # {(block, timestep)}
    flags: np.ndarray  # (n_shards,) uint8; a damaged flag reads as 0


def read_root_attrs(location: Location | str) -> dict:
    """The root attributes of the store at `location`; a missing or damaged settings file is a StoreError naming it."""
    location = Location.parse(location)
    path = str(location)
    if not location.exists("zarr.json"):
        if set(location.children()) - {layout.LEASE}:
            raise StoreError(f"{path} is not a feature store (no zarr.json); choose another path")
        raise StoreError(f"no feature store at {path}: run `pipeline extract --out {path}` first")
    try:
        attrs = dict(zarr.open_group(location.zarr_store(read_only=True), mode="r").attrs)
    except (ValueError, TypeError, KeyError) as error:  # json that does not parse, or is not zarr's
        raise IntegrityError(f"{path}/zarr.json, the store's settings, is damaged ({error}). The settings are "
                             "lost: re-extract with `pipeline extract ... --overwrite`") from None
    if attrs.get("format") != layout.FORMAT:
        raise StoreError(f"{path} is a Zarr group but not a feature store (no format {layout.FORMAT!r})")
    return attrs


def identity(attrs: dict) -> dict:
    attrs = layout.normalised(attrs)
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


def shard_rows(array: zarr.Array, shard: int, shard_samples: int) -> slice:
    return slice(shard * shard_samples, min((shard + 1) * shard_samples, array.shape[0]))


def load_write_sets(group: zarr.Group, split: str, n_shards: int) -> tuple[list[WriteSet], list[Damage]]:
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
        if member.shape != (n_shards,):
            damage.append(Damage(path, None, f"has {member.shape[0]} completion flags for {n_shards} shards"))
            continue
        try:
            flags = np.asarray(member[:], dtype=np.uint8)
        except DECODE_ERRORS:
            flags = np.zeros(n_shards, np.uint8)
            for k in range(n_shards):
                problem = decode_error(member, slice(k, k + 1))
                if problem is None:
                    flags[k] = member[k]
                else:
                    damage.append(Damage(path, k, f"(its completion flag) {problem}"))
        sets.append(WriteSet(path, frozenset(arrays), flags))
    return sets, damage


def done_shards(sets: list[WriteSet], block: int, timestep: int, n_shards: int) -> np.ndarray:
    done = np.zeros(n_shards, bool)
    for write_set in sets:
        if (int(block), int(timestep)) in write_set.arrays:
            done |= write_set.flags.astype(bool)
    return done


def find_damage(location: Location | str, *, full: bool) -> list[Damage]:
    """Every damaged or missing piece of the store at `location` (see the module docstring)."""
    location = Location.parse(location)
    attrs = read_root_attrs(location)
    group = zarr.open_group(location.zarr_store(read_only=True), mode="r")
    shard_samples = layout.shard_samples(attrs)
    damage = []
    table = {row["number"]: row for row in attrs["block_table"]}
    for split, n in attrs["splits"].items():
        n_shards = layout.num_chunks(int(n), shard_samples)
        for array_path in (layout.labels_path(split), layout.paths_path(split), layout.files_path(split)):
            array = _metadata(group, array_path, damage, required=array_path != layout.files_path(split))
            if array is None:
                continue
            for k in range(-(-array.shape[0] // array.chunks[0])):
                problem = decode_error(array, chunk_rows(array, k))
                if problem:
                    damage.append(Damage(array_path, k, problem))
        sets, flag_damage = load_write_sets(group, split, n_shards)
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
                # One listing per array rather than a request per finished shard (object stores)
                present = None if location.local else location.files_under(f"{array_path}/c")
                for k in np.flatnonzero(done_shards(sets, int(block), int(timestep), n_shards)):
                    problem = shard_problem(location, array_path, array, int(k), shard_samples, full=full,
                                            present=present)
                    if problem:
                        damage.append(Damage(array_path, int(k), problem))
    return damage


def shard_problem(location: Location, array_path: str, array: zarr.Array, shard: int, shard_samples: int, *,
                  full: bool, present: set[str] | None = None) -> str | None:
    """What is wrong with finished shard `shard` of a feature array, or None (`present`: the array's objects,
    listed once, where checking each one is a request)."""
    file = layout.shard_file(array_path, shard, array.ndim)
    if not (file in present if present is not None else location.exists(file)):
        return f"is marked finished but missing ({file})"
    if not full:
        return None
    try:
        values = array[shard_rows(array, shard, shard_samples)]
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
