"""Nearest neighbours by inner product, k per sample, without an N x N matrix; and the scores of two
neighbour lists that platonic-rep defines sample by sample.

platonic-rep (`compute_nearest_neighbors`) ranks the other samples j of sample i by <x_i, x_j> (cosine
similarity on L2-normalised features), the sample itself excluded, and keeps the first k. Here the
rows are taken in blocks of as many as fit the memory budget: one block's similarities to every
sample (b x N), its k largest per row. Ties are broken by the smaller index (platonic-rep's torch sort
leaves them in no defined order), so a result never depends on the block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# bytes per entry of one block's b x N similarities: the float64 values, a partitioned copy (measured: ~20)
BYTES_PER_SIMILARITY = 8 + 8 + 8  # + two masks and the kept candidates, rounded up


@dataclass(frozen=True)
class Neighbours:
    """indices (N, k) int64: sample i's k nearest other samples, nearest first; similarities (N, k) float64:
    their inner products with sample i."""

    indices: np.ndarray
    similarities: np.ndarray

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def permuted(self, perm: np.ndarray) -> Neighbours:
        """The neighbours of the features reordered as x[perm] (row i is old sample perm[i])."""
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        return Neighbours(inverse[self.indices[perm]], self.similarities[perm])


def block_rows(n: int, budget: int) -> int:
    """Rows per block so that a block's b x N similarities fit `budget` bytes (at least one row)."""
    return int(max(1, min(n, budget // (BYTES_PER_SIMILARITY * max(n, 1)))))


def nearest_neighbours(x: np.ndarray, k: int, *, budget: int, origin: np.ndarray | None = None) -> Neighbours:
    """(N, D) features -> each sample's `k` nearest others by inner product, in row blocks within `budget` bytes.

    `origin` (N,), optional: samples with the same origin are copies of one sample (a bootstrap
    resample) and are never each other's neighbours, as a sample is never its own.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    indices, similarities = np.empty((n, k), np.int64), np.empty((n, k), np.float64)
    step = block_rows(n, budget)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        rows = np.arange(hi - lo)
        s = x[lo:hi] @ x.T
        s[rows, lo + rows] = -np.inf
        if origin is not None:
            s[origin[lo:hi, None] == origin[None, :]] = -np.inf
        kth = np.partition(s, n - k, axis=1)[:, n - k]  # the k-th largest of each row
        r, c = np.nonzero(s >= kth[:, None])  # the k largest, and any tied with the k-th
        v = s[r, c]
        order = np.lexsort((c, -v, r))  # by row, then similarity (largest first), then index
        r, c, v = r[order], c[order], v[order]
        take = np.searchsorted(r, rows)[:, None] + np.arange(k)
        indices[lo:hi], similarities[lo:hi] = c[take], v[take]
    return Neighbours(indices, similarities)


# -- per-sample scores of two neighbour lists (N, k) ---------------------------------------------------------
def shared_counts(a: np.ndarray, b: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """(N,) |a_i ∩ b_i|: how many of sample i's neighbours the two lists share."""
    out = np.empty(len(a), np.int64)
    for lo in range(0, len(a), chunk):
        out[lo : lo + chunk] = (a[lo : lo + chunk, :, None] == b[lo : lo + chunk, None, :]).any(axis=2).sum(axis=1)
    return out


def cycle_hits(a: np.ndarray, b: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """(N,) 1 where sample i is among the a-neighbours of one of its b-neighbours (platonic-rep's
    `compute_knn_accuracy(knn_A[knn_B])`), else 0."""
    out = np.empty(len(a), np.float64)
    for lo in range(0, len(a), chunk):
        hop = a[b[lo : lo + chunk]]  # (n, k, k): the a-neighbours of each b-neighbour
        out[lo : lo + chunk] = (hop == np.arange(lo, lo + len(hop))[:, None, None]).any(axis=(1, 2))
    return out


def lcs_lengths(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) length of the longest common subsequence of the rows a_i and b_i (dynamic programming,
    every row at once)."""
    n, k = a.shape
    table = np.zeros((k + 1, k + 1, n), np.int64)
    for i in range(1, k + 1):
        for j in range(1, k + 1):
            table[i, j] = np.where(
                a[:, i - 1] == b[:, j - 1], table[i - 1, j - 1] + 1, np.maximum(table[i - 1, j], table[i, j - 1])
            )
    return table[k, k]


def edit_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Levenshtein distance between the rows a_i and b_i (insertions, deletions, substitutions of
    cost 1, as torchaudio.functional.edit_distance), every row at once."""
    n, k = a.shape
    previous = np.broadcast_to(np.arange(k + 1), (n, k + 1)).T.copy()  # (k + 1, n): row 0 of the table
    for i in range(1, k + 1):
        current = np.empty_like(previous)
        current[0] = i
        for j in range(1, k + 1):
            substitute = previous[j - 1] + (a[:, i - 1] != b[:, j - 1])
            current[j] = np.minimum(np.minimum(previous[j] + 1, current[j - 1] + 1), substitute)
        previous = current
    return previous[k]
