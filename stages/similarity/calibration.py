"""Is a score above chance, and how sure is it: seeded permutation nulls and bootstrap intervals.

- Null: the score recomputed with the sample correspondence of one side (the second feature of the
  pair) broken by a random permutation, `permutations` times. The p-value is
  (#{null >= score} + 1) / (permutations + 1) (for a distance, #{null <= score}), which is never 0 and
  is exact for a permutation test (Phipson & Smyth 2010); the null's 95th percentile (5th for a
  distance) is the level a score must pass to be above chance at 5%; score - null mean is the
  calibrated score.
- Bootstrap: the score recomputed on samples drawn with replacement, `bootstrap` times; the 2.5 and
  97.5 percentiles are the 95% interval. In a resample the copies of one sample are never each
  other's neighbours (as a sample is never its own), so the kNN metrics see no false neighbours.

Both draw from `numpy.random.default_rng([seed, stream, N])`: the same permutations and resamples
for every pair of a run, reproducible from the seed recorded in similarity.json.
"""

from __future__ import annotations

import numpy as np

PERMUTATION_STREAM, BOOTSTRAP_STREAM = 2, 3
LEVEL = 0.05


def permutations(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, PERMUTATION_STREAM, n])
    return [rng.permutation(n) for _ in range(count)]


def resamples(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, BOOTSTRAP_STREAM, n])
    return [np.sort(rng.integers(0, n, size=n)) for _ in range(count)]


def p_value(score: float, null: np.ndarray, *, higher: bool = True) -> float:
    """(#{null at least as extreme as score} + 1) / (len(null) + 1); NaN when the score is NaN."""
    if not np.isfinite(score):
        return float("nan")
    null = np.asarray(null, dtype=np.float64)
    extreme = np.sum(null >= score) if higher else np.sum(null <= score)
    return float((extreme + 1) / (len(null) + 1))


def null_level(null: np.ndarray, *, higher: bool = True) -> float:
    """The score a value must pass to be above chance at 5%: the null's 95th percentile (5th for a distance)."""
    return float(np.nanpercentile(null, 100 * (1 - LEVEL) if higher else 100 * LEVEL))


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap values."""
    low, high = np.nanpercentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return float(low), float(high)
