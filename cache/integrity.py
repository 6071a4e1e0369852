"""Checking a store's pieces: its settings file, completion flags, digests and shards (used by the reader and writer).

Completion is recorded per shard (`cache.layout`; in stores without sharding a shard is a chunk). A
shard is *damaged* when one of its chunks does not decode (its crc32c checksum fails, or the codec or
the shard's index cannot be read), *missing* when it is marked finished but its object is gone, *bad*
when it is marked finished but holds non-finite values (the writer never marks such a shard
finished), and *foreign* when its values do not match the digests recorded for it (`cache.digests`:
another store's shard, another array's, or values edited in place). Labels, paths and file records
are checked the same way: every chunk object present, every digest matching. `find_damage` lists
every such piece: quickly (settings, flags, digest records, and that every finished shard's object
exists) or fully (every finished shard decoded and checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from cache import digests as digests_
from cache import layout
from cache.errors import CREATE, ELSEWHERE, REPAIR, REPLACE, Damage, IncompleteStoreError, IntegrityError, StoreError
from cache.manifest import Manifest, read_copy
from cache.storage import Location

DECODE_ERRORS = (ValueError, RuntimeError, TypeError)  # crc32c mismatch, blosc / zstd / json errors


@dataclass
class WriteSet:
    """A completion flag array: flags[k] == 1 once shard k of every array in `arrays` is written."""

    path: str  # "_progress/<split>/<name>"
    arrays: frozenset  # {(block, timestep)}
    flags: np.ndarray  # (n_shards,) uint8: 0, FLAG_DONE, or FLAG_DIGESTS; a damaged flag reads as 0
    columns: tuple = ()  # the digests' columns: "block<B>/t<T>" of each array, then "files"
    digests: np.ndarray | None = None  # (n_chunks, len(columns)) uint64, 0: not recorded (format 1: None)

    def recorded(self, column: str, chunk: int, shard: int) -> int:
        """The digest this set recorded for `column` at `chunk` (of `shard`), or 0."""
        if self.digests is None or self.flags[shard] != layout.FLAG_DIGESTS or column not in self.columns:
            return 0
        return int(self.digests[chunk, self.columns.index(column)])


def digest_columns(arrays) -> tuple[str, ...]:
    return (*(layout.array_key(b, t) for b, t in sorted(arrays)), "files")


def read_root_attrs(location: Location | str) -> dict:
    """The root attributes of the store at `location`; a missing or damaged settings file is a StoreError naming it."""
    location = Location.parse(location)
    path = str(location)
    if not location.exists("zarr.json"):
        if set(location.children()) - {layout.LEASE}:
            raise StoreError(f"{path} is not a feature store (no zarr.json)", store=location, remedy=ELSEWHERE)
        raise StoreError(f"no feature store at {path}", store=location, remedy=CREATE)
    try:
        attrs = dict(zarr.open_group(location.zarr_store(read_only=True), mode="r").attrs)
    except (ValueError, TypeError, KeyError) as error:  # json that does not parse, or is not zarr's
        raise settings_damaged(location, f"({error})") from None
    if attrs.get("format") not in layout.FORMATS:
        raise StoreError(
            f"{path} is a Zarr group but not a feature store (no format {layout.FORMAT!r})",
            store=location,
            remedy=ELSEWHERE,
        )
    return attrs


def settings_damaged(location: Location, detail: str = "") -> IntegrityError:
    """The error of a root zarr.json that does not parse: repairable from the settings' copy where that is intact
    (`cache.manifest.read_copy`), else the settings are lost."""
    where = f"{location}/zarr.json, the store's settings, is damaged" + (f" {detail}" if detail else "")
    damage = [Damage("zarr.json", None, "is damaged")]
    if read_copy(location) is not None:
        return IntegrityError(
            f"{where}; its copy ({layout.PROGRESS}/zarr.json) is intact", store=location, damage=damage, remedy=REPAIR
        )
    return IntegrityError(f"{where}: the settings are lost", store=location, damage=damage, remedy=REPLACE)


def finished_attrs(location: Location | str) -> dict:
    """`read_root_attrs` of a store that was finished being made (an IncompleteStoreError otherwise)."""
    location = Location.parse(location)
    attrs = read_root_attrs(location)
    missing = [key for key in layout.REQUIRED_KEYS if key not in attrs]
    if missing:
        raise IncompleteStoreError(
            f"{location} was never finished being made: a run stopped while making or "
            f"replacing it (its settings lack {', '.join(missing)})",
            store=location,
        )
    return attrs


def identity(attrs: dict) -> dict:
    attrs = layout.normalised(attrs)
    return {key: attrs.get(key) for key in (*layout.IDENTITY_KEYS, *layout.OPTIONAL_IDENTITY_KEYS)}


def index_problem(location: Location, attrs: dict, split: str, path: str, array: zarr.Array) -> str | None:
    """What is wrong with a split's labels or paths (`path`), or None: every chunk's object present
    (a missing one would read as the fill value), decodable, and matching the recorded digest."""
    if array.shape[0]:
        chunks = -(-array.shape[0] // array.chunks[0])
        gone = [k for k in range(chunks) if not location.exists(f"{path}/c/{k}")]
        if gone:
            return f"chunk(s) {', '.join(map(str, gone))} are missing"
    try:
        values = array[:]
    except DECODE_ERRORS as error:
        return "fails its checksum" if "checksum" in str(error) else f"cannot be decoded ({error})"
    recorded = attrs.get("index_digests", {}).get(split)
    if recorded is not None:
        kind = "labels" if path == layout.labels_path(split) else "paths"
        now = digests_.index_digests(
            digests_.binding(attrs), split, values if kind == "labels" else [], values if kind == "paths" else []
        )
        if now[kind] != recorded.get(kind):
            return "does not match its digest (replaced, edited, or copied from another store)"
    return None


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


def load_write_sets(
    group: zarr.Group, split: str, n_shards: int, chunks_per_shard: int = 1
) -> tuple[list[WriteSet], list[Damage]]:
    """Every write set of a split, damaged flags reading as 0, with its digests, and the damage found
    (a flag that says digests were recorded where they are gone or damaged is damage of the digests)."""
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
        columns, table = _load_digests(group, path, arrays, flags, chunks_per_shard, damage)
        sets.append(WriteSet(path, frozenset(arrays), flags, columns, table))
    return sets, damage


def _load_digests(group, flags_path, arrays, flags, chunks_per_shard, damage) -> tuple[tuple, np.ndarray | None]:
    path = layout.digests_path(flags_path)
    columns = digest_columns(arrays)
    if not (flags == layout.FLAG_DIGESTS).any():
        return columns, None
    try:
        member = group[path]
        table = np.asarray(member[:], dtype=np.uint64)
        if table.shape[1] != len(columns):
            raise ValueError(f"{table.shape[1]} columns for {len(columns)}")
    except (KeyError, *DECODE_ERRORS):
        table = None
    for k in np.flatnonzero(flags == layout.FLAG_DIGESTS):
        rows = slice(int(k) * chunks_per_shard, (int(k) + 1) * chunks_per_shard)
        if table is None or not table[rows].any():  # gone: it would read as 0, "not recorded"
            damage.append(Damage(path, int(k), "(the digests of a finished shard) is missing or damaged"))
            flags[k] = 0
    return columns, table


def done_shards(sets: list[WriteSet], block: int, timestep: int, n_shards: int) -> np.ndarray:
    done = np.zeros(n_shards, bool)
    for write_set in sets:
        if (int(block), int(timestep)) in write_set.arrays:
            done |= write_set.flags.astype(bool)
    return done


def find_damage(location: Location | str, *, full: bool) -> list[Damage]:
    """Every damaged or missing piece of the store at `location` (see the module docstring)."""
    location = Location.parse(location)
    attrs = finished_attrs(location)
    manifest = Manifest.parse(attrs, str(location))
    group = zarr.open_group(location.zarr_store(read_only=True), mode="r")
    shard_samples, per_shard = manifest.shard_samples, manifest.chunks_per_shard
    key = digests_.binding(attrs)
    damage = []
    for split, n in manifest.splits.items():
        n_shards = layout.num_chunks(int(n), shard_samples)
        for array_path in (layout.labels_path(split), layout.paths_path(split)):
            array = _metadata(group, array_path, damage, required=True)
            problem = None if array is None else index_problem(location, attrs, split, array_path, array)
            if problem:
                damage.append(Damage(array_path, None, problem))
        sets, flag_damage = load_write_sets(group, split, n_shards, per_shard)
        damage += flag_damage
        files = _metadata(group, layout.files_path(split), damage, required=False)
        if files is not None:
            damage += files_damage(files, split, sets, key, n_shards, per_shard, manifest.chunk_samples)
        for block, stored in manifest.features.items():
            for timestep in stored.timesteps:
                array_path = layout.feature_path(split, block, timestep)
                array = _metadata(group, array_path, damage, required=True)
                if array is None:
                    continue
                expected = manifest.shape(split, block)
                if array.shape != expected:
                    damage.append(Damage(array_path, None, f"is {array.shape}, the settings say {expected}"))
                    continue
                # One listing per array rather than a request per finished shard
                present = location.files_under(f"{array_path}/c")
                for k in np.flatnonzero(done_shards(sets, int(block), int(timestep), n_shards)):
                    problem = shard_problem(
                        location,
                        array_path,
                        array,
                        int(k),
                        shard_samples,
                        full=full,
                        present=present,
                        expected=expected_digests(sets, (int(block), int(timestep)), int(k), per_shard, key),
                        key=key,
                    )
                    if problem:
                        damage.append(Damage(array_path, int(k), problem))
    return damage


def files_damage(
    files: zarr.Array, split: str, sets: list[WriteSet], key: bytes, n_shards: int, per_shard: int, chunk_samples: int
) -> list[Damage]:
    """File records of finished shards: decodable, and matching the digests recorded with the shard."""
    path = layout.files_path(split)
    try:
        values = files[:]
    except DECODE_ERRORS:
        values = None
    found = []
    for k in range(n_shards):
        rows = slice(k * per_shard * chunk_samples, min((k + 1) * per_shard * chunk_samples, files.shape[0]))
        if values is None and (problem := decode_error(files, rows)):
            found.append(Damage(path, k, problem))
            continue
        shard = values[rows] if values is not None else files[rows]
        for c in range(k * per_shard, min((k + 1) * per_shard, -(-files.shape[0] // chunk_samples))):
            wanted = [d for s in sets if (d := s.recorded("files", c, k))]
            chunk = shard[(c - k * per_shard) * chunk_samples : (c - k * per_shard + 1) * chunk_samples]
            if wanted and any(d != digests_.file_digest(key, split, c, chunk) for d in wanted):
                found.append(Damage(path, k, "does not match its digests (missing, replaced or edited)"))
                break
    return found


def expected_digests(
    sets: list[WriteSet], array: tuple[int, int], shard: int, per_shard: int, key: bytes | None = None
) -> dict[int, set[int]]:
    """chunk -> the digests recorded for it by the sets that finished `shard` of `array` ({} in format 1)."""
    column = layout.array_key(*array)
    found: dict[int, set[int]] = {}
    for write_set in sets:
        if array in write_set.arrays:
            for chunk in range(shard * per_shard, (shard + 1) * per_shard):
                if chunk < (0 if write_set.digests is None else len(write_set.digests)):
                    digest = write_set.recorded(column, chunk, shard)
                    if digest:
                        found.setdefault(chunk, set()).add(digest)
    return found


def digest_mismatch(
    key: bytes, array_path: str, values: np.ndarray, first_chunk: int, chunk_samples: int, expected: dict[int, set[int]]
) -> int | None:
    """The first chunk of `values` (rows from chunk `first_chunk` on) whose digest differs from a recorded one."""
    for i in range(-(-len(values) // chunk_samples)):
        wanted = expected.get(first_chunk + i)
        if wanted:
            part = values[i * chunk_samples : (i + 1) * chunk_samples]
            got = digests_.chunk_digest(key, array_path, first_chunk + i, part)
            if wanted != {got}:
                return first_chunk + i
    return None


def shard_problem(
    location: Location,
    array_path: str,
    array: zarr.Array,
    shard: int,
    shard_samples: int,
    *,
    full: bool,
    present: set[str] | None = None,
    expected: dict[int, set[int]] | None = None,
    key: bytes | None = None,
) -> str | None:
    """What is wrong with finished shard `shard` of a feature array, or None (`present`: the array's objects,
    listed once, where checking each one is a request; `expected`: `expected_digests`, with the store's `key`)."""
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
    if expected and key is not None:
        chunk = digest_mismatch(
            key, array_path, values, shard * shard_samples // array.chunks[0], array.chunks[0], expected
        )
        if chunk is not None:
            return (
                f"does not match its digests at chunk {chunk}: its values were written for another store or "
                f"place, or edited ({file})"
            )
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
