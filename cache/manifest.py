"""The store's manifest: its root attributes parsed and validated once, typed, and the one upgrade of older layouts.

    manifest = Manifest.parse(attrs, where="features.zarr")   # IntegrityError naming the key that is wrong
    manifest.block(24).channels, manifest.features[24].grid, manifest.arrays(), manifest.shape("train", 24)

Everything that reads the settings (`reader`, `integrity`, `repair`, `writer`) asks the manifest rather
than indexing the attribute dicts. The attributes stay the stored form (`docs/store-format.md`
lists every key); `upgrade` is the one place that knows how earlier formats differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cache import layout
from cache.errors import REPLACE, Damage, IntegrityError


@dataclass(frozen=True)
class BlockRow:
    """One row of the model's block table, as the store records it (`row` keeps every recorded field)."""

    number: int
    channels: int
    resolution: int
    row: Mapping


@dataclass(frozen=True)
class StoredBlock:
    """A block the store holds: pooled to `grid` x `grid`, at these timesteps."""

    number: int
    grid: int
    timesteps: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    format: str
    identity: Mapping  # layout.IDENTITY_KEYS (and views where recorded), shard_samples normalised
    chunk_samples: int
    shard_samples: int
    block_table: Mapping[int, BlockRow]
    splits: Mapping[str, int]  # stored splits (views included) -> samples
    features: Mapping[int, StoredBlock]
    pools: tuple[int, ...]
    index_digests: Mapping[str, Mapping[str, str]]
    recipe: Mapping | None

    @classmethod
    def parse(cls, attrs: Mapping, where: str = "the store") -> Manifest:
        """The manifest of a finished store's root attributes (any format: `upgrade`), every field checked."""
        attrs = upgrade(attrs)

        def bad(key: str, why: str) -> IntegrityError:
            return IntegrityError(f"{where}/zarr.json, the store's settings, is damaged: {key} {why}",
                                  store=where, remedy=REPLACE, damage=[_damage(key, why)])

        missing = [key for key in layout.REQUIRED_KEYS if key not in attrs]
        if missing:
            raise bad(", ".join(missing), "missing")
        chunk, shard = _int(attrs, "chunk_samples", bad, 1), _int(attrs, "shard_samples", bad, 1)
        if shard % chunk:
            raise bad("shard_samples", f"{shard} is not a multiple of chunk_samples {chunk}")
        table = {}
        for row in _list(attrs, "block_table", bad):
            if not isinstance(row, Mapping):
                raise bad("block_table", f"holds {row!r}, not a row")
            number = _int(row, "number", bad, 0, "block_table row ")
            table[number] = BlockRow(number, _int(row, "channels", bad, 1, f"block {number} "),
                                     _int(row, "resolution", bad, 1, f"block {number} "), dict(row))
        splits = attrs["splits"]
        if not isinstance(splits, Mapping) or not all(isinstance(n, int) and n >= 0 for n in splits.values()):
            raise bad("splits", f"is {splits!r}, not split -> sample count")
        features = {}
        if not isinstance(attrs["features"], Mapping):
            raise bad("features", "is not a mapping of blocks")
        for key, entry in attrs["features"].items():
            if not str(key).isdigit() or int(key) not in table or not isinstance(entry, Mapping):
                raise bad("features", f"lists block {key!r}, which the block table has not")
            grid = _int(entry, "grid", bad, 1, f"features.{key}.")
            timesteps = entry.get("timesteps")
            if not isinstance(timesteps, list) or not all(isinstance(t, int) and t >= 0 for t in timesteps):
                raise bad(f"features.{key}.timesteps", f"is {timesteps!r}")
            features[int(key)] = StoredBlock(int(key), grid, tuple(timesteps))
        pools = _list(attrs, "pools", bad)
        if not all(isinstance(p, int) and p >= 1 for p in pools):
            raise bad("pools", f"is {pools!r}")
        identity = {key: attrs.get(key) for key in (*layout.IDENTITY_KEYS, *layout.OPTIONAL_IDENTITY_KEYS)}
        return cls(attrs["format"], identity, chunk, shard, table,
                   dict(splits), features, tuple(pools),
                   dict(attrs.get("index_digests") or {}), attrs.get("recipe"))

    # -- what it says --------------------------------------------------------------------------------------
    def block(self, number: int) -> BlockRow:
        return self.block_table[int(number)]

    def arrays(self) -> list[tuple[int, int]]:
        """Every (block, timestep) the store lists, by block then timestep as recorded."""
        return [(b, t) for b in sorted(self.features) for t in self.features[b].timesteps]

    def shape(self, split: str, block: int) -> tuple[int, int, int, int]:
        """(N, C, g, g) of the feature arrays of `block` in `split`."""
        grid = self.features[int(block)].grid
        return (int(self.splits[split]), self.block(block).channels, grid, grid)

    def num_shards(self, split: str) -> int:
        return layout.num_chunks(int(self.splits[split]), self.shard_samples)

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_samples // self.chunk_samples


def upgrade(attrs: Mapping) -> dict:
    """Root attributes of any earlier layout as format 2 reads them (in memory; the writer records the
    upgrade when it next writes the store, `cache.repair.reopen`).

    - before sharding: no `shard_samples`; a shard is a chunk.
    - format 1 (`diffusion-feature-cache/1`): no digests (flags are 1, never 2), no `index_digests`,
      no `recipe`; everything else as in format 2.
    """
    attrs = layout.normalised(dict(attrs))
    if attrs.get("format") in layout.FORMATS:
        attrs.setdefault("index_digests", {})
        attrs.setdefault("recipe", None)
    return attrs


def _damage(key: str, why: str) -> Damage:
    return Damage("zarr.json", None, f"{key} {why}")


def _int(mapping: Mapping, key: str, bad, minimum: int, prefix: str = "") -> int:
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(f"{prefix}{key}", f"is {value!r}, not an integer >= {minimum}")
    return value


def _list(mapping: Mapping, key: str, bad) -> list:
    value = mapping.get(key)
    if not isinstance(value, list):
        raise bad(key, f"is {value!r}, not a list")
    return value
