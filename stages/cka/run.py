"""The `pipeline cka` stage: CKA of every pair of requested (store, block, timestep) at each pool.

    from stages.cka.run import CkaSettings, run_cka
    result = run_cka(CkaSettings(stores=(("pretrained", "features/pretrained.zarr"),
                                         ("random_init", "features/random_init.zarr")), out="results/cka"))
    result.rows        # one dict per pair: the columns of cka.csv

What one run does:

1. Resolve the request against every store (`FeatureStore.select`), before reading any feature: each
   store's blocks and timesteps (all it holds unless `blocks` / `timesteps` name some, for every store
   or one by name), each pool readable for each block, the split; the stores must list the same samples
   (paths, and content hashes where both recorded them). One error lists every problem and what the
   store has. `opened` does this step for `pipeline similarity` too.
2. Select the samples (all, or a seeded random `samples` of them) and stream them through the
   estimator (`stages.cka.streaming`), one matrix of every pair of features per pool.
3. Write `<out>/`: cka.csv (one row per unordered pair, the diagonal included), cka.json (settings,
   store fingerprints, the samples' digest, the time taken), heatmaps/*.png; built beside `out` and
   renamed into place when complete.

A store of a model without noise (pixels, other backbones) holds timestep 0 only; it is read like
any other, and pairs with it across stores need nothing special.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cache.errors import ConfigError
from cache.reader import FeatureStore
from cache.text import format_bytes
from stages.cka import streaming
from stages.cka.estimators import DEBIASED, ESTIMATORS, MIN_DEBIASED_SAMPLES
from stages.cka.heatmaps import write_heatmaps
from stages.cka.streaming import CkaInputError, Feature
from stages.devices import available_memory
from stages.outputs import check_output_dir, is_analysis_output, staged_output, write_csv

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
    "estimator",
    "cka",
)
OUTPUT_FILES = {"cka.csv", "cka.json"}


@dataclass(frozen=True)
class CkaSettings:
    """Everything a CKA run depends on; recorded in cka.json.

    `blocks` and `timesteps` are (store name or None, selection) pairs: a None name applies to every
    store without a selection of its own; a selection of None (or no entry) means all the store holds.
    """

    stores: tuple[tuple[str, str], ...]  # (name, path)
    out: str
    blocks: tuple[tuple[str | None, tuple[int, ...] | None], ...] = ()
    timesteps: tuple[tuple[str | None, tuple[int, ...] | None], ...] = ()
    pools: tuple[int, ...] = (1,)
    split: str = "val"
    samples: int | None = None  # None: every sample of the split
    estimator: str = "linear"
    batch_size: int = 256  # minibatch: samples per minibatch
    rbf_sigma: float = 1.0  # rbf: bandwidth as a multiple of the median pairwise distance
    seed: int = 0  # the sample subset and the minibatch order
    memory_budget: int | None = None  # bytes; None: half the available memory
    threads: int = 4  # chunk reads in parallel
    progress: bool = True
    storage_options: dict | None = None  # fsspec options of object-store URLs among `stores`
    heatmaps: bool = True  # draw heatmaps/*.png (most of a small run's time)

    def __post_init__(self):
        def fail(name, what, value):
            raise ConfigError(f"The {name!r} setting of cka must be {what}. Got {value!r} instead.")

        if not self.stores:
            fail("stores", "at least one (name, path)", self.stores)
        names = [name for name, _ in self.stores]
        if len(set(names)) != len(names):
            fail("stores", "distinct names (give NAME=PATH to name a store)", names)
        if self.estimator not in ESTIMATORS:
            fail("estimator", f"one of {', '.join(ESTIMATORS)}", self.estimator)
        if not self.pools or any(int(p) != p or p < 1 for p in self.pools):
            fail("pools", "a non-empty list of positive integers", self.pools)
        if self.samples is not None and (isinstance(self.samples, bool) or self.samples < 1):
            fail("samples", "a positive integer or None", self.samples)
        if isinstance(self.batch_size, bool) or self.batch_size < MIN_DEBIASED_SAMPLES:
            fail("batch_size", f"an integer of at least {MIN_DEBIASED_SAMPLES}", self.batch_size)
        if not (0 < self.rbf_sigma < float("inf")):
            fail("rbf_sigma", "a positive, finite number", self.rbf_sigma)
        if self.memory_budget is not None and not (0 < self.memory_budget < float("inf")):
            fail("memory_budget", "a positive, finite number of bytes or None", self.memory_budget)
        for option in ("blocks", "timesteps"):
            unknown = sorted({name for name, _ in getattr(self, option) if name is not None} - set(names))
            if unknown:
                fail(option, f"selections of the stores given ({', '.join(names)})", unknown)


@dataclass
class CkaResult:
    out: Path
    rows: list[dict]  # cka.csv
    record: dict = field(repr=False)  # cka.json


def run_cka(settings: CkaSettings) -> CkaResult:
    """Compute every pair and write `settings.out` (see the module docstring); the stores are only read."""
    started = time.perf_counter()
    out = Path(settings.out)
    check_output_dir(out, made_by=is_cka_output, command="cka", needs_overwrite=False)
    with opened(settings) as run:
        check_sample_count(settings, run.rows, run.num_samples)
        budget = settings.memory_budget or available_memory() // 2
        reader = streaming.Reader(run.stores, settings.split, threads=settings.threads, progress=settings.progress)
        matrices = {}
        for pool in settings.pools:
            chosen = [f for f in run.features if f.pool == pool]
            matrices[pool] = (chosen, estimate(settings, reader, chosen, run.rows, run.num_samples, budget))
    table = pair_rows(matrices, settings, len(run.rows))
    record = {
        **run.record("cka", settings),
        "features": [asdict(f) for pool in settings.pools for f in matrices[pool][0]],
        "memory_budget": budget,
        "seconds": round(time.perf_counter() - started, 3),
    }
    with staged_output(out) as staging:
        write_csv(staging / "cka.csv", COLUMNS, table)
        (staging / "heatmaps").mkdir()
        if settings.heatmaps:
            write_heatmaps(
                matrices,
                staging / "heatmaps",
                estimator=settings.estimator,
                split=settings.split,
                samples=len(run.rows),
            )
        (staging / "cka.json").write_text(json.dumps(record, indent=2) + "\n")
    return CkaResult(out, table, record)


def estimate(
    settings: CkaSettings, reader, features: list[Feature], rows: np.ndarray, num_samples: int, budget: int
) -> np.ndarray:
    """(A, A) CKA of every pair of `features` by the chosen estimator."""
    if settings.estimator in ("linear", "debiased"):
        linear, debiased = streaming.linear_and_debiased(reader, features, rows, budget=budget)
        matrix = linear if settings.estimator == "linear" else debiased
    elif settings.estimator == "minibatch":
        matrix = streaming.minibatch(
            reader,
            features,
            rows,
            num_samples=num_samples,
            batch_size=settings.batch_size,
            seed=settings.seed,
            budget=budget,
        )
    else:
        matrix = streaming.rbf(reader, features, rows, sigma=settings.rbf_sigma, budget=budget)
    undefined = sorted({features[i].label for i in np.flatnonzero(~np.isfinite(np.diag(matrix)))})
    if undefined:
        log.warning("cka: no variance (CKA undefined, written as NaN) in %s", ", ".join(undefined))
    return matrix


# -- opening the stores (shared with `pipeline similarity`) --------------------------------------------
@dataclass(frozen=True)
class Opened:
    """The stores of a CKA or similarity run, held open, with its request resolved against them."""

    stores: dict[str, FeatureStore]
    features: object  # what the command's resolver gives (`resolve_features`: a list of Feature)
    num_samples: int  # of the split, the same in every store
    rows: np.ndarray  # the selected samples: sorted split indices
    described: dict  # name -> {"path", "fingerprint", "kind"}

    def record(self, command: str, settings) -> dict:
        """What every run's JSON record opens with: the command, its settings, the stores and the samples."""
        return {
            "command": command,
            "settings": {
                **asdict(settings),
                "stores": dict(settings.stores),
                "storage_options": sorted(settings.storage_options or {}),
            },  # names only: no secrets
            "stores": self.described,
            "split": settings.split,
            "samples": {
                "count": len(self.rows),
                "of": self.num_samples,
                "seed": settings.seed,
                "indices_sha256": hashlib.sha256(self.rows.astype("<i8").tobytes()).hexdigest(),
            },
        }


@contextlib.contextmanager
def opened(settings, resolve=None) -> Iterator[Opened]:
    """Open and hold every store of `settings` (CkaSettings or SimilaritySettings) for the run, resolve the
    request (`resolve(stores, settings)`, by default `resolve_features`), check that the stores list the
    same samples and select them; every store is released on leaving."""
    with contextlib.ExitStack() as stack:
        # Held for the whole run: no writer may replace a store under it.
        stores = {
            name: stack.enter_context(FeatureStore.open(path, settings.storage_options).hold())
            for name, path in settings.stores
        }
        features = (resolve or resolve_features)(stores, settings)
        num_samples = check_same_samples(stores, settings.split)
        rows = select_samples(num_samples, settings.samples, settings.seed)
        described = {
            name: {"path": path, "fingerprint": stores[name].fingerprint, "kind": stores[name].attrs.get("kind")}
            for name, path in settings.stores
        }
        yield Opened(stores, features, num_samples, rows, described)


# -- resolving the request ----------------------------------------------------------------------------
def _selection(entries, name: str):
    chosen = dict(entries)
    return chosen.get(name, chosen.get(None))


def resolve_features(stores: dict[str, FeatureStore], settings: CkaSettings) -> list[Feature]:
    """Every requested (store, block, timestep, pool), ordered by store, pool, timestep, block; one error
    lists every problem with what each store holds. A pool above a block's resolution is refused, not
    read at the full grid: features are labelled by pool, and are compared only at sizes the block has."""
    features, problems, splits = [], [], []
    for name, store in stores.items():
        timesteps = _selection(settings.timesteps, name)
        selection = store.select(
            blocks=_selection(settings.blocks, name) or None,
            pools=settings.pools,
            timesteps=None if timesteps is None else sorted(set(timesteps)),
            split=settings.split,
            full_above=False,
            partial=True,
        )
        problems += _problems(name, store, selection.problems, settings.pools)
        splits += [
            f"{name} ({store.path}) has no split {p.asked[0]!r}; it has {list(p.held)}"
            for p in selection.problems
            if p.kind == "split"
        ]
        pools = list(settings.pools)
        chosen = sorted(selection.inputs, key=lambda i: (pools.index(i.pool), i.timestep))  # stable: blocks as asked
        features += [Feature(name, i.block, i.timestep, i.pool, i.width) for i in chosen]
    if problems or splits:
        raise CkaInputError("; ".join(problems + splits))
    return features


def _problems(name: str, store: FeatureStore, problems, pools) -> list[str]:
    """The selection's problems of one store, in the words of `pipeline cka`: one line per kind (per pool)."""
    where = f"{name} ({store.path})"
    lines = [
        f"{where} has no block {', '.join(map(str, p.asked))}; it holds blocks {', '.join(map(str, p.held))}"
        for p in problems
        if p.kind == "block"
    ]
    lacking = sorted({p.block: p for p in problems if p.kind == "timestep"}.values(), key=lambda p: p.block)
    if lacking:
        asked = sorted({t for p in lacking for t in p.asked})
        lines.append(
            f"{where} has no timestep {', '.join(map(str, asked))} for block(s) "
            f"{', '.join(str(p.block) for p in lacking)}; it holds "
            + "; ".join(f"block {p.block}: timesteps {list(p.held)}" for p in lacking)
        )
    for pool in pools:  # each pool's problems, one per block, in the order asked
        cannot = list({p.block: p for p in problems if p.kind == "pool" and p.asked == (pool,)}.values())
        if not cannot:
            continue
        lines.append(
            f"{where} cannot give pool {pool} for block(s) {', '.join(str(p.block) for p in cannot)}; it "
            "can give " + "; ".join(f"block {p.block}: pools {list(p.held)}" for p in cannot)
        )
    return lines


def check_same_samples(stores: dict[str, FeatureStore], split: str) -> int:
    """The split's sample count, once every store is seen to list the same samples in the same order."""
    names = list(stores)
    first = stores[names[0]]
    paths, files = first.paths(split), first.file_records(split)
    for name in names[1:]:
        other = stores[name]
        other_paths = other.paths(split)
        problem = None
        if len(other_paths) != len(paths):
            problem = f"{names[0]} has {len(paths)} samples, {name} {len(other_paths)}"
        elif other_paths != paths:
            i = next(i for i, (a, b) in enumerate(zip(paths, other_paths)) if a != b)
            problem = f"sample {i} is {paths[i]} in {names[0]} but {other_paths[i]} in {name}"
        else:
            other_files = other.file_records(split)
            if files is not None and other_files is not None:
                both = (files[:, 0] != 0) & (other_files[:, 0] != 0)
                differ = np.flatnonzero(both & (files[:, 0] != other_files[:, 0]))
                if len(differ):
                    i = int(differ[0])
                    problem = (
                        f"{paths[i]} (and {len(differ) - 1} more) had other content when {name} read it "
                        f"than when {names[0]} did"
                    )
        if problem:
            raise CkaInputError(
                f"the stores hold different samples in split {split!r} ({problem}). CKA compares "
                "features of the same samples: extract every store from the same image folder"
            )
    return len(paths)


def select_samples(num_samples: int, samples: int | None, seed: int) -> np.ndarray:
    """Sorted split indices: all, or a seeded random subset of `samples` of them."""
    if samples is None or samples == num_samples:
        return np.arange(num_samples, dtype=np.int64)
    if samples > num_samples:
        raise CkaInputError(
            f"--samples {samples} is more than the split's {num_samples} samples; choose "
            f"--samples {num_samples} or fewer (or leave it out for all of them)"
        )
    rng = np.random.default_rng([seed, 0, num_samples])
    return np.sort(rng.choice(num_samples, size=samples, replace=False)).astype(np.int64)


def check_sample_count(settings: CkaSettings, rows: np.ndarray, num_samples: int) -> None:
    n = len(rows)
    if settings.estimator in DEBIASED and n < MIN_DEBIASED_SAMPLES:
        raise CkaInputError(
            f"--estimator {settings.estimator} needs at least {MIN_DEBIASED_SAMPLES} samples "
            f"(unbiased HSIC divides by N-3), and split {settings.split!r} gives {n}; use more "
            "samples or --estimator linear"
        )
    if n < 2:
        raise CkaInputError(f"CKA needs at least 2 samples, and split {settings.split!r} gives {n}")
    if settings.estimator == "minibatch":
        smallest = min(len(b) for b in streaming.minibatches(rows, num_samples, settings.batch_size, settings.seed))
        if smallest < MIN_DEBIASED_SAMPLES:
            raise CkaInputError(
                f"--batch-size {settings.batch_size} cuts {n} samples into minibatches of as few as "
                f"{smallest}; unbiased HSIC needs {MIN_DEBIASED_SAMPLES}: choose --batch-size {n} "
                f"(one minibatch) or at most {n // 2}"
            )


# -- outputs ---------------------------------------------------------------------------------------------
def pair_rows(matrices: dict, settings: CkaSettings, samples: int) -> list[dict]:
    """One row per unordered pair (i <= j) of each pool's features: the columns of cka.csv."""
    table = []
    for pool, (features, matrix) in matrices.items():
        for i, a in enumerate(features):
            for j in range(i, len(features)):
                b = features[j]
                value = float(matrix[i, j])  # full precision (NaN where a side has no variance)
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
                        "estimator": settings.estimator,
                        "cka": value,
                    }
                )
    return table


def is_cka_output(out: Path) -> bool:
    """Whether `out` holds only what `run_cka` writes (it can be recomputed, so it is replaced)."""
    return is_analysis_output(out, OUTPUT_FILES, "cka.json", "cka")


def describe(result: CkaResult) -> str:
    """One line for the command line: what was computed, where it went."""
    record = result.record
    pools = sorted({r["pool"] for r in result.rows})
    return (
        f"{len(result.rows)} pairs of {len(record['features'])} features ({', '.join(record['stores'])}; pool "
        f"{', '.join(map(str, pools))}; {record['samples']['count']} {record['split']} samples, "
        f"{record['settings']['estimator']}) -> {result.out}/cka.csv; budget "
        f"{format_bytes(record['memory_budget'])}"
    )
