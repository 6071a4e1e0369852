"""What a request reads from a store, resolved once against its manifest: `select` -> `Selection`.

    selection = store.select(blocks=[24], timesteps=None, pools=[1, 2], split="train", view=1)
    selection.stored_split            # "train" for view 0; the split that holds view 1 of train otherwise
    for item in selection.inputs:     # InputSet: one (block, timestep) read at one pool
        item.block, item.timestep, item.pool, item.grid, item.width, selection.path(item)

Every analysis (probe, sweep, CKA, similarity) asks here which arrays it reads, at which grid, from
which stored split; none of them looks into the manifest or the layout's names itself.

- `blocks` None: every block the store holds; `timesteps` None: every timestep each block holds;
  `pools` None: the pools the extraction was asked for (1 where it recorded none).
- A pool reads the block at `grid = cache.pooling.read_grid(pool, resolution)`: a pool at or above
  the block's resolution means its full resolution, so several pools above it read the same grid
  and stay separate inputs, each under the pool that was asked. With `full_above=False` a pool above
  the resolution is not offered (a request that labels features by pool, like CKA's, asks only for
  sizes the block has).
- A pool must be derivable exactly from the stored grid (`cache.pooling.derivable`).
- `view` v of `split` is looked up here (`layout.view_split`), never spelt by a caller.

What the store lacks is a `SelectionError` whose `problems` name each piece (`Unavailable`: what was
asked, what the store holds instead); with `partial=True` the selection of what is there comes back
with the same `problems` for the caller to report in its own words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cache import layout
from cache.errors import ConfigError, NotInStoreError
from cache.manifest import Manifest
from cache.pooling import derivable, read_grid


@dataclass(frozen=True)
class InputSet:
    """One stored array, (block, timestep), read at one pool: (N, channels, grid, grid) float32."""

    block: int
    timestep: int
    pool: int  # as asked
    grid: int  # the side read: `read_grid(pool, resolution)`
    channels: int
    stored_grid: int  # the side stored (the read grid is pooled from it)
    resolution: int  # the block's full resolution

    @property
    def width(self) -> int:
        """Features per sample: channels x grid^2."""
        return self.channels * self.grid * self.grid

    @property
    def array(self) -> tuple[int, int]:
        return self.block, self.timestep


@dataclass(frozen=True)
class Unavailable:
    """One piece of a request the store cannot give."""

    kind: str  # "split", "view", "block", "timestep" or "pool"
    asked: tuple  # what was asked and is not there (split names, view numbers, blocks, timesteps, one pool)
    held: tuple  # what the store has in its place (splits, views, blocks, the block's timesteps or readable pools)
    block: int | None = None  # the block a timestep or pool was asked of
    grid: int | None = None  # the block's stored grid (pool problems)
    split: str | None = None  # the split a view was asked of

    def describe(self) -> str:
        asked = ", ".join(map(str, self.asked))
        if self.kind == "split":
            return f"it has no split {self.asked[0]!r} (its splits: {', '.join(self.held)})"
        if self.kind == "view":
            return (
                f"it holds {len(self.held)} view(s) of {self.split!r} (0 to {len(self.held) - 1}), not view "
                f"{self.asked[0]!r}"
            )
        if self.kind == "block":
            return f"block(s) {asked} not stored"
        if self.kind == "timestep":
            return f"block {self.block} has no timestep(s) {asked}"
        return (
            f"block {self.block} cannot be read at pool {asked} (stored {self.grid}x{self.grid}: pools "
            f"{list(self.held)})"
        )


class SelectionError(NotInStoreError):
    """The store lacks part of a request; `problems` lists each piece (`Unavailable`)."""

    def __init__(self, message: str, *, problems: tuple[Unavailable, ...], store=None):
        super().__init__(message, store=store)
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Selection:
    """A request resolved against one store: the arrays it reads and each input set, in request order
    (pool, then block, then timestep, as asked or as the store lists them)."""

    store: str
    split: str | None  # as asked (None: no split was asked for)
    view: int
    stored_split: str | None  # the stored split holding view `view` of `split`
    views: int  # how many views of `split` the store holds (1 where no split was asked for)
    pools: tuple[int, ...]
    arrays: tuple[tuple[int, int], ...]  # every (block, timestep) asked for that the store holds
    inputs: tuple[InputSet, ...]  # every array at every pool it can be read at
    grids: Mapping[tuple[int, int], int]  # (block, pool) -> the side it reads, for every stored block asked
    problems: tuple[Unavailable, ...] = ()  # empty unless selected with `partial=True`

    @property
    def blocks(self) -> list[int]:
        return list(dict.fromkeys(b for b, _ in self.arrays))

    def at(self, pool: int) -> list[InputSet]:
        return [item for item in self.inputs if item.pool == pool]

    def path(self, item: InputSet) -> str:
        """The item's array in the store, relative to its root (of the selected split and view)."""
        return layout.feature_path(self.stored_split, item.block, item.timestep)


def readable_pools(manifest: Manifest, block: int) -> list[int]:
    """Every pool up to the block's resolution that can be read exactly from what is stored."""
    resolution, grid = manifest.block(block).resolution, manifest.features[int(block)].grid
    return [p for p in range(1, resolution + 1) if derivable(grid, resolution, p)]


def stored_views(manifest: Manifest, split: str) -> int:
    """How many views of `split` the store holds: 1, or K in a store extracted with K views."""
    stored = [layout.parse_view_split(name) for name in manifest.splits]
    return 1 + sum(1 for base, view in stored if base == split and view > 0)


def base_splits(manifest: Manifest) -> list[str]:
    """The data set's splits (a split's augmented views are not splits of their own)."""
    return [name for name in manifest.splits if layout.parse_view_split(name)[1] == 0]


def select(
    manifest: Manifest,
    where: str,
    *,
    blocks=None,
    timesteps=None,
    pools=None,
    split: str | None = None,
    view: int = 0,
    full_above: bool = True,
    partial: bool = False,
    store=None,
) -> Selection:
    """The request resolved against `manifest` (module docstring); `where` names the store in messages,
    `store` is what a `SelectionError` carries (its `Location`)."""
    problems = []
    stored_split, views = None, 1
    if split is None and view != 0:
        raise ConfigError(f"view {view!r} of which split? A view is asked of a split")
    if split is not None:
        if split not in base_splits(manifest):
            problems.append(Unavailable("split", (split,), tuple(base_splits(manifest))))
        else:
            views = stored_views(manifest, split)
            if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < views:
                problems.append(Unavailable("view", (view,), tuple(range(views)), split=split))
            else:
                stored_split = layout.view_split(split, view)
    held = sorted(manifest.features)
    asked_blocks = list(held if blocks is None else blocks)
    unknown = [b for b in asked_blocks if b not in manifest.features]
    if unknown:
        problems.append(Unavailable("block", tuple(unknown), tuple(held)))
    asked_blocks = [b for b in asked_blocks if b in manifest.features]
    arrays = []
    for b in asked_blocks:
        stored = sorted(manifest.features[b].timesteps)
        wanted = stored if timesteps is None else list(timesteps)
        missing = [t for t in wanted if t not in stored]
        if missing:
            problems.append(Unavailable("timestep", tuple(missing), tuple(stored), block=b))
        arrays += [(b, t) for t in wanted if t in stored]
    pools = list(pools if pools is not None else (manifest.pools or (1,)))
    bad = [p for p in pools if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1]
    if bad:
        raise ConfigError(f"pools must be positive integers, got {bad[0]!r}")
    pools = [int(p) for p in pools]
    grids, readable = {}, set()
    for b in asked_blocks:
        row, stored = manifest.block(b), manifest.features[b].grid
        for p in pools:
            grids[(b, p)] = read_grid(p, row.resolution)
            if derivable(stored, row.resolution, p) and (full_above or p <= row.resolution):
                readable.add((b, p))
            else:
                problems.append(Unavailable("pool", (p,), tuple(readable_pools(manifest, b)), block=b, grid=stored))
    inputs = [
        InputSet(
            b, t, p, grids[(b, p)], manifest.block(b).channels, manifest.features[b].grid, manifest.block(b).resolution
        )
        for p in pools
        for b, t in arrays
        if (b, p) in readable
    ]
    selection = Selection(
        where,
        split,
        int(view) if stored_split is not None else 0,
        stored_split,
        views,
        tuple(pools),
        tuple(arrays),
        tuple(inputs),
        grids,
        tuple(problems) if partial else (),
    )
    if problems and not partial:
        raise SelectionError(
            f"{where} cannot serve this request: " + "; ".join(p.describe() for p in problems),
            problems=tuple(problems),
            store=store if store is not None else where,
        )
    return selection


def describe_holdings(manifest: Manifest, where: str) -> str:
    """What the store holds, block by block: timesteps, readable pools, channels, resolution (for messages)."""
    lines = [f"{where} holds:"]
    for b in sorted(manifest.features):
        row = manifest.block(b)
        lines.append(
            f"  block {b}: timesteps {sorted(manifest.features[b].timesteps)}, pools "
            f"{readable_pools(manifest, b)} ({row.channels} channels, {row.resolution}x{row.resolution})"
        )
    return "\n".join(lines if manifest.features else [f"{where} holds no features yet"])
