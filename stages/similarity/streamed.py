"""The neighbour lists of a feature too large to hold, searched straight from the store within a memory budget.

For N in the tens of thousands and thousands of features, one feature's prepared N x width float64
array (3.3 GB at N = 100,000 and 4,096 features) does not fit a laptop's budget, and the N x N
similarities never do. `streamed_neighbours` holds neither:

1. The clamp of `--preprocess clamp-l2` needs the exact 0.95 quantile of |x| over the whole array
   (`preprocess.clamp_value`). `clamp_value_streamed` finds the same element in three passes over the
   store, by the bits of the float32 values (for non-negative floats their order is the order of
   their bit patterns): a histogram of the upper 11 bits finds the bucket that holds the element, a
   histogram of the next 11 bits within that bucket narrows it, and one of the last 10 finds it.
2. Rows are prepared window by window (clip, then each row divided by its norm: a row alone decides it).
3. The rows are taken in blocks of b samples (as many as the budget allows); for each block, one pass
   over the store's windows of columns (`Reader.stream`, chunk by chunk) keeps each row's k best
   candidates so far: the block's similarities to one window (b x window) are merged with them. The
   order (similarity, largest first; then the smaller index) is a total order, so the k best of the
   merged candidates are the k best of everything seen, and the result is the in-memory search's
   (`neighbours.nearest_neighbours`) exactly, whatever the block and window sizes.

Memory: a block's prepared rows (b x width float64), one window of columns (float32 as read and
float64 prepared), the block's similarities to it and the merge's copies (b x (window + k)), and the
neighbour lists (N x k). N / b passes over the store: a smaller budget means more passes, not more memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from stages.similarity.neighbours import Neighbours
from stages.similarity.preprocess import CLAMP_QUANTILE, L2_EPS, PREPROCESS

Windows = Callable[[np.ndarray], Iterator[np.ndarray]]  # positions (sorted) -> their rows, window by window

BYTES_PER_CANDIDATE = 8 + 8 + 8 + 8  # a block's similarity to a column: the value, a partitioned copy, its
# argpartition (int64) and the comparison masks, rounded up
BYTES_PER_FEATURE = 8 + 8 + 4  # a block row's prepared value, its product's operand copy, the float32 read


@dataclass(frozen=True)
class Plan:
    """How a streamed search runs: `rows` per block, `passes` over the store (one per block; the clamp adds three)."""

    rows: int
    passes: int
    peak: int  # the bytes it budgets for


def plan(n: int, width: int, k: int, window: int, budget: int) -> Plan:
    """The largest row block whose working memory fits `budget` bytes (at least one row)."""
    fixed = 16 * n * k + 12 * window * width  # the lists, and one window of columns as read and prepared
    per_row = BYTES_PER_FEATURE * width + BYTES_PER_CANDIDATE * (window + k)
    rows = int(min(n, max(1, (budget - fixed) // per_row)))
    return Plan(rows, -(-n // rows), fixed + rows * per_row)


RADIX = (11, 11, 10)  # bits of a float32 that each pass of the clamp's selection decides, highest first


def clamp_value_streamed(windows: Windows, n: int, q: float = CLAMP_QUANTILE) -> float:
    """`preprocess.clamp_value` of the whole (n, width) array that `windows(all positions)` yields (float32 or
    float16 values): a radix selection on the bits of |x|, one pass over the store per digit of `RADIX`, each
    holding a histogram of at most 2,048 bins."""
    everything = np.arange(n)
    prefix, decided, index = 0, 0, None  # the bits found so far, how many, the rank sought among the rest
    for digit in RADIX:
        shift = 32 - decided - digit
        counts = np.zeros(1 << digit, np.int64)
        total = 0
        for x in windows(everything):
            bits = _bits(x)
            total += bits.size
            bits = bits[(bits >> (32 - decided)) == prefix] if decided else bits
            counts += np.bincount((bits >> shift) & ((1 << digit) - 1), minlength=1 << digit)
        if index is None:
            index = min(int(q * total), total - 1)  # the element at int(q * numel) of the sorted |x|
        cumulative = np.cumsum(counts)
        value = int(np.searchsorted(cumulative, index, side="right"))
        index -= int(cumulative[value - 1]) if value else 0
        prefix, decided = (prefix << digit) | value, decided + digit
    return float(np.array([prefix], np.uint32).view(np.float32)[0])


def _bits(x: np.ndarray) -> np.ndarray:
    values = np.abs(np.asarray(x))
    if values.dtype not in (np.float32, np.float16):
        raise TypeError(f"the streamed clamp reads float32 or float16 features, got {values.dtype}")
    return values.astype(np.float32).ravel().view(np.uint32)


def prepare(x: np.ndarray, how: str, limit: float | None) -> np.ndarray:
    """Rows (b, width) -> float64 prepared as `preprocess.preprocess(whole, how)` prepares them, given the whole
    array's clamp `limit` (clamp-l2)."""
    if how not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {how!r}")
    out = np.array(x, dtype=np.float64).reshape(len(x), -1)
    if how == "clamp-l2":
        np.clip(out, -limit, limit, out=out)
    if how in ("l2", "clamp-l2"):
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), L2_EPS)
    return out


def streamed_neighbours(
    windows: Windows,
    n: int,
    k: int,
    *,
    how: str,
    budget: int,
    width: int,
    window: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[Neighbours, Plan]:
    """Each of the n samples' k nearest others by inner product, as `nearest_neighbours(preprocess(whole, how),
    k)` finds them, reading the features through `windows` (positions -> rows), in blocks within `budget`."""
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    limit = clamp_value_streamed(windows, n) if how == "clamp-l2" else None
    chosen = plan(n, width, k, window, budget)
    indices, similarities = np.empty((n, k), np.int64), np.empty((n, k), np.float64)
    everything = np.arange(n)
    for lo in range(0, n, chosen.rows):
        hi = min(n, lo + chosen.rows)
        block = np.concatenate([prepare(x, how, limit) for x in windows(np.arange(lo, hi))])
        best_v = np.full((hi - lo, 0), -np.inf)
        best_i = np.empty((hi - lo, 0), np.int64)
        start = 0
        for x in windows(everything):
            columns = prepare(x, how, limit)
            s = block @ columns.T
            own = np.arange(max(lo, start), min(hi, start + len(columns)))  # a sample is not its own neighbour
            s[own - lo, own - start] = -np.inf
            # the window's k best first (the k best of everything are among the windows' k best), then the merge
            top_v, top_i = _keep(s, np.arange(start, start + len(columns)), k)
            best_v, best_i = _keep(np.concatenate([best_v, top_v], axis=1), np.concatenate([best_i, top_i], axis=1), k)
            start += len(columns)
        indices[lo:hi], similarities[lo:hi] = best_i, best_v
        if progress is not None:
            progress(hi - lo)
    return Neighbours(indices, similarities), chosen


def _keep(values: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the (up to) k best candidates: similarity largest first, then the smaller index. `index`: (rows,
    candidates), or (candidates,) the same for every row. Memory: about three copies of `values` (a partition,
    its argpartition, the comparison), 17 bytes per candidate beyond the values."""
    keep = min(k, values.shape[1])
    index = np.broadcast_to(index, values.shape)
    if values.shape[1] > keep:
        kth = np.partition(values, values.shape[1] - keep, axis=1)[:, values.shape[1] - keep]
        if np.all(np.count_nonzero(values >= kth[:, None], axis=1) == keep):  # no tie at the k-th: any k best do
            top = np.argpartition(values, values.shape[1] - keep, axis=1)[:, values.shape[1] - keep :]
            values, index = np.take_along_axis(values, top, axis=1), np.take_along_axis(index, top, axis=1)
    order = np.lexsort((index, -values), axis=1)[:, :keep]
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(index, order, axis=1)
