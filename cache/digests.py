"""Checksum records: what binds every stored number to its place and to its store (format 2).

zarr's crc32c codec proves a chunk's bytes are the bytes once written, but not that they belong
where they are found: a chunk object that is gone reads as the fill value, and a shard object
copied in from another store of the same layout (another noise seed) decodes without complaint.
So the writer records, for every chunk it writes, a digest of the values,

    digest = blake2b-64(key = binding(settings), data = "<array path>:<chunk>" + values' bytes)

`binding` is a hash of the store's identity settings (`layout.IDENTITY_KEYS`: model, data,
preprocessing, noise seed, dtype, precision, chunking, views): the same values found in another store,
or in another array or chunk of this one, do not match the record. Two stores made with identical
settings share a binding; their features are the same numbers (extraction is deterministic), so a
chunk moved between them is not a wrong result.

Where the records live (`cache.layout`): feature chunks and file records, per write set, in
`_digests/<split>/<set>` ((n_chunks, arrays + 1) uint64, one object per shard, written before the
set's flag, which then reads 2); labels and paths in the root attribute "index_digests". 0 means
"not recorded" (never a digest: `digest` maps it to 1).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from cache import layout


def binding(attrs: dict) -> bytes:
    """The 32-byte key of a store's digests: a hash of its identity settings."""
    attrs = layout.normalised(attrs)
    identity = {key: attrs.get(key) for key in (*layout.IDENTITY_KEYS, *layout.OPTIONAL_IDENTITY_KEYS)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).digest()


def digest(key: bytes, where: str, values) -> int:
    """The digest of `values` (a numeric array, or a sequence of strings, hashed as JSON) stored at `where`,
    under a store's `key`."""
    h = hashlib.blake2b(digest_size=8, key=key)
    h.update(where.encode() + b":")
    if isinstance(values, np.ndarray) and values.dtype.kind not in "UOT":
        h.update(np.ascontiguousarray(values).view(np.uint8).data if values.size else b"")
    else:
        h.update(json.dumps([str(v) for v in values]).encode())
    return int.from_bytes(h.digest(), "little") or 1


def index_digests(key: bytes, split: str, labels, paths) -> dict[str, str]:
    """The root attribute "index_digests"[split]: labels' and paths' digests as hex text (JSON has no uint64)."""
    return {
        "labels": f"{digest(key, layout.labels_path(split), np.asarray(labels, np.int64)):016x}",
        "paths": f"{digest(key, layout.paths_path(split), [str(p) for p in paths]):016x}",
    }


def file_digest(key: bytes, split: str, chunk: int, records: np.ndarray) -> int:
    """Digest of a chunk's file records: their content hashes only (mtimes are refreshed in place)."""
    return digest(key, f"{layout.files_path(split)}/{chunk}", np.asarray(records, np.uint64)[:, 0])


def chunk_digest(key: bytes, array_path: str, chunk: int, values: np.ndarray) -> int:
    return digest(key, f"{array_path}/{chunk}", values)
