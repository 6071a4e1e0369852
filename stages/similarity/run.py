"""The `pipeline similarity` stage: every metric of every pair of requested (store, block, timestep) at each pool.

    from stages.similarity.run import SimilaritySettings, run_similarity
    result = run_similarity(SimilaritySettings(stores=(("pretrained", "features/pretrained.zarr"),
                                                       ("pixels", "features/pixels.zarr")),
                                               metrics=("mutual_knn", "cknna"), out="results/similarity"))
    result.rows        # one dict per (pair, metric): the columns of similarity.csv

What one run does:

1. Resolve the request exactly as `pipeline cka` does (`stages.cka.run`: blocks, timesteps, pools,
   split, the stores' samples must be the same), and select the samples (all or a seeded subset).
2. Read each feature once (chunk by chunk, `stages.cka.streaming.Reader`), prepare it
   (`--preprocess`, platonic-rep's clamp + L2 by default) and keep what the metrics need of it:
   its k nearest neighbours (found in row blocks within the memory budget: no N x N matrix) and,
   for the feature-space metrics, the prepared features. What is kept must fit the budget.
3. Every metric of every pair (both orders for the asymmetric cycle_knn); with `permutations`, each
   score's null from the same seeded permutations, its p-value, the null's 95th percentile; with
   `bootstrap`, a 95% interval; with `best_pair`, the best (block, timestep) pair of each two stores.
4. Write `<out>/`: similarity.csv (long form, one row per pair and metric), similarity.json (settings,
   stores' fingerprints, samples' digest, best pairs, time), best_pairs.csv, heatmaps/*.png (per metric
   as `pipeline cka` draws them; with permutations also the calibrated score, cells not above chance grey).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from cache.errors import ConfigError
from cache.reader import FeatureStore
from cache.text import format_bytes
from stages.cka import streaming
from stages.cka.estimators import MIN_DEBIASED_SAMPLES
from stages.cka.run import opened, resolve_features
from stages.cka.streaming import CkaInputError, Feature
from stages.devices import available_memory
from stages.outputs import check_output_dir, is_analysis_output, staged_output, write_csv
from stages.progress import progress_bar
from stages.similarity import calibration, streamed
from stages.similarity import metrics as _metrics
from stages.similarity.metrics import CROSS_METRICS, KNN_METRICS, METRICS, Parameters, Side
from stages.similarity.neighbours import BYTES_PER_SIMILARITY
from stages.similarity.preprocess import PREPROCESS, preprocess

log = logging.getLogger(__name__)

COLUMNS = (
    "store_a",
    "block_a",
    "timestep_a",
    "store_b",
    "block_b",
    "timestep_b",
    "pool",
    "split",
    "samples",
    "metric",
    "score",
    "null_mean",
    "null_q95",
    "p_value",
    "ci_low",
    "ci_high",
)
BEST_COLUMNS = ("store_a", "store_b", "pool", "metric", "score", "block_a", "timestep_a", "block_b", "timestep_b")
OUTPUT_FILES = {"similarity.csv", "similarity.json", "best_pairs.csv"}
NEEDS_FOUR = ("debiased", "minibatch", "unbiased_cka", "cknna")  # HSIC_1 divides by N - 3


class SimilarityInputError(CkaInputError):
    """The request does not fit the stores, the samples or the memory (the message says what would)."""


@dataclass(frozen=True)
class SimilaritySettings:
    """Everything a similarity run depends on; recorded in similarity.json. `blocks`, `timesteps` as in
    `stages.cka.run.CkaSettings`; `permutations` / `bootstrap` None for none."""

    stores: tuple[tuple[str, str], ...]  # (name, path)
    out: str
    metrics: tuple[str, ...] = ("mutual_knn", "cknna", "unbiased_cka")
    blocks: tuple[tuple[str | None, tuple[int, ...] | None], ...] = ()
    timesteps: tuple[tuple[str | None, tuple[int, ...] | None], ...] = ()
    pools: tuple[int, ...] = (1,)
    store_pools: tuple[tuple[str, int], ...] = ()  # (store, pool): that store read at its own pool, in every pool's run
    split: str = "val"
    samples: int | None = None
    preprocess: str = "clamp-l2"
    topk: int = 10
    cca_dim: int = 10
    batch_size: int = 256  # minibatch
    rbf_sigma: float = 1.0  # rbf
    permutations: int | None = None
    bootstrap: int | None = None
    best_pair: bool = False
    seed: int = 0  # the sample subset, the minibatch order, the permutations, the resamples
    memory_budget: int | None = None  # bytes; None: half the available memory
    threads: int = 4
    progress: bool = True
    storage_options: dict | None = None
    heatmaps: bool = True

    def __post_init__(self):
        def fail(message):
            raise ConfigError(message)

        names = [name for name, _ in self.stores]
        if not self.stores:
            fail("give at least one --store")
        if len(set(names)) != len(names):
            fail(f"the stores need distinct names (give NAME=PATH to name a store); got {', '.join(names)}")
        if tuple(self.metrics) == ("all",):
            object.__setattr__(self, "metrics", tuple(METRICS))  # frozen: the one place a setting is expanded
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            fail(f"unknown --metric {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
        if self.preprocess not in PREPROCESS:
            fail(f"unknown --preprocess {self.preprocess!r}; choose from {', '.join(PREPROCESS)}")
        for option, value, least in (
            ("topk", self.topk, 1),
            ("cca-dim", self.cca_dim, 1),
            ("permutations", self.permutations, 1),
            ("bootstrap", self.bootstrap, 2),
            ("batch-size", self.batch_size, MIN_DEBIASED_SAMPLES),
        ):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < least):
                leave = " (leave it out for none)" if option in ("permutations", "bootstrap") else ""
                fail(f"--{option} must be an integer of at least {least}{leave}; got {value}")
        if "cknna" in self.metrics and self.topk < 2:
            fail(f"cknna needs --topk 2 or more (platonic-rep refuses fewer); got {self.topk}")
        if not self.pools or any(int(p) != p or p < 1 for p in self.pools):
            fail(f"--pool must be positive integers; got {self.pools}")
        if self.samples is not None and (isinstance(self.samples, bool) or self.samples < 1):
            fail(f"--samples must be a positive integer; got {self.samples}")
        if not (0 < self.rbf_sigma < float("inf")):
            fail(f"--rbf-sigma must be positive and finite; got {self.rbf_sigma}")
        if self.memory_budget is not None and not (0 < self.memory_budget < float("inf")):
            fail(f"--memory-budget must be a positive number of bytes; got {self.memory_budget}")
        for option in ("blocks", "timesteps", "store_pools"):
            strays = sorted({name for name, _ in getattr(self, option) if name is not None} - set(names))
            if strays:
                fail(
                    f"--{option.replace('_', '-')} names {', '.join(strays)}, not one of the stores given "
                    f"({', '.join(names)})"
                )
        if any(name is None or int(p) != p or p < 1 for name, p in self.store_pools):
            fail(f"--store-pool must be NAME=POOL with a positive POOL; got {self.store_pools}")


@dataclass
class SimilarityResult:
    out: Path
    rows: list[dict]  # similarity.csv
    best: list[dict]  # best_pairs.csv
    record: dict = field(repr=False)  # similarity.json


def run_similarity(settings: SimilaritySettings) -> SimilarityResult:
    """Compute every metric of every pair and write `settings.out` (see the module docstring)."""
    started = time.perf_counter()
    out = Path(settings.out)
    check_output_dir(out, made_by=is_similarity_output, command="similarity", needs_overwrite=False)
    with opened(settings, resolve) as run:  # the stores held, the request resolved, the samples chosen
        stores, features, num_samples, rows = run.stores, run.features, run.num_samples, run.rows
        check_samples(settings, rows, features)
        budget = settings.memory_budget or available_memory() // 2
        window = max(store.chunk_samples for store in stores.values())  # the rows `Reader` reads at a time
        from_store = check_budget(settings, features, len(rows), budget, window=window)
        reader = streaming.Reader(stores, settings.split, threads=settings.threads, progress=settings.progress)
        batches = None
        if "minibatch" in settings.metrics:
            batches = tuple(
                np.searchsorted(rows, b)
                for b in streaming.minibatches(rows, num_samples, settings.batch_size, settings.seed)
            )
        params = Parameters(
            topk=settings.topk,
            cca_dim=settings.cca_dim,
            rbf_sigma=settings.rbf_sigma,
            batches=batches,
            budget=max(1, budget // 4),
            grams=use_grams(settings, features, len(rows), budget),
        )
        results, plans = {}, {}
        for pool, chosen in features.items():
            if pool in from_store:
                quiet = streaming.Reader(stores, settings.split, threads=settings.threads, progress=False)
                sides, plans[pool] = _streamed_sides(quiet, chosen, rows, settings, params, budget)
            else:
                sides = [Side(preprocess(_read(reader, f, rows), settings.preprocess), params) for f in chosen]
            results[pool] = (chosen, compare(sides, settings, desc=f"similarity pool {pool}"))
    table = pair_rows(results, settings, len(rows))
    best = best_pairs(results, settings) if settings.best_pair else []
    record = {
        **run.record("similarity", settings),
        "features": {pool: [asdict(f) for f in results[pool][0]] for pool in settings.pools},
        "best_pairs": best,
        "memory_budget": budget,
        "streamed": plans,  # {pool: {feature: rows per block, passes}} where the features did not fit the budget
        "seconds": round(time.perf_counter() - started, 3),
    }
    with staged_output(out) as staging:
        write_csv(staging / "similarity.csv", COLUMNS, table)
        if settings.best_pair:
            write_csv(staging / "best_pairs.csv", BEST_COLUMNS, best)
        (staging / "heatmaps").mkdir()
        if settings.heatmaps:
            from stages.similarity.heatmaps import (
                write_heatmaps,  # matplotlib: only when drawing
            )

            write_heatmaps(results, staging / "heatmaps", settings=settings, samples=len(rows))
        (staging / "similarity.json").write_text(json.dumps(record, indent=2) + "\n")
    return SimilarityResult(out, table, best, record)


def resolve(stores: dict[str, FeatureStore], settings: SimilaritySettings) -> dict[int, list[Feature]]:
    """{pool: the features compared at that pool}: `stages.cka.run.resolve_features` for the stores read at
    each pool, and for each store of `store_pools` at its own pool (the same features at every pool)."""
    own = dict(settings.store_pools)
    shared = {name: store for name, store in stores.items() if name not in own}
    mine = {name: resolve_features({name: stores[name]}, replace(settings, pools=(own[name],))) for name in own}
    common = resolve_features(shared, settings) if shared else []
    return {
        pool: [f for f in common if f.pool == pool] + [f for name in stores if name in own for f in mine[name]]
        for pool in settings.pools
    }


def _read(reader: streaming.Reader, feature: Feature, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([w[0] for w in reader.stream([feature], rows, desc=f"read {feature.label}")])


def _streamed_sides(
    reader: streaming.Reader,
    chosen: list[Feature],
    rows: np.ndarray,
    settings: SimilaritySettings,
    params: Parameters,
    budget: int,
) -> tuple[list[Side], dict]:
    """Each feature's neighbour lists searched from the store (`streamed.streamed_neighbours`), within what the
    budget leaves after every feature's lists; the features themselves are never held whole."""
    n = len(rows)
    search = max(1, budget * 3 // 4 - 16 * n * settings.topk * len(chosen))
    sides, plans = [], {}
    for f in chosen:

        def windows(positions, f=f):
            return (w[0] for w in reader.stream([f], rows[positions], desc=f.label))

        bar = progress_bar(total=n, desc=f"neighbours {f.label} (streamed)", unit="sample", enabled=settings.progress)
        with bar:
            found, plan = streamed.streamed_neighbours(
                windows,
                n,
                settings.topk,
                how=settings.preprocess,
                budget=search,
                width=f.width,
                window=reader.window,
                progress=bar.update,
            )
        plans[f.label] = {"rows_per_block": plan.rows, "passes": plan.passes}
        sides.append(Side.from_neighbours(found, params))
    return sides, plans


# -- the numbers -----------------------------------------------------------------------------------------
@dataclass
class Scores:
    """One metric over A features: (A, A) scores; with calibration (A, A, P) nulls, with bootstrap (A, A, B)."""

    score: np.ndarray
    null: np.ndarray | None = None
    boot: np.ndarray | None = None


def _pairs(count: int, symmetric: bool):
    return [(i, j) for i in range(count) for j in range(count) if symmetric is False or i <= j]


def _fill(matrix: np.ndarray, i: int, j: int, value: float, symmetric: bool) -> None:
    matrix[i, j] = value
    if symmetric:
        matrix[j, i] = value


def compare(sides: list[Side], settings: SimilaritySettings, *, desc: str = "similarity") -> dict[str, Scores]:
    """Every metric of every pair of `sides` (row: X, column: Y), with the nulls and resamples asked for."""
    count, n = len(sides), sides[0].n if sides else 0
    perms = calibration.permutations(n, settings.permutations or 0, settings.seed)
    draws = calibration.resamples(n, settings.bootstrap or 0, settings.seed)
    out = {m: Scores(np.full((count, count), np.nan)) for m in settings.metrics}
    for m in settings.metrics:
        if perms:
            out[m].null = np.full((count, count, len(perms)), np.nan)
        if draws:
            out[m].boot = np.full((count, count, len(draws)), np.nan)
    bar = progress_bar(total=1 + len(perms) + len(draws), desc=desc, unit="round", enabled=settings.progress)
    with bar:
        _all_pairs(sides, sides, settings.metrics, lambda m: out[m].score)
        bar.update(1)
        for p, perm in enumerate(perms):
            shuffled = [s.permuted(perm) for s in sides]
            _all_pairs(sides, shuffled, settings.metrics, lambda m, p=p: out[m].null[:, :, p], symmetric_ok=False)
            bar.update(1)
        for b, draw in enumerate(draws):
            resampled = [s.resampled(draw) for s in sides]
            _all_pairs(resampled, resampled, settings.metrics, lambda m, b=b: out[m].boot[:, :, b])
            bar.update(1)
    return out


def _all_pairs(rows: list[Side], columns: list[Side], metrics, target, *, symmetric_ok: bool = True) -> None:
    """target(metric)[i, j] = metric(rows[i], columns[j]); a symmetric metric is computed once per
    unordered pair where rows and columns are the same sides.

    The neighbour searches (large matrix products) run first with every BLAS thread; the pairs' small
    products and decompositions then run on one thread, where threads only cost synchronisation (a
    256 x 256 SVD measured 20x slower on two busy cores with two threads than with one)."""
    if any(METRICS[m].uses == "knn" for m in metrics):
        for side in (*rows, *columns):
            side.neighbours  # noqa: B018 (computed and cached here)
    with threadpool_limits(limits=1):
        for symmetric in (True, False):
            chosen = [m for m in metrics if (METRICS[m].symmetric and symmetric_ok) == symmetric]
            if not chosen:
                continue
            for i, j in _pairs(len(rows), symmetric):
                for m, value in _metrics.scores(chosen, rows[i], columns[j]).items():
                    _fill(target(m), i, j, value, symmetric)


# -- checks before reading -------------------------------------------------------------------------------
def check_samples(settings: SimilaritySettings, rows: np.ndarray, by_pool: dict[int, list[Feature]]) -> None:
    n = len(rows)
    features = [f for chosen in by_pool.values() for f in chosen]
    needs_four = [m for m in settings.metrics if m in NEEDS_FOUR]
    if needs_four and n < MIN_DEBIASED_SAMPLES:
        raise SimilarityInputError(
            f"{', '.join(needs_four)} need at least {MIN_DEBIASED_SAMPLES} samples (unbiased "
            f"HSIC divides by N-3), and split {settings.split!r} gives {n}; use more samples"
        )
    if n < 2:
        raise SimilarityInputError(f"similarity needs at least 2 samples, and split {settings.split!r} gives {n}")
    knn = [m for m in settings.metrics if METRICS[m].uses == "knn"]
    if knn and settings.topk >= n:
        raise SimilarityInputError(
            f"--topk {settings.topk} needs more than {settings.topk} samples and split "
            f"{settings.split!r} gives {n}: a sample has {n - 1} others; choose --topk "
            f"{n - 1} or fewer"
        )
    if "svcca" in settings.metrics:
        narrowest = min(min(f.width for f in features), n)
        if settings.cca_dim > narrowest:
            where = min(features, key=lambda f: f.width)
            raise SimilarityInputError(
                f"--cca-dim {settings.cca_dim} is more than the {narrowest} singular vectors "
                f"{where.label} has ({where.width} features, {n} samples); choose --cca-dim "
                f"{narrowest} or fewer"
            )
    if "minibatch" in settings.metrics:
        smallest = min(len(b) for b in np.array_split(np.arange(n), -(-n // settings.batch_size)))
        if smallest < MIN_DEBIASED_SAMPLES:
            raise SimilarityInputError(
                f"--batch-size {settings.batch_size} cuts {n} samples into minibatches of as "
                f"few as {smallest}; unbiased HSIC needs {MIN_DEBIASED_SAMPLES}: choose "
                f"--batch-size {n} (one minibatch) or at most {n // 2}"
            )


GRAM_SAMPLES = 4096  # the CKA metrics from N x N Gram matrices up to this N (a pair then costs N^2, not N p q)


def use_grams(settings: SimilaritySettings, by_pool: dict[int, list[Feature]], n: int, budget: int) -> bool:
    """Whether the CKA metrics take each feature's N x N Gram matrix (fast for small N, and what the
    permutation nulls reuse) rather than each pair's cross moments, and minibatch keeps its minibatches' Gram
    matrices: N at most `GRAM_SAMPLES`, and every feature's Grams (twice with permutations: a round's
    reordered copy) within the 3/4 of the budget that `check_budget` gives what is kept, beside the rest."""
    if not any(m in (*CROSS_METRICS, "minibatch") for m in settings.metrics) or n > GRAM_SAMPLES:
        return False
    copies = 2 if settings.permutations else 1
    each = 8 * n * n + (8 * n * min(n, settings.batch_size) if "minibatch" in settings.metrics else 0)
    return all(
        copies * each * len(chosen) + sum(kept_bytes(settings, f, n) for f in chosen) + BYTES_PER_SIMILARITY * n
        <= budget * 3 // 4
        for chosen in by_pool.values()
    )


def kept_bytes(settings: SimilaritySettings, feature: Feature, n: int) -> int:
    """Bytes kept per feature while its pool is compared: the prepared features (float64), its neighbour
    lists, an N x N Gram matrix for rbf."""
    need = 8 * n * feature.width  # the prepared features, always kept: resamples and feature metrics read them
    if settings.permutations or settings.bootstrap:
        need *= 2  # a round's shuffled or resampled copy of every feature
    if any(METRICS[m].uses == "knn" for m in settings.metrics):
        need += 16 * n * settings.topk
    if "rbf" in settings.metrics:
        need += 8 * n * n
    if "svcca" in settings.metrics:
        need += 8 * n * settings.cca_dim
    return need


def check_budget(
    settings: SimilaritySettings, by_pool: dict[int, list[Feature]], n: int, budget: int, *, window: int
) -> set[int]:
    """The pools whose features are searched from the store (`_streamed_sides`): those whose kept features do not
    fit 3/4 of the budget (the rest is for one block of neighbour search, at least one row of N similarities),
    where every metric is a kNN metric and there is no bootstrap. Refuse, before reading, any other request
    whose kept features do not fit."""
    from_store = set()
    for pool, chosen in by_pool.items():
        need = sum(kept_bytes(settings, f, n) for f in chosen) + BYTES_PER_SIMILARITY * n
        if need <= budget * 3 // 4:
            continue
        in_memory = [m for m in settings.metrics if METRICS[m].uses != "knn"]
        lists = 16 * n * settings.topk * len(chosen)
        least = max(streamed.plan(n, f.width, settings.topk, window, 0).peak for f in chosen)  # one row per block
        fits = lists + least <= budget * 3 // 4
        if not in_memory and not settings.bootstrap and fits:
            from_store.add(pool)
            continue
        why = (
            f"{', '.join(in_memory)} need{'s' if len(in_memory) == 1 else ''} every compared array in memory"
            if in_memory
            else "--bootstrap repeats the neighbour search in memory"
            if settings.bootstrap
            else "even their neighbour lists do not fit"
        )
        rbf = " (rbf keeps an N x N Gram matrix per feature)" if "rbf" in settings.metrics else ""
        raise SimilarityInputError(
            f"the {len(chosen)} features of pool {pool} keep {format_bytes(need)} for {n} samples{rbf}, more than "
            f"3/4 of the memory budget ({format_bytes(budget)}); choose --memory-budget {_size(need * 4 / 3)} "
            f"({why}), or only the kNN metrics ({', '.join(KNN_METRICS)}), which read from the store within any "
            "budget, or fewer --samples, a coarser --pool"
        )
    return from_store


def _size(n: float) -> str:
    """Bytes, rounded up to a whole KB, MB or GB as `--memory-budget` reads them."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20)):
        if n >= 10 * scale:
            return f"{-(-int(n) // scale)}{unit}"
    return f"{-(-int(n) // 1024) + 1}KB"


# -- outputs ---------------------------------------------------------------------------------------------
def _blank(value: float | None):
    return "" if value is None else float(value)


def pair_rows(results: dict, settings: SimilaritySettings, samples: int) -> list[dict]:
    """One row per metric and pair (i <= j; every ordered pair for an asymmetric metric)."""
    table = []
    for pool, (features, scores) in results.items():
        for m, s in scores.items():
            metric = METRICS[m]
            for i, j in _pairs(len(features), metric.symmetric):
                a, b = features[i], features[j]
                value = float(s.score[i, j])
                null_mean = null_q95 = p = low = high = None
                if s.null is not None:
                    null = s.null[i, j]
                    null_mean = float(np.nanmean(null)) if np.isfinite(null).any() else float("nan")
                    null_q95 = (
                        calibration.null_level(null, higher=metric.higher) if np.isfinite(null).any() else float("nan")
                    )
                    p = calibration.p_value(value, null, higher=metric.higher)
                if s.boot is not None:
                    low, high = (
                        calibration.interval(s.boot[i, j])
                        if np.isfinite(s.boot[i, j]).any()
                        else (float("nan"), float("nan"))
                    )
                table.append(
                    {
                        "store_a": a.store,
                        "block_a": a.block,
                        "timestep_a": a.timestep,
                        "store_b": b.store,
                        "block_b": b.block,
                        "timestep_b": b.timestep,
                        "pool": pool,
                        "split": settings.split,
                        "samples": samples,
                        "metric": m,
                        "score": value,
                        "null_mean": _blank(null_mean),
                        "null_q95": _blank(null_q95),
                        "p_value": _blank(p),
                        "ci_low": _blank(low),
                        "ci_high": _blank(high),
                    }
                )
    return table


def best_pairs(results: dict, settings: SimilaritySettings) -> list[dict]:
    """For each two distinct stores, pool and metric: the (block, timestep) pair with the best score (the
    largest; the smallest for a distance), as platonic-rep's `compute_score` reports it."""
    best = []
    for pool, (features, scores) in results.items():
        names = list(dict.fromkeys(f.store for f in features))
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                rows = [i for i, f in enumerate(features) if f.store == names[x]]
                cols = [j for j, f in enumerate(features) if f.store == names[y]]
                for m, s in scores.items():
                    block = s.score[np.ix_(rows, cols)]
                    if not np.isfinite(block).any():
                        continue
                    flat = np.nanargmax(block) if METRICS[m].higher else np.nanargmin(block)
                    i, j = np.unravel_index(flat, block.shape)
                    a, b = features[rows[i]], features[cols[j]]
                    best.append(
                        {
                            "store_a": names[x],
                            "store_b": names[y],
                            "pool": pool,
                            "metric": m,
                            "score": float(block[i, j]),
                            "block_a": a.block,
                            "timestep_a": a.timestep,
                            "block_b": b.block,
                            "timestep_b": b.timestep,
                        }
                    )
    return best


def is_similarity_output(out: Path) -> bool:
    """Whether `out` holds only what `run_similarity` writes (it can be recomputed, so it is replaced)."""
    return is_analysis_output(out, OUTPUT_FILES, "similarity.json", "similarity")


def describe(result: SimilarityResult) -> str:
    """One line for the command line: what was computed, where it went."""
    record = result.record
    settings = record["settings"]
    extra = "".join(
        f"; {n} {what}"
        for n, what in ((settings["permutations"], "permutations"), (settings["bootstrap"], "bootstrap resamples"))
        if n
    )
    count = sum(map(len, record["features"].values()))
    return (
        f"{len(result.rows)} scores ({', '.join(settings['metrics'])}) of {count} features "
        f"({', '.join(record['stores'])}; {record['samples']['count']} {record['split']} samples, "
        f"{settings['preprocess']}, top-{settings['topk']}{extra}) -> {result.out}/similarity.csv"
    )
