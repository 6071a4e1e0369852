"""The store's manifest: its root attributes parsed and validated once, typed, written from one place, and the
one upgrade of older layouts.

    manifest = Manifest.parse(attrs, where="features.zarr")   # IntegrityError naming the key that is wrong
    manifest.block(24).channels, manifest.features[24].grid, manifest.arrays(), manifest.shape("train", 24)
    manifest.to_attrs()                                      # the stored form; Manifest.parse(it) == manifest

Everything that reads the settings (`reader`, `integrity`, `repair`, `writer`) asks the manifest rather
than indexing the attribute dicts, and the writer builds a new manifest (`Manifest.create`,
`dataclasses.replace`) and stores it with `write_manifest` (never a dict of the schema's keys of its own).
The attributes stay the stored form (`docs/store-format.md` lists every key); `upgrade` is the one
place that knows how earlier formats differ.

`write_manifest` stores the manifest twice: first as a copy in the attributes of the `_progress` group
(`COPY`), then as the root's attributes. The copy is therefore never older than the root; a root
zarr.json that no longer parses is written again from it (`read_copy`, `cache.repair.restore_settings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cache import layout
from cache.errors import REPLACE, Damage, IntegrityError

COPY = f"{layout.PROGRESS}/zarr.json"  # the object whose attribute "manifest" holds the copy


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
    info: Mapping = field(default_factory=dict)  # descriptive attributes, not the identity (e.g. model_source)

    @classmethod
    def create(
        cls,
        settings: Mapping,
        block_table: list[Mapping],
        splits: Mapping[str, int],
        index_digests: Mapping[str, Mapping[str, str]],
        recipe: Mapping | None = None,
        where: str = "the store",
    ) -> Manifest:
        """The manifest of a store just made: `settings` (layout.IDENTITY_KEYS, views where used), no features yet.
        Checked as a stored one is (`parse`), so what is written always parses back."""
        settings = layout.normalised(dict(settings))
        identity = {key: settings.get(key) for key in (*layout.IDENTITY_KEYS, *layout.OPTIONAL_IDENTITY_KEYS)}
        table = {
            int(row["number"]): BlockRow(int(row["number"]), int(row["channels"]), int(row["resolution"]), dict(row))
            for row in block_table
        }
        info = {key: value for key, value in settings.items() if key not in identity}
        draft = cls(
            layout.FORMAT,
            identity,
            int(settings["chunk_samples"]),
            int(settings["shard_samples"]),
            table,
            {name: int(n) for name, n in splits.items()},
            {},
            (),
            dict(index_digests),
            recipe,
            info,
        )
        return cls.parse(draft.to_attrs(), where)

    def to_attrs(self) -> dict:
        """The stored form (root attributes), keys in one order whatever the store's history; JSON only."""
        attrs = {"format": self.format}
        for key in layout.IDENTITY_KEYS:
            attrs[key] = self.identity[key]
        attrs["chunk_samples"], attrs["shard_samples"] = self.chunk_samples, self.shard_samples
        for key in layout.OPTIONAL_IDENTITY_KEYS:  # absent where unused: such a store records them not at all
            if self.identity.get(key) is not None:
                attrs[key] = self.identity[key]
        attrs["block_table"] = [dict(row.row) for row in self.block_table.values()]
        attrs["splits"] = dict(self.splits)
        attrs["features"] = {
            str(b): {"grid": s.grid, "timesteps": list(s.timesteps)} for b, s in sorted(self.features.items())
        }
        attrs["pools"] = list(self.pools)
        attrs["index_digests"] = {split: dict(d) for split, d in self.index_digests.items()}
        if self.recipe is not None:
            attrs["recipe"] = self.recipe
        attrs.update(sorted(self.info.items()))  # in one order whatever order they were recorded in
        return json.loads(json.dumps(attrs))  # plain JSON values: what reading it back gives

    def with_arrays(self, grids: Mapping[int, int], timesteps, pools) -> Manifest:
        """This manifest listing `grids` (block -> grid) at `timesteps` too, and `pools` among its pools."""
        features = dict(self.features)
        for block, grid in grids.items():
            known = features.get(int(block))
            stored = tuple(sorted({*(known.timesteps if known else ()), *(int(t) for t in timesteps)}))
            features[int(block)] = StoredBlock(int(block), int(grid), stored)
        return replace(self, features=features, pools=tuple(sorted({*self.pools, *(int(p) for p in pools)})))

    @classmethod
    def parse(cls, attrs: Mapping, where: str = "the store") -> Manifest:
        """The manifest of a finished store's root attributes (any format: `upgrade`), every field checked."""
        attrs = upgrade(attrs)

        def bad(key: str, why: str) -> IntegrityError:
            return IntegrityError(
                f"{where}/zarr.json, the store's settings, is damaged: {key} {why}",
                store=where,
                remedy=REPLACE,
                damage=[_damage(key, why)],
            )

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
            table[number] = BlockRow(
                number,
                _int(row, "channels", bad, 1, f"block {number} "),
                _int(row, "resolution", bad, 1, f"block {number} "),
                dict(row),
            )
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
        identity["shard_samples"] = shard
        info = {key: value for key, value in attrs.items() if key not in _SCHEMA_KEYS}
        return cls(
            attrs["format"],
            identity,
            chunk,
            shard,
            table,
            dict(splits),
            features,
            tuple(pools),
            dict(attrs.get("index_digests") or {}),
            attrs.get("recipe"),
            info,
        )

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


def unfinished_attrs(recipe: Mapping | None) -> dict:
    """The root attributes of a store being made (or cleared): the format marker, and the recipe that finishes it.
    A store stays unfinished until `write_manifest` gives it a whole manifest."""
    return {"format": layout.FORMAT, **({"recipe": recipe} if recipe is not None else {})}


def write_manifest(group, manifest: Manifest) -> None:
    """Store `manifest` in the open root `group`: the copy first, then the root's attributes (module docstring)."""
    attrs = manifest.to_attrs()
    group.require_group(layout.PROGRESS).attrs.put({"manifest": attrs})
    group.attrs.put(attrs)


def read_copy(location) -> Manifest | None:
    """The copy `write_manifest` keeps (of a `cache.storage.Location`), or None: there is none, or it is damaged."""
    try:
        attrs = json.loads(location.read_text(COPY))["attributes"]["manifest"]
        return Manifest.parse(attrs, str(location))
    except (OSError, ValueError, KeyError, TypeError, IntegrityError):
        return None


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


# Keys the manifest types; any other root attribute is descriptive (`Manifest.info`).
_SCHEMA_KEYS = frozenset(
    {
        "format",
        *layout.IDENTITY_KEYS,
        *layout.OPTIONAL_IDENTITY_KEYS,
        "block_table",
        "splits",
        "features",
        "pools",
        "index_digests",
        "recipe",
    }
)


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
