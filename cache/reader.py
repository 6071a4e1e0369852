"""Reading a feature store (read-only: it never writes, locks or repairs anything).

    store = FeatureStore.open("cache/features.zarr")
    store.blocks, store.timesteps, store.splits, store.attrs["noise_seed"]
    x = store.read("train", block=24, timestep=90, pool=2)   # (N, C, 2, 2) float32
    y = store.labels("train")                                 # (N,) int64
    lazy = store.read_dask("train", 24, 90, pool=1)           # same values, chunked by samples
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from cache import layout
from cache.errors import ConfigError, IncompleteStoreError, NotInStoreError, StoreError
from cache.pooling import adaptive_avg_pool, derivable
from cache.text import format_ranges


class FeatureStore:
    def __init__(self, group: zarr.Group, path: str):
        self._group = group
        self.path = path
        self._attrs = dict(group.attrs)

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        text = str(path)
        if "://" not in text and not (Path(text) / "zarr.json").exists():
            raise StoreError(f"no feature store at {text}: run `pipeline extract --out {text}` first")
        group = zarr.open_group(text, mode="r")
        if group.attrs.get("format") != layout.FORMAT:
            raise StoreError(f"{text} is a Zarr group but not a feature store (no format {layout.FORMAT!r})")
        return cls(group, text)

    # -- what the store holds --------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The recorded settings: model, data, preprocessing, noise_seed, dtype, block_table, ..."""
        return json.loads(json.dumps(self._attrs))

    @property
    def splits(self) -> list[str]:
        return list(self._attrs["splits"])

    @property
    def blocks(self) -> list[int]:
        return sorted(int(b) for b in self._attrs["features"])

    @property
    def timesteps(self) -> list[int]:
        return sorted({int(t) for entry in self._attrs["features"].values() for t in entry["timesteps"]})

    @property
    def classes(self) -> list[str]:
        return list(self._attrs["data"].get("classes", []))

    @property
    def chunk_samples(self) -> int:
        """Samples per stored chunk: every array of the store is chunked along samples by this."""
        return int(self._attrs["chunk_samples"])

    @property
    def extracted_pools(self) -> list[int]:
        """The pools the extraction was asked to make readable (a probe's default)."""
        return [int(p) for p in self._attrs.get("pools", [])]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the recorded settings: two stores with equal fingerprints hold the same features."""
        return hashlib.sha256(json.dumps(self._attrs, sort_keys=True).encode()).hexdigest()

    def has(self, block: int, timestep: int) -> bool:
        entry = self._attrs["features"].get(str(block))
        return entry is not None and int(timestep) in entry["timesteps"]

    def block_info(self, block: int) -> dict:
        """The block's row of the model's table plus the stored `grid`."""
        rows = {row["number"]: row for row in self._attrs["block_table"]}
        if str(block) not in self._attrs["features"]:
            raise NotInStoreError(self._missing_message(block, None))
        return {**rows[int(block)], "grid": int(self._attrs["features"][str(block)]["grid"])}

    def pools(self, block: int) -> list[int]:
        """Every pool size that can be read exactly for this block."""
        info = self.block_info(block)
        return [p for p in range(1, info["resolution"] + 1) if derivable(info["grid"], info["resolution"], p)]

    def num_samples(self, split: str) -> int:
        self._check_split(split)
        return int(self._attrs["splits"][split])

    def num_chunks(self, split: str) -> int:
        return layout.num_chunks(self.num_samples(split), self.chunk_samples)

    def chunk_rows(self, split: str, chunk: int) -> slice:
        """The sample rows of chunk `chunk` of `split`."""
        return layout.chunk_slice(chunk, self.num_samples(split), self.chunk_samples)

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        return np.asarray(self._group[f"{split}/labels"][:], dtype=np.int64)

    def paths(self, split: str) -> list[str]:
        self._check_split(split)
        return [str(p) for p in self._group[f"{split}/paths"][:]]

    # -- completeness ----------------------------------------------------------------------------
    @staticmethod
    def progress_of(group: zarr.Group, split: str, block: int, timestep: int) -> np.ndarray:
        return np.asarray(group[layout.progress_path(split, block, timestep)][:])

    def missing_chunks(self, split: str, block: int, timestep: int) -> list[int]:
        self._check(split, block, timestep)
        return [int(k) for k in np.flatnonzero(self.progress_of(self._group, split, block, timestep) == 0)]

    def missing(self) -> dict[tuple[str, int, int], list[int]]:
        """Every array with unfinished sample chunks: (split, block, timestep) -> chunk indices."""
        result = {}
        for split in self.splits:
            for block in self.blocks:
                for timestep in self._attrs["features"][str(block)]["timesteps"]:
                    chunks = self.missing_chunks(split, block, timestep)
                    if chunks:
                        result[(split, block, int(timestep))] = chunks
        return result

    def finished_mask(self, split: str, block: int, timestep: int) -> np.ndarray:
        """(N,) bool: True where the sample's chunk is finished."""
        self._check(split, block, timestep)
        done = self.progress_of(self._group, split, block, timestep).astype(bool)
        return np.repeat(done, self.chunk_samples)[: self.num_samples(split)]

    # -- features --------------------------------------------------------------------------------
    def read(
        self, split: str, block: int, timestep: int, pool: int | None = None, *, allow_incomplete: bool = False
    ) -> np.ndarray:
        """(N, C, p, p) float32 features (p = pool, or the stored grid when pool is None).

        Unfinished chunks are an IncompleteStoreError; with `allow_incomplete` they read as NaN
        (see `finished_mask`).
        """
        array = self._array(split, block, timestep, allow_incomplete)
        return adaptive_avg_pool(array[:], self._output_size(block, pool))

    def read_chunk(
        self, split: str, block: int, timestep: int, chunk: int, pool: int | None = None, *,
        allow_incomplete: bool = False,
    ) -> np.ndarray:
        """The rows of one sample chunk (`chunk_rows`), as `read` gives them: (n, C, p, p) float32."""
        array = self._array(split, block, timestep, allow_incomplete)
        return adaptive_avg_pool(array[self.chunk_rows(split, chunk)], self._output_size(block, pool))

    def read_dask(
        self, split: str, block: int, timestep: int, pool: int | None = None, *, allow_incomplete: bool = False
    ):
        """The same as `read`, as a dask array chunked along samples like the store (lazy, bounded memory)."""
        import dask.array as da

        array = self._array(split, block, timestep, allow_incomplete)
        lazy = da.from_zarr(array)
        size = self._output_size(block, pool)
        return lazy.map_blocks(
            lambda chunk: adaptive_avg_pool(chunk, size),
            dtype=np.float32,
            chunks=(lazy.chunks[0], lazy.chunks[1], (size,), (size,)),
        )

    def _array(self, split: str, block: int, timestep: int, allow_incomplete: bool) -> zarr.Array:
        self._check(split, block, timestep)
        if not allow_incomplete:
            missing = self.missing_chunks(split, block, timestep)
            if missing:
                raise IncompleteStoreError(
                    f"{self.path}: {split} block {block} timestep {timestep} is unfinished: "
                    f"{len(missing)} of {len(self.progress_of(self._group, split, block, timestep))} sample chunks "
                    f"missing ({format_ranges(missing)}). Re-run the extraction to finish it, or allow incomplete reads."
                )
        return self._group[layout.feature_path(split, block, timestep)]

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
        return min(int(pool), info["resolution"])

    def _check_split(self, split: str) -> None:
        if split not in self._attrs["splits"]:
            raise NotInStoreError(f"{self.path} has no split {split!r}; it has {self.splits}")

    def _check(self, split: str, block: int, timestep: int) -> None:
        self._check_split(split)
        if not self.has(block, timestep):
            raise NotInStoreError(self._missing_message(block, timestep))

    def _missing_message(self, block: int, timestep: int | None) -> str:
        held = "; ".join(
            f"block {b}: timesteps {self._attrs['features'][str(b)]['timesteps']}" for b in self.blocks
        )
        what = f"block {block}" if timestep is None else f"block {block} at timestep {timestep}"
        return f"{self.path} has no {what}; it holds {held or 'nothing yet'}"

