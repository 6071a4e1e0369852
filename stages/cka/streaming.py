"""Streaming the features of many (store, block, timestep, pool) arrays through the CKA estimators.

`Reader` walks the selected samples of a split in windows of consecutive rows, reading each store's
chunks with `FeatureStore.read_chunk` (every chunk checked as it is decoded), one chunk per array
at a time, so stores chunked differently still line up row for row. The estimators then see:

- `linear_and_debiased`: every pair's feature-space sums (`CrossMoments`), float64. The pairs are
  tiled: features are grouped so that one tile's (sum p_a) x (sum p_b) matrix fits the memory
  budget, and each pass over the data fills one tile (one pass when everything fits). N is never
  limited by memory.
- `minibatch`: fixed minibatches (`minibatches`, a seeded function of sample index); the samples of
  as many minibatches as fit the budget are read in one pass, then each minibatch's Gram matrices.
- `rbf`: every feature's N x N Gram matrix, which must fit the budget (refused otherwise, with the
  `--samples` that would fit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cache.errors import UserError
from cache.reader import FeatureStore
from cache.text import format_bytes
from stages.cka.estimators import (
    CrossMoments,
    centre_gram,
    gram_cka_matrix,
    linear_grams,
    normalise,
    rbf_gram,
    unbiased_hsic_matrix,
)
from stages.progress import progress_bar

log = logging.getLogger(__name__)


class CkaInputError(UserError, ValueError):
    """The request does not fit the stores or the memory (the message says what would)."""


@dataclass(frozen=True)
class Feature:
    """One side of a pair: an array of a store, read at a pool. `width` = channels x pool^2."""

    store: str  # the store's name (as given on the command line)
    block: int
    timestep: int
    pool: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.store} b{self.block} t{self.timestep} p{self.pool}"


class Reader:
    """Rows of a split of several stores, feature by feature, in windows of consecutive samples."""

    def __init__(self, stores: dict[str, FeatureStore], split: str, *, threads: int = 4, progress: bool = True):
        self.stores, self.split, self.threads, self.progress = stores, split, max(1, threads), progress
        self.window = max(store.chunk_samples for store in stores.values())

    def stream(self, features: Sequence[Feature], rows: np.ndarray, *, desc: str) -> Iterator[list[np.ndarray]]:
        """Per window of the selected `rows` (sorted split indices): each feature's rows, (n, width) float32."""
        rows = np.asarray(rows, dtype=np.int64)
        cursors = [_Cursor(self.stores[f.store], self.split, f) for f in features]
        starts = np.arange(0, int(rows[-1]) + 1, self.window) if len(rows) else []
        bar = progress_bar(total=len(rows), desc=desc, unit="sample", enabled=self.progress)
        with ThreadPoolExecutor(self.threads) as pool, bar:
            for start in starts:
                chosen = rows[(rows >= start) & (rows < start + self.window)]
                if len(chosen) == 0:
                    continue
                yield list(pool.map(lambda cursor, chosen=chosen: cursor.rows(chosen), cursors))
                bar.update(len(chosen))


class _Cursor:
    """One array's rows, read chunk by chunk; the last chunk is kept for the next window."""

    def __init__(self, store: FeatureStore, split: str, feature: Feature):
        self.store, self.split, self.feature = store, split, feature
        self.chunk, self.values = None, None

    def rows(self, chosen: np.ndarray) -> np.ndarray:
        size = self.store.chunk_samples
        parts = []
        for k in np.unique(chosen // size):
            if k != self.chunk:
                f = self.feature
                values = self.store.read_chunk(self.split, f.block, f.timestep, int(k), pool=f.pool)
                self.chunk, self.values = k, values.reshape(len(values), -1)
            parts.append(self.values[chosen[chosen // size == k] - k * size])
        return np.concatenate(parts)


# -- linear and debiased: feature-space sums, tiled -----------------------------------------------------
def plan_groups(features: Sequence[Feature], budget: int, window: int) -> list[list[int]]:
    """Consecutive features grouped so that one tile (two groups) fits `budget` bytes:
    its float64 sums (wa x wb) and a window of rows of both groups in float32 and float64."""
    capacity = _tile_capacity(budget, window)
    widest = max(features, key=lambda f: f.width)
    if widest.width > capacity:
        need = 8 * widest.width**2 + 24 * window * widest.width
        raise CkaInputError(
            f"{widest.label} has {widest.width} features per sample: its float64 cross-covariance needs "
            f"{format_bytes(need)}, more than the memory budget ({format_bytes(budget)}). Use --estimator minibatch "
            "(memory independent of the width), a coarser --pool, or a larger --memory-budget"
        )
    groups, width = [[]], 0
    for i, f in enumerate(features):
        if groups[-1] and width + f.width > capacity:
            groups.append([])
            width = 0
        groups[-1].append(i)
        width += f.width
    return groups


def _tile_capacity(budget: int, window: int) -> int:
    # widths w of two groups: 8 w^2 (sums) + 2 * 12 * window * w (rows in float32 and float64) <= budget
    a, b = 8.0, 24.0 * window
    return int((-b + np.sqrt(b * b + 4 * a * budget)) / (2 * a))


def linear_and_debiased(
    reader: Reader, features: Sequence[Feature], rows: np.ndarray, *, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, A) linear CKA and (A, A) debiased CKA of every pair, one pass over the rows per tile."""
    groups = plan_groups(features, budget, reader.window)
    tiles = [(a, b) for a in range(len(groups)) for b in range(a, len(groups))]
    if len(tiles) > 1:
        log.info(
            "cka: %d features in %d groups: %d passes over the samples (memory budget %s)",
            len(features),
            len(groups),
            len(tiles),
            format_bytes(budget),
        )
    count = len(features)
    linear, debiased = np.full((count, count), np.nan), np.full((count, count), np.nan)
    for number, (a, b) in enumerate(tiles):
        ga, gb = groups[a], groups[b]
        members = ga if a == b else ga + gb
        moments = CrossMoments([features[i].width for i in ga], [features[i].width for i in gb], same=a == b)
        shift = None
        desc = "cka" if len(tiles) == 1 else f"cka pass {number + 1}/{len(tiles)}"
        for window in reader.stream([features[i] for i in members], rows, desc=desc):
            if shift is None:  # any fixed vector: HSIC does not change; near the mean the sums do not cancel
                shift = [x.astype(np.float64).mean(axis=0) for x in window]
            window = [x - s for x, s in zip(window, shift)]
            moments.update(window[: len(ga)], None if a == b else window[len(ga) :])
        lin, deb = moments.finish()
        for values, out in ((lin, linear), (deb, debiased)):
            out[np.ix_(ga, gb)] = values
            out[np.ix_(gb, ga)] = values.T
    return normalise(linear), normalise(debiased)


# -- minibatch -------------------------------------------------------------------------------------------
def minibatches(rows: np.ndarray, num_samples: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """The selected split indices `rows` in fixed minibatches: ordered by a seeded random rank of each
    sample index (of a split of `num_samples`), cut into ceil(N / batch_size) batches of equal size (+-1).
    Which batch a sample joins depends only on the seed, its index and the split size."""
    rows = np.asarray(rows, dtype=np.int64)
    rank = np.random.default_rng([seed, 1, num_samples]).permutation(num_samples)
    order = rows[np.argsort(rank[rows], kind="stable")]
    return np.array_split(order, -(-len(rows) // batch_size))


def minibatch(
    reader: Reader,
    features: Sequence[Feature],
    rows: np.ndarray,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    budget: int,
) -> np.ndarray:
    """(A, A) minibatch CKA: HSIC_1 summed over the minibatches, then normalised (Nguyen et al. 2021)."""
    batches = minibatches(rows, num_samples, batch_size, seed)
    per_sample = 4 * sum(f.width for f in features)
    grams = 8 * len(features) * len(batches[0]) ** 2 * 3  # one batch's Gram matrices, a copy, the products
    fit = max(1, int((budget - grams - 4 * reader.window * per_sample) // (per_sample * len(batches[0]))))
    groups = [batches[i : i + fit] for i in range(0, len(batches), fit)]
    if len(groups) > 1:
        log.info(
            "cka: %d minibatches, %d per pass over the store (memory budget %s)",
            len(batches),
            fit,
            format_bytes(budget),
        )
    total = np.zeros((len(features), len(features)))
    for number, group in enumerate(groups):
        needed = np.sort(np.concatenate(group))
        kept = [np.empty((len(needed), f.width), np.float32) for f in features]
        filled = 0
        desc = "cka minibatch" if len(groups) == 1 else f"cka minibatch pass {number + 1}/{len(groups)}"
        for window in reader.stream(features, needed, desc=desc):
            for out, x in zip(kept, window):
                out[filled : filled + len(x)] = x
            filled += len(window[0])
        for batch in group:
            where = np.searchsorted(needed, batch)
            total += unbiased_hsic_matrix(linear_grams([x[where] for x in kept]))
    return normalise(total)


# -- rbf -------------------------------------------------------------------------------------------------
def rbf(reader: Reader, features: Sequence[Feature], rows: np.ndarray, *, sigma: float, budget: int) -> np.ndarray:
    """(A, A) CKA with the Gaussian kernel: every feature's centred N x N Gram matrix, then every pair."""
    n = len(rows)
    need = 8 * len(features) * n * n + 4 * n * max(f.width for f in features) + 24 * n * n
    if need > budget:
        fits = int(np.sqrt(budget / (8 * (len(features) + 3))))
        raise CkaInputError(
            f"--estimator rbf keeps {len(features)} Gram matrices of {n} x {n} samples "
            f"({format_bytes(need)}), more than the memory budget ({format_bytes(budget)}); "
            f"choose --samples {fits} or fewer, or --estimator linear"
        )
    grams = np.empty((len(features), n, n))
    for i, f in enumerate(features):
        x = np.concatenate([w[0] for w in reader.stream([f], rows, desc=f"cka rbf {i + 1}/{len(features)}")])
        grams[i] = centre_gram(rbf_gram(x, sigma))
    return gram_cka_matrix(grams)
