"""Where everything lives inside a store (the README's "Store layout" describes the same).

    <store>/zarr.json                        root group; attributes = the recorded settings
    <store>/<split>/labels                   (N,) int64 class index
    <store>/<split>/paths                    (N,) str, image path relative to the data root
    <store>/<split>/files                    (N, 2) uint64: content hash and mtime of each image when it was read
    <store>/<split>/block<B>/t<T>            (N, C, g, g) features of block B at timestep T
    <store>/_progress/<split>/<write set>    (n_shards,) uint8, 1 (2: with digests) once shard k of the set is written
    <store>/_digests/<split>/<write set>     (n_chunks, arrays + 1) uint64 digests of the chunks the set wrote
    <store>/_writer.lease                    object stores only: who is writing (cache.lease)

Arrays are chunked along samples (`chunk_samples` rows, the unit of reading) and, in stores made
since sharding, grouped into shards of `shard_samples` rows (a multiple of `chunk_samples`): one
object per shard holds its chunks and an index of them (zarr's sharding codec), so an array has as
many objects as shards. A shard is the unit of writing and of completion: it is written whole, by
one process, and then flagged. Stores made before sharding have no `shard_samples`: there a shard is
a chunk (`shard_samples(attrs)`), so they read, resume and grow exactly as before.

A *write set* is the group of arrays one extraction computes together; its attribute "arrays" lists
them ("block<B>/t<T>"), and the set is named after them (`write_set_name`). Completing shard k of all
of them is one write (the set's flag k), so a run killed at any moment leaves every shard of a set
either done in all its arrays or in none. A shard of an array is done when any set holding the
array has its flag set. Stores written before write sets keep one flag array per feature array,
`_progress/<split>/block<B>/t<T>`: a set of one.

Augmented views (an extraction with K views): view 0 of a split is the split itself; view v >= 1 is
stored as a split of its own named `<split>@view<v>` (`view_split`), with the same labels, paths and
file records and the same arrays, chunks, write sets and checksums as any split. The root attribute
"views" records which splits have how many views and their augmentations; `FeatureStore.splits`
lists only the splits themselves.

Samples are in sample-index order (the order of `paths`). Arrays of one block share a group so that
`xarray.open_zarr(store, group="<split>/block<B>")` sees every timestep of it as one data set.
"""

from __future__ import annotations

import hashlib
import json
import re

FORMAT = "diffusion-feature-cache/2"
# Format 1 had no digests (`cache.digests`); its stores are read as they are and upgraded when next written.
FORMATS = ("diffusion-feature-cache/1", FORMAT)
PROGRESS = "_progress"
DIGESTS = "_digests"
FLAG_DONE, FLAG_DIGESTS = 1, 2  # a finished shard's flag: without, or with, its digests recorded
LEASE = "_writer.lease"
DIMENSIONS = ("sample", "channel", "y", "x")
FILE_FIELDS = ("blake2b64", "mtime_ns")

# Settings that decide what every stored number is; a store only accepts writes that agree on all.
IDENTITY_KEYS = (
    "kind",
    "model",
    "data",
    "preprocessing",
    "noise_seed",
    "dtype",
    "precision",
    "chunk_samples",
    "shard_samples",
)
# Identity settings that only stores using them record (absent: the store has no augmented views).
OPTIONAL_IDENTITY_KEYS = ("views",)
# A store is valid once its root attributes hold all of these: they are written last, in one write.
# (`shard_samples` is not among them: stores made before sharding have none, and read as unsharded.)
REQUIRED_KEYS = (
    "format",
    *(k for k in IDENTITY_KEYS if k != "shard_samples"),
    "block_table",
    "splits",
    "features",
    "pools",
)

_ARRAY_KEY = re.compile(r"block(\d+)/t(\d+)")
VIEW_MARK = "@view"  # never in a split folder's name (extraction allows letters, digits, '.', '-', '_')
_VIEW_SPLIT = re.compile(r"(.+)@view(\d+)")


def view_split(split: str, view: int) -> str:
    """The stored split of view `view` of `split`: the split itself for view 0, else '<split>@view<v>'."""
    return split if int(view) == 0 else f"{split}{VIEW_MARK}{int(view)}"


def parse_view_split(name: str) -> tuple[str, int]:
    """(split, view) of a stored split name; (name, 0) for a split itself."""
    match = _VIEW_SPLIT.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else (name, 0)


def array_key(block: int, timestep: int) -> str:
    """'block<B>/t<T>': a feature array's path inside its split."""
    return f"block{block}/t{timestep}"


def parse_array_key(key: str) -> tuple[int, int]:
    match = _ARRAY_KEY.fullmatch(key)
    if not match:
        raise ValueError(f"not a feature array key: {key!r}")
    return int(match.group(1)), int(match.group(2))


def block_group(split: str, block: int) -> str:
    return f"{split}/block{block}"


def feature_path(split: str, block: int, timestep: int) -> str:
    return f"{split}/{array_key(block, timestep)}"


def labels_path(split: str) -> str:
    return f"{split}/labels"


def paths_path(split: str) -> str:
    return f"{split}/paths"


def files_path(split: str) -> str:
    return f"{split}/files"


def progress_group(split: str) -> str:
    return f"{PROGRESS}/{split}"


def digests_path(flags_path: str) -> str:
    """The digest record of a write set: "_progress/<split>/<set>" -> "_digests/<split>/<set>"."""
    return DIGESTS + flags_path[len(PROGRESS) :]


def write_set_name(arrays) -> str:
    """'set-<12 hex>': named after its sorted (block, timestep) arrays, so a rerun finds the same set."""
    keys = sorted({(int(b), int(t)) for b, t in arrays})
    digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:12]
    return f"set-{digest}"


def shard_samples(attrs: dict) -> int:
    """Rows per shard: the store's `shard_samples`, or its `chunk_samples` in stores made before sharding."""
    return int(attrs.get("shard_samples") or attrs["chunk_samples"])


def normalised(attrs: dict) -> dict:
    """The settings with every identity key present, as a store made today would record them."""
    return {**attrs, "shard_samples": shard_samples(attrs)} if "chunk_samples" in attrs else dict(attrs)


def num_chunks(num_samples: int, chunk_samples: int) -> int:
    return -(-num_samples // chunk_samples)


def chunk_slice(chunk: int, num_samples: int, chunk_samples: int) -> slice:
    return slice(chunk * chunk_samples, min((chunk + 1) * chunk_samples, num_samples))


def shard_file(array_path: str, shard: int, ndim: int) -> str:
    """The object of shard `shard` of an array, relative to the store (zarr v3's default key encoding;
    in a store without sharding, the object of chunk `shard`)."""
    return f"{array_path}/c/{shard}" + "/0" * (ndim - 1)
