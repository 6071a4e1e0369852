"""The probe sweep: train heads on stored features for every requested (block, timestep, pool) at once.

    from stages.probe.run import ProbeSettings, run_probe
    result = run_probe(ProbeSettings(store="cache/features.zarr", head="linear", pools=(1, 2)))
    result.metrics["best"]          # chosen on validation, with its test accuracy

What one run does, in order:

1. Resolve the request against the store: every (block, timestep, pool) asked for must be stored
   (an error lists what the store has); an unfinished extraction is refused unless
   `allow_incomplete`, and then only samples finished in every requested array are used.
2. Carve a stratified validation subset out of the train split (seeded; indices are recorded).
   The fit rows give the standardisation statistics and train the heads; the validation rows choose
   the hyper-parameters; the store's "val" split (the *test* split here) is scored once, for the
   chosen configuration of each input set only.
3. Train. Torch heads of every input set x hyper-parameter set train together, in the same
   passes over the data, each with its own optimizer param group (`stages.probe.heads`): the features
   are read once per epoch for all heads (once in all when they are kept in memory), and heads
   of equal input size are batched matmuls. Successive halving (`halving_rungs`) retires the
   worse half of each input set's hyper-parameter sets, by validation accuracy, after a quarter
   and after half of the epochs; the survivors train exactly as they would alone. scikit-learn probes fit one input set after the
   other over their whole grid (`stages.probe.sklearn_probes`).
4. Write `<out>/<name>/`: configs.csv (every configuration: validation accuracy, and test accuracy
   where chosen), run.json (seed, store fingerprint, every setting), heads/<key>.{safetensors,json},
   predictions.npz, validation_subset.json, then `stages.report.render_run` adds metrics.json,
   heatmaps and summary.md from those files.

Reading, standardising and batching live in `stages.probe.features`. Data that fits the memory budget
is read once and kept (in several passes over groups of input
sets when all of them together do not fit); an input set too large for the budget on its own is
streamed chunk by chunk from the store each epoch (`data_mode` overrides the choice). Memory and
stream modes follow one batch schedule (shuffled windows of store chunks, shuffled rows within a
window), heads are seeded per member, and features are pooled and standardised with the same
arithmetic, so every mode and every split into passes trains the same heads: the budget only
decides what is cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import IncompleteStoreError
from cache.reader import FeatureStore
from stages.probe import heads as H
from stages.probe import sklearn_probes as S
from stages.devices import resolve_device
from stages.probe.features import Layout, MemorySource, Reader, StreamSource, epoch_schedule, size_text, standardise

log = logging.getLogger(__name__)

HEADS = H.TORCH_KINDS + S.SKLEARN_KINDS
DEFAULT_EPOCHS = {"linear": 10, "mlp": 20, "cnn": 20, "attention": 20}
MIN_DEFAULT_STEPS = 300  # default epochs are raised on small data sets to reach this many steps
MIN_DEFAULT_STEPS_PER_HEAD = {"linear": 200}  # a convex linear probe needs fewer (bench/probe.py)
# linear: standardised features + AdamW; 0.1 and 0.3 were never selected in bench/probe.py runs
DEFAULT_LRS = {"linear": (1e-3, 3e-3, 1e-2, 3e-2), "mlp": (1e-4, 3e-4, 1e-3), "cnn": (1e-4, 3e-4, 1e-3),
               "attention": (1e-4, 3e-4, 1e-3)}
DEFAULT_WEIGHT_DECAYS = {"linear": (1e-4,), "mlp": (1e-4,), "cnn": (0.05,), "attention": (0.05,)}
COLUMNS = ("head", "key", "blocks", "timesteps", "pool", "grid", "dim", "fused", "lr", "weight_decay", "C", "k",
           "alpha", "epochs", "val_top1", "val_top5", "val_loss", "selected", "test_top1", "test_top5")


class ProbeInputError(ValueError):
    """The request does not match the store (unknown block, timestep or pool, ...)."""


# -- settings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSettings:
    """Everything a probe run depends on; recorded in run.json. None means "the default for this head"."""

    store: str
    head: str
    out: str = "results"
    name: str | None = None  # result sub-directory; default: the head (with "_fused")
    blocks: tuple[int, ...] | None = None  # None: every block in the store
    timesteps: tuple[int, ...] | None = None  # None: every stored timestep of each block
    pools: tuple[int, ...] | None = None  # None: the pools the store was extracted for
    fuse: bool = False  # one head over all requested blocks x timesteps (per pool)
    epochs: int | None = None  # None: 10 for linear, 20 for the other torch heads, at least 200 (linear) / 300 steps
    batch_size: int = 256
    lrs: tuple[float, ...] | None = None
    weight_decays: tuple[float, ...] | None = None
    optimizer: str = "adamw"
    warmup: float = 0.05  # share of steps with a linear warm-up, then cosine decay to 0
    halving: bool = True  # successive halving over each input set's hyper-parameter sets (torch heads)
    batchnorm: bool = False  # linear / mlp: BatchNorm1d without affine before the head (MAE)
    hidden: tuple[int, ...] = (1024,)  # mlp hidden sizes
    width: int = 256  # cnn channels
    dim: int = 256  # attention: token width d
    depth: int = 2  # attention: transformer blocks k
    attention_heads: int = 4
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # logreg
    ks: tuple[int, ...] = (1, 5, 10, 20, 50, 100)  # knn
    alphas: tuple[float, ...] = (1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # ridge
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    memory_budget: int | None = None  # bytes for cached features; None: half the available memory
    data_mode: str = "auto"  # auto | memory | stream
    shuffle_window: int = 65536  # samples shuffled together (rounded to whole store chunks)
    allow_incomplete: bool = False
    read_threads: int = 4
    threads: int | None = None  # CPU threads for torch and BLAS during the run; None: the libraries' default

    def __post_init__(self):
        def fail(name, what, value):
            raise ValueError(f"The {name!r} setting of the probe must be {what}. Got {value!r} instead.")

        if self.head not in HEADS:
            fail("head", f"one of {', '.join(HEADS)}", self.head)
        if self.epochs is not None and (isinstance(self.epochs, bool) or self.epochs < 1):
            fail("epochs", "a positive integer or None", self.epochs)
        for name in ("batch_size", "width", "dim", "depth", "attention_heads", "shuffle_window", "read_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                fail(name, "a positive integer", value)
        if not 0.0 < self.val_fraction < 1.0:
            fail("val_fraction", "a float in the range (0.0, 1.0)", self.val_fraction)
        if not 0.0 <= self.warmup < 1.0:
            fail("warmup", "a float in the range [0.0, 1.0)", self.warmup)
        if self.optimizer not in ("adamw", "sgd"):
            fail("optimizer", "'adamw' or 'sgd'", self.optimizer)
        if self.data_mode not in ("auto", "memory", "stream"):
            fail("data_mode", "'auto', 'memory' or 'stream'", self.data_mode)
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            fail("threads", "a positive integer or None", self.threads)
        if self.memory_budget is not None and self.memory_budget <= 0:
            fail("memory_budget", "a positive number of bytes or None", self.memory_budget)
        for name in ("blocks", "timesteps", "pools", "hidden"):
            value = getattr(self, name)
            if value is not None and (not value or any(int(v) != v or v < (0 if name == "timesteps" else 1) for v in value)):
                fail(name, "a non-empty list of " + ("non-negative" if name == "timesteps" else "positive") + " integers", value)
        for name in ("lrs", "weight_decays", "Cs", "alphas"):
            value = getattr(self, name)
            low = -1e-300 if name == "weight_decays" else 0.0
            if value is not None:
                S.check_grid("the probe", name, value, low=low)
        S.check_grid("the probe", "ks", self.ks, integer=True)
        if self.name is not None and (not self.name or "/" in self.name or os.sep in self.name or self.name.startswith(".")):
            fail("name", "a plain directory name", self.name)
        if self.dim % self.attention_heads:
            fail("dim", f"divisible by attention_heads ({self.attention_heads})", self.dim)

    def num_epochs(self, steps_per_epoch: int) -> int:
        """The epochs asked for, or the head's default raised to reach its MIN_DEFAULT_STEPS(_PER_HEAD) steps."""
        if self.epochs is not None:
            return self.epochs
        return max(DEFAULT_EPOCHS.get(self.head, 1), -(-MIN_DEFAULT_STEPS_PER_HEAD.get(self.head, MIN_DEFAULT_STEPS) // max(1, steps_per_epoch)))

    @property
    def run_name(self) -> str:
        return self.name or (f"{self.head}_fused" if self.fuse else self.head)

    def hypers(self) -> list[dict]:
        """The grid of each input set, in member order."""
        if self.head in S.SKLEARN_KINDS:
            name = S.GRID_NAMES[self.head]
            grid = {"logreg": self.Cs, "knn": self.ks, "ridge": self.alphas}[self.head]
            return [{name: v} for v in grid]
        lrs = self.lrs or DEFAULT_LRS[self.head]
        wds = self.weight_decays if self.weight_decays is not None else DEFAULT_WEIGHT_DECAYS[self.head]
        return [{"lr": float(lr), "weight_decay": float(wd)} for lr in lrs for wd in wds]

    def rungs(self, epochs: int) -> list[tuple[int, int]]:
        """Where successive halving retires members: [(after epoch, keep per input set)]; [] without it."""
        return halving_rungs(len(self.hypers()), epochs) if self.halving and self.head in H.TORCH_KINDS else []

    def head_options(self) -> dict:
        return {"linear": {"batchnorm": self.batchnorm},
                "mlp": {"hidden": list(self.hidden), "batchnorm": self.batchnorm},
                "cnn": {"width": self.width},
                "attention": {"dim": self.dim, "depth": self.depth, "heads": self.attention_heads}}.get(self.head, {})


def halving_rungs(members: int, epochs: int) -> list[tuple[int, int]]:
    """Successive halving (Jamieson & Talwalkar, 2016) of one input set's `members` hyper-parameter sets
    over `epochs`: [(epoch, keep)], after `epoch` epochs only the best `keep` train on. Rungs are
    geometric, as in Hyperband: with R halvings they fall at epochs/2^R, ..., epochs/4, epochs/2, so
    the last member trains the second half alone. Each member keeps the schedule it would have alone.
    4 members, 10 epochs: [(2, 2), (5, 1)], 19 member-epochs instead of 40. (Equal member-epochs per
    stage, [(1, 2), (4, 1)], was cheaper but chose worse learning rates in bench/probe.py: after one
    epoch the larger rates look better than they end.)
    """
    counts = [members]
    while counts[-1] > 1:
        counts.append(-(-counts[-1] // 2))
    rungs = {}
    for i, keep in enumerate(counts[1:], 1):
        epoch = min(max(1, round(epochs / 2 ** (len(counts) - i))), epochs - 1)
        if epoch >= 1:
            rungs[epoch] = keep  # rungs that round to one epoch keep the later (smaller) count
    return sorted(rungs.items())


# -- what to probe -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Combo:
    """One input set: (block, timestep) inputs read at one pool size; `shapes` = (channels, grid) per input."""

    inputs: tuple[tuple[int, int], ...]
    pool: int
    shapes: tuple[tuple[int, int], ...]

    @property
    def blocks(self) -> list[int]:
        return sorted({b for b, _ in self.inputs})

    @property
    def timesteps(self) -> list[int]:
        return sorted({t for _, t in self.inputs})

    @property
    def fused(self) -> bool:
        return len(self.inputs) > 1

    @property
    def key(self) -> str:
        return f"b{'+'.join(map(str, self.blocks))}_t{'+'.join(map(str, self.timesteps))}_p{self.pool}"

    @property
    def dim(self) -> int:
        return sum(c * g * g for c, g in self.shapes)

    @property
    def pieces(self) -> list[tuple[int, int, int]]:
        """(block, timestep, grid) per input: what is read from the store."""
        return [(b, t, g) for (b, t), (_, g) in zip(self.inputs, self.shapes)]


def plan_combos(store: FeatureStore, settings: ProbeSettings) -> list[Combo]:
    """Every input set the request names, checked against the store (one error lists all problems)."""
    blocks = list(settings.blocks) if settings.blocks is not None else store.blocks
    stored_pools = [int(p) for p in store.attrs.get("pools", [])] or [1]
    pools = list(settings.pools) if settings.pools is not None else stored_pools
    problems = []
    unknown = [b for b in blocks if b not in store.blocks]
    if unknown:
        problems.append(f"block(s) {', '.join(map(str, unknown))} not stored")
    blocks = [b for b in blocks if b in store.blocks]
    pairs = []
    for b in blocks:
        stored = [t for t in store.timesteps if store.has(b, t)]
        wanted = list(settings.timesteps) if settings.timesteps is not None else stored
        missing = [t for t in wanted if t not in stored]
        if missing:
            problems.append(f"block {b} has no timestep(s) {', '.join(map(str, missing))}")
        pairs += [(b, t) for t in wanted if t in stored]
    grids = {}
    for b in blocks:
        info, readable = store.block_info(b), store.pools(b)
        for p in pools:
            grid = min(int(p), info["resolution"])
            if grid not in readable:
                problems.append(f"block {b} cannot be read at pool {p} (stored {info['grid']}x{info['grid']}: "
                                f"pools {readable})")
            grids[(b, p)] = grid
    if settings.head == "cnn":
        small = sorted({(b, p) for (b, p), g in grids.items() if g < 4})
        if small and settings.pools is None and settings.blocks is None:
            log.warning("cnn needs grids of 4x4 or more: skipping %s", ", ".join(f"block {b} pool {p}" for b, p in small))
            grids = {k: g for k, g in grids.items() if g >= 4}
        elif small:
            problems.append("the cnn head needs a pooled grid of at least 4x4; "
                            + ", ".join(f"block {b} at pool {p} is {grids[(b, p)]}x{grids[(b, p)]}" for b, p in small))
    if problems:
        raise ProbeInputError(f"{store.path} cannot serve this probe: " + "; ".join(problems) + ".\n" + describe_store(store))
    if not pairs:
        raise ProbeInputError(f"nothing to probe.\n{describe_store(store)}")
    channels = {b: store.block_info(b)["channels"] for b in blocks}
    if settings.fuse:
        if len({b for b, _ in pairs}) * len({t for _, t in pairs}) != len(pairs):
            raise ProbeInputError(f"--fuse needs every requested block at every requested timestep.\n{describe_store(store)}")
        return [Combo(tuple(pairs), int(p), tuple((channels[b], grids[(b, p)]) for b, _ in pairs)) for p in pools
                if all((b, p) in grids for b, _ in pairs)]
    return [Combo(((b, t),), int(p), ((channels[b], grids[(b, p)]),)) for p in pools for b, t in pairs if (b, p) in grids]


def describe_store(store: FeatureStore) -> str:
    """What the store holds, block by block (for error messages)."""
    lines = [f"{store.path} holds:"]
    for b in store.blocks:
        info = store.block_info(b)
        stored = [t for t in store.timesteps if store.has(b, t)]
        lines.append(f"  block {b}: timesteps {stored}, pools {store.pools(b)} ({info['channels']} channels, "
                     f"{info['resolution']}x{info['resolution']})")
    return "\n".join(lines if store.blocks else [f"{store.path} holds no features yet"])


# -- samples -----------------------------------------------------------------------------------------
@dataclass
class Samples:
    """Row indices into the store's splits. fit + val partition the usable train rows."""

    train_labels: np.ndarray
    test_labels: np.ndarray
    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray
    chunk_samples: int

    def fit_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.train_labels), bool)
        mask[self.fit] = True
        return mask


def select_samples(store: FeatureStore, combos: list[Combo], settings: ProbeSettings) -> Samples:
    arrays = sorted({pair for c in combos for pair in c.inputs})
    for split in ("train", "val"):
        if split not in store.splits:
            raise ProbeInputError(f"{store.path} has no {split!r} split (it has {store.splits}); the probe trains on "
                                  "'train' and scores on 'val'")
    missing = {key: chunks for key, chunks in store.missing().items() if (key[1], key[2]) in arrays}
    if missing and not settings.allow_incomplete:
        lines = [f"  {split} block {b} timestep {t}: chunks {_ranges(chunks)}" for (split, b, t), chunks in sorted(missing.items())]
        raise IncompleteStoreError(
            f"{store.path} is not fully extracted for this probe; unfinished sample chunks:\n" + "\n".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "")
            + "\nRe-run `pipeline extract` with the same settings to finish it, or pass --allow-incomplete to probe "
            "only the finished samples."
        )
    usable = {}
    for split in ("train", "val"):
        mask = np.ones(store.num_samples(split), bool)
        for b, t in arrays:
            mask &= store.finished_mask(split, b, t)
        usable[split] = np.flatnonzero(mask)
        if len(usable[split]) == 0:
            raise IncompleteStoreError(f"{store.path}: no finished {split} samples in every requested array")
    if missing:
        log.warning("incomplete store: using %d of %d train and %d of %d test samples", len(usable["train"]),
                    store.num_samples("train"), len(usable["val"]), store.num_samples("val"))
    train_labels = store.labels("train")
    fit, val = carve_validation(train_labels, usable["train"], settings.val_fraction, settings.seed)
    return Samples(train_labels, store.labels("val"), fit, val, usable["val"], int(store.attrs["chunk_samples"]))


def carve_validation(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of `rows` into (fit, val): round(fraction * n_c) of each class (>= 1 if n_c >= 2)."""
    rng = np.random.default_rng([seed, 0])
    val = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        n = int(round(fraction * len(members)))
        n = min(max(n, 1 if len(members) >= 2 else 0), len(members) - 1)
        val.append(rng.choice(members, size=n, replace=False))
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    if len(val) == 0:
        raise ProbeInputError(f"the validation subset is empty ({len(rows)} train samples, fraction {fraction})")
    return np.setdiff1d(rows, val), val


def _ranges(numbers: Sequence[int]) -> str:
    spans, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans[:8]) + (", ..." if len(spans) > 8 else "")


# -- planning memory -----------------------------------------------------------------------------------
def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def plan_passes(combos: list[Combo], settings: ProbeSettings, store: FeatureStore, n_train: int, n_test: int,
                window_samples: int, num_classes: int) -> tuple[str, list[list[int]], int]:
    """(mode, passes of combo indices, budget). Memory mode needs n_train rows of a pass's input sets,
    stream mode a window of rows (plus the stored grids it is pooled from); passes split the input
    sets so that each fits the budget. Results do not depend on the split."""
    budget = settings.memory_budget or available_memory() // 2
    per_param = 16  # weight, gradient and two optimizer moments, float32
    hypers = len(settings.hypers())

    def params(c: Combo) -> int:
        if settings.head == "linear":
            return hypers * (c.dim + 1) * num_classes
        if settings.head == "mlp":
            sizes = [c.dim, *settings.hidden, num_classes]
            return hypers * sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
        return 0

    def memory_cost(c: Combo) -> int:  # train rows kept, test rows while scoring
        knn_copy = 2 if settings.head == "knn" else 1
        return 4 * (n_train * knn_copy + n_test) * c.dim + per_param * params(c)

    def stream_cost(c: Combo) -> int:
        raw = sum(store.block_info(b)["channels"] * store.block_info(b)["grid"] ** 2 for b, _ in c.inputs)
        return 4 * window_samples * (raw + 2 * c.dim) + per_param * params(c)

    mode = settings.data_mode
    if mode == "auto":
        fits = sum(memory_cost(c) for c in combos) <= budget or all(memory_cost(c) <= budget for c in combos)
        mode = "memory" if fits or settings.head in S.SKLEARN_KINDS else "stream"
    if mode == "stream" and settings.head in S.SKLEARN_KINDS:
        raise ProbeInputError("the scikit-learn probes need their features in memory; use a torch head "
                              "(--head linear) to stream, or --data-mode memory")
    cost = memory_cost if mode == "memory" else stream_cost
    passes, current, used = [], [], 0
    for i, c in enumerate(combos):
        if current and used + cost(c) > budget:
            passes.append(current)
            current, used = [], 0
        current.append(i)
        used += cost(c)
    passes.append(current)
    too_big = [c.key for c in combos if cost(c) > budget]
    if too_big:
        log.warning("%s need more than the memory budget (%s) in %s mode; trying anyway", ", ".join(too_big),
                    size_text(budget), mode)
    return mode, passes, budget


# -- scoring -------------------------------------------------------------------------------------------
class _Tally:
    """Top-1 / top-5 counts and summed cross-entropy per member."""

    def __init__(self, members: int, num_classes: int):
        self.top1, self.top5, self.loss, self.n = np.zeros(members), np.zeros(members), np.zeros(members), 0
        self.k5 = num_classes > 5

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (M, B, K); rows with a non-finite logit count as wrong."""
        finite = torch.isfinite(logits).all(dim=2)
        labels = labels.to(logits.device)
        self.top1 += ((logits.argmax(dim=2) == labels) & finite).sum(dim=1).cpu().numpy()
        losses = F.cross_entropy(logits.transpose(1, 2), labels.expand(logits.shape[0], -1), reduction="none")
        self.loss += torch.where(finite, losses, torch.inf).sum(dim=1).double().cpu().numpy()
        if self.k5:
            top = logits.topk(5, dim=2).indices
            self.top5 += ((top == labels[None, :, None]).any(dim=2) & finite).sum(dim=1).cpu().numpy()
        self.n += logits.shape[1]

    def result(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        n = max(self.n, 1)
        return self.top1 / n, (self.top5 / n if self.k5 else None), self.loss / n


def _topk(logits: torch.Tensor, k: int) -> np.ndarray:
    """(N, K) -> (N, min(k, K)) class indices, best first; rows with non-finite logits get -1."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices.cpu().numpy().astype(np.int32)
    top[~torch.isfinite(logits).all(dim=1).cpu().numpy()] = -1
    return top


def _accuracy(top: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    top1 = float(np.mean(top[:, 0] == labels))
    top5 = float(np.mean((top[:, :5] == labels[:, None]).any(axis=1))) if top.shape[1] >= 5 else None
    return top1, top5


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    run_dir: Path
    rows: list[dict]  # every configuration (configs.csv)
    metrics: dict  # metrics.json
    record: dict = field(repr=False)  # run.json


def run_probe(settings: ProbeSettings) -> ProbeResult:
    """Run the sweep and write `<out>/<name>/` (see the module docstring); the store is only read."""
    with _thread_limit(settings.threads):
        return _run_probe(settings)


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    # Small matmuls on a busy machine are far faster single-threaded (spinning BLAS/OpenMP
    # workers); a user can set the count, and the libraries' defaults are kept otherwise.
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def _run_probe(settings: ProbeSettings) -> ProbeResult:
    from stages.report import render_run

    started = time.perf_counter()
    store = FeatureStore.open(settings.store)
    combos = plan_combos(store, settings)
    samples = select_samples(store, combos, settings)
    classes = store.classes
    num_classes = len(classes) or int(max(samples.train_labels.max(), samples.test_labels.max())) + 1
    hypers = settings.hypers()
    device = resolve_device(settings.device)
    window_chunks = max(1, settings.shuffle_window // samples.chunk_samples)
    mode, passes, budget = plan_passes(combos, settings, store, len(samples.train_labels), len(samples.test_labels),
                                       window_chunks * samples.chunk_samples, num_classes)
    steps = sum(len(w.batches) for w in epoch_schedule(samples, window_chunks, settings.batch_size, settings.seed, 0))
    epochs = settings.num_epochs(steps)
    log.info("%s: %d input sets x %d hyper-parameter sets, %d fit / %d val / %d test samples, %s mode, %d pass(es)",
             settings.head, len(combos), len(hypers), len(samples.fit), len(samples.val), len(samples.test), mode,
             len(passes))
    final = Path(settings.out) / settings.run_name
    partial = Path(settings.out) / f".{settings.run_name}.partial"
    _prepare(final, partial)
    rows, predictions = [], {}
    for number, members in enumerate(passes):
        pass_combos = [combos[i] for i in members]
        log.info("pass %d/%d: %s", number + 1, len(passes), ", ".join(c.key for c in pass_combos))
        sweep = _sweep_torch if settings.head in H.TORCH_KINDS else _sweep_sklearn
        pass_rows, pass_predictions = sweep(store, pass_combos, samples, settings, hypers, num_classes, device, mode,
                                            window_chunks, epochs, partial / "heads")
        rows += pass_rows
        predictions.update(pass_predictions)
    record = {
        "head": settings.head,
        "name": settings.run_name,
        "store": str(settings.store),
        "store_fingerprint": store.fingerprint,
        "seed": settings.seed,
        "settings": asdict(settings),
        "hypers": hypers,
        "epochs": epochs if settings.head in H.TORCH_KINDS else None,
        "halving": [{"after_epoch": e, "keep": k} for e, k in settings.rungs(epochs)] if settings.head in H.TORCH_KINDS else None,
        "head_options": settings.head_options(),
        "num_classes": num_classes,
        "classes": classes,
        "combos": [{"key": c.key, "blocks": c.blocks, "timesteps": c.timesteps, "pool": c.pool,
                    "shapes": [list(s) for s in c.shapes]} for c in combos],
        "samples": {"train": int(len(samples.train_labels)), "fit": int(len(samples.fit)), "val": int(len(samples.val)),
                    "test": int(len(samples.test)), "test_total": int(len(samples.test_labels))},
        "validation": {"fraction": settings.val_fraction, "seed": settings.seed, "stratified": True,
                       "size": int(len(samples.val)),
                       "indices_sha256": hashlib.sha256(samples.val.astype(np.int64).tobytes()).hexdigest()},
        "data_mode": mode,
        "passes": len(passes),
        "memory_budget": budget,
        "shuffle_window": window_chunks * samples.chunk_samples,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
        "versions": _versions(),
    }
    _write(partial, rows, predictions, record, samples)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    metrics = render_run(final)
    log.info("wrote %s in %.1f s", final, time.perf_counter() - started)
    return ProbeResult(final, rows, metrics, record)


def _prepare(final: Path, partial: Path) -> None:
    if final.exists() and any(final.iterdir()) and not (final / "run.json").exists():
        raise ProbeInputError(f"{final} exists and is not a probe result directory; choose another --out or --name")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "heads").mkdir(parents=True)


def _versions() -> dict:
    import sklearn

    return {"torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__}


def _row(settings: ProbeSettings, combo: Combo, hyper: dict, val_top1: float, val_top5: float | None) -> dict:
    row = {column: "" for column in COLUMNS}
    row.update(head=settings.head, key=combo.key, blocks="+".join(map(str, combo.blocks)),
               timesteps="+".join(map(str, combo.timesteps)), pool=combo.pool,
               grid="+".join(str(g) for _, g in combo.shapes), dim=combo.dim, fused=int(combo.fused),
               val_top1=float(val_top1), val_top5="" if val_top5 is None else float(val_top5), selected=0)
    row.update(hyper)
    return row


def _select(rows: list[dict], candidates: Sequence[int] | None = None) -> int:
    """Index of the best validation top-1 among `candidates` (default: all rows); ties go to the lower
    validation loss, then to grid order.

    (On a small validation subset many settings tie at the top, and the loss tells them apart.)"""
    candidates = range(len(rows)) if candidates is None else candidates
    return min(candidates, key=lambda i: (-rows[i]["val_top1"], rows[i]["val_loss"], i))


def _best_members(scores: dict, members: list[int], keep: int) -> list[int]:
    """The `keep` best of `members` by the rule `_select` uses."""
    return sorted(members, key=lambda m: (-scores[m][1], scores[m][3], m))[:keep]


def _validate(bank, source, layout: Layout, samples: Samples, device, num_classes: int) -> dict:
    """{member: (val top-1, val top-5 or None, val loss)} of the bank's active members, chunk by chunk
    (the same batches in memory and stream mode)."""
    bank.eval()
    active = list(bank.active)
    tally = _Tally(len(active), num_classes)
    cs = samples.chunk_samples
    with torch.no_grad():
        for k in sorted(set((samples.val // cs).tolist())):
            rows = samples.val[samples.val // cs == k]
            packed, local = source.window([k])
            tally.add(bank(layout.take(packed, local(rows), device)), torch.from_numpy(samples.train_labels[rows]))
    top1, top5, losses = tally.result()
    return {m: (top1[i], None if top5 is None else top5[i], losses[i]) for i, m in enumerate(active)}


def _sweep_torch(store, combos, samples, settings, hypers, num_classes, device, mode, window_chunks, epochs, heads_dir):
    flat = settings.head in H.FLAT_KINDS
    reader = Reader(store, [p for c in combos for p in c.pieces], settings)
    layout = Layout(combos, flat)
    source = (MemorySource(reader, layout, samples, per_channel=not flat, device=device) if mode == "memory"
              else StreamSource(reader, layout, samples, per_channel=not flat, device=device))
    seeds = [[H.member_seed(settings.seed, settings.head, c.key, json.dumps(h, sort_keys=True)) for h in hypers]
             for c in combos]
    if flat:
        bank = H.FlatBank([c.dim for c in combos], len(hypers), num_classes, seeds=seeds, batchnorm=settings.batchnorm,
                          hidden=tuple(settings.hidden) if settings.head == "mlp" else ())
    else:
        bank = H.ModuleBank(settings.head, [c.shapes for c in combos], len(hypers), num_classes,
                            settings.head_options(), seeds)
    bank.to(device)
    labels = torch.from_numpy(samples.train_labels)
    schedules = [epoch_schedule(samples, window_chunks, settings.batch_size, settings.seed, e) for e in range(epochs)]
    total = sum(len(w.batches) for s in schedules for w in s)
    groups = bank.param_groups(hypers)
    if settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)
    else:
        optimizer = torch.optim.SGD(groups, momentum=0.9, fused=True)
    warm = int(settings.warmup * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    rungs = dict(settings.rungs(epochs))
    scores = {}  # member -> (epochs trained, val top-1, val top-5, val loss), from where it stopped
    for epoch, schedule in enumerate(schedules, 1):
        bank.train()
        loss_sum, steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for window in schedule:
            packed, local = source.window(window.chunks)
            for rows in window.batches:
                batch = layout.take(packed, local(rows), device)
                y = labels[rows].to(device)
                loss = bank.loss(batch, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach()
                steps += 1
        log.info("epoch %d/%d: mean loss per head %.4f (%d heads)", epoch, epochs,
                 float(loss_sum) / len(bank.active) / max(steps, 1), len(bank.active))
        if epoch in rungs or epoch == epochs:
            scores.update({m: (epoch, *v) for m, v in _validate(bank, source, layout, samples, device, num_classes).items()})
        if epoch in rungs:
            keep = [m for ci in range(len(combos))
                    for m in _best_members(scores, [m for m in bank.active if m // len(hypers) == ci], rungs[epoch])]
            log.info("successive halving after epoch %d: %d of %d heads per input set train on", epoch, rungs[epoch],
                     len(bank.active) // len(combos))
            bank.keep(keep)
    finished = set(bank.active)
    rows_out, chosen = [], {}
    for ci, combo in enumerate(combos):
        combo_rows = []
        for l, hyper in enumerate(hypers):
            trained, top1, top5, loss = scores[ci * len(hypers) + l]
            combo_rows.append(_row(settings, combo, hyper, top1, top5))
            combo_rows[-1].update(val_loss=float(loss), epochs=trained)
        # only members that trained every epoch compete; retired ones keep their scores from the rung
        best = _select(combo_rows, [l for l in range(len(hypers)) if ci * len(hypers) + l in finished])
        combo_rows[best]["selected"] = 1
        chosen[ci] = (ci * len(hypers) + best, combo_rows[best])
        rows_out += combo_rows
    # test: only the chosen member of each input set, as the saved probe that reads raw features
    probes = {}
    for ci, (member, row) in chosen.items():
        combo = combos[ci]
        means = [torch.from_numpy(source.stats[p][0]) for p in combo.pieces]
        stds = [torch.from_numpy(source.stats[p][1]) for p in combo.pieces]
        probes[ci] = H.Probe(bank.export(member), means, stds).to(device).eval()
    predictions = _score_test(reader, combos, probes, samples, device, whole=mode == "memory")
    for ci, (member, row) in chosen.items():
        row["test_top1"], row["test_top5"] = _test_accuracy(predictions[combos[ci].key], samples)
        config = _probe_config(settings, combos[ci], num_classes, row, store)
        H.save_probe(probes[ci].cpu(), heads_dir / combos[ci].key, config)
    return rows_out, predictions


def _score_test(reader: Reader, combos: list[Combo], probes: dict, samples: Samples, device, whole: bool) -> dict:
    """{key: (N_test_usable, k) top-k class indices} from raw test features, chunk by chunk."""
    cs = samples.chunk_samples
    out = {c.key: [] for c in combos}
    with torch.no_grad():
        for k, pieces in reader.chunks("val", sorted(set((samples.test // cs).tolist())), whole=whole):
            rows = samples.test[samples.test // cs == k] - k * cs
            for ci, combo in enumerate(combos):
                inputs = [torch.from_numpy(pieces[p][rows]).to(device) for p in combo.pieces]
                out[combo.key].append(_topk(probes[ci](*inputs), 5))
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _test_accuracy(top: np.ndarray, samples: Samples) -> tuple[float, float | str]:
    top1, top5 = _accuracy(top, samples.test_labels[samples.test])
    return top1, "" if top5 is None else top5


def _probe_config(settings: ProbeSettings, combo: Combo, num_classes: int, row: dict, store: FeatureStore,
                  kind: str | None = None) -> dict:
    return {
        "kind": kind or settings.head,
        "trained_as": settings.head,
        "key": combo.key,
        "inputs": [list(s) for s in combo.shapes],
        "reads": [{"block": b, "timestep": t, "pool": combo.pool, "grid": g} for b, t, g in combo.pieces],
        "num_classes": num_classes,
        "classes": store.classes,
        "options": settings.head_options() if kind is None else {},
        "standardisation": "per channel" if settings.head in H.GRID_KINDS else "per feature",
        "hyper": {c: row[c] for c in ("lr", "weight_decay", "C", "k", "alpha") if row[c] != ""},
        "val_top1": row["val_top1"],
        "test_top1": row["test_top1"],
        "seed": settings.seed,
        "store_fingerprint": store.fingerprint,
    }


def _sweep_sklearn(store, combos, samples, settings, hypers, num_classes, device, mode, window_chunks, epochs, heads_dir):
    reader = Reader(store, [p for c in combos for p in c.pieces], settings)
    layout = Layout(combos, flat=True)
    source = MemorySource(reader, layout, samples, per_channel=False)
    name = S.GRID_NAMES[settings.head]
    grid = [h[name] for h in hypers]
    y_fit, y_val = samples.train_labels[samples.fit], samples.train_labels[samples.val]
    fitted, rows_out = {}, []
    for ci, combo in enumerate(combos):
        started = time.perf_counter()
        X = layout.combo_matrix(source.packed, ci)
        probe = S.make_probe(settings.head, grid).fit(X[samples.fit], y_fit, X[samples.val], y_val)
        scores = probe.decision_grid(X[samples.val])
        index = [probe.grid_index(v) for v in grid]
        combo_rows = []
        for hyper, j in zip(hypers, index):
            top1, top5 = _accuracy(S.topk_labels(scores[j], probe.classes_, 5), y_val)
            combo_rows.append(_row(settings, combo, hyper, top1, top5 if num_classes > 5 else None))
        # the probe chose on the same validation rows (first of its sorted grid on ties); mark that row
        best = index.index(probe.best_index_)
        combo_rows[best]["selected"] = 1
        fitted[ci] = (probe, combo_rows[best])
        rows_out += combo_rows
        log.info("%s %s: %s=%s chosen, val top-1 %.4f (%.1f s)", settings.head, combo.key, name,
                 combo_rows[best][name], combo_rows[best]["val_top1"], time.perf_counter() - started)
    # test: each probe at its chosen grid value, chunk by chunk
    cs = samples.chunk_samples
    parts = {c.key: [] for c in combos}
    for k, pieces in reader.chunks("val", sorted(set((samples.test // cs).tolist())), whole=True):
        rows = samples.test[samples.test // cs == k] - k * cs
        for key, (mean, std) in source.stats.items():
            standardise(pieces[key], mean, std)
        packed = layout.allocate(len(rows))
        layout.fill(packed, slice(0, len(rows)), {key: value[rows] for key, value in pieces.items()})
        for ci, combo in enumerate(combos):
            probe = fitted[ci][0]
            scores = np.full((len(rows), num_classes), -np.inf)
            scores[:, probe.classes_] = probe.decision_function(layout.combo_matrix(packed, ci))
            parts[combo.key].append(S.topk_labels(scores, np.arange(num_classes), 5).astype(np.int32))
    predictions = {key: np.concatenate(p) for key, p in parts.items()}
    for ci, (probe, row) in fitted.items():
        combo = combos[ci]
        row["test_top1"], row["test_top5"] = _test_accuracy(predictions[combo.key], samples)
        if settings.head == "knn":  # non-parametric: its "weights" are the fit rows of the store
            config = _probe_config(settings, combo, num_classes, row, store, kind="knn")
            (heads_dir / f"{combo.key}.json").write_text(json.dumps(config, indent=2) + "\n")
            continue
        # logreg and ridge are linear classifiers: saved as a linear head that any torch code can load
        head = H.LinearHead(combo.dim, num_classes)
        with torch.no_grad():
            head.linear.weight.zero_()
            head.linear.bias.fill_(-1e4)  # classes absent from the fit rows are never predicted
            head.linear.weight[probe.classes_] = torch.from_numpy(probe.coef_)
            head.linear.bias[probe.classes_] = torch.from_numpy(probe.intercept_)
        means = [torch.from_numpy(source.stats[p][0]) for p in combo.pieces]
        stds = [torch.from_numpy(source.stats[p][1]) for p in combo.pieces]
        H.save_probe(H.Probe(head, means, stds), heads_dir / combo.key,
                     _probe_config(settings, combo, num_classes, row, store, kind="linear"))
    return rows_out, predictions


def _write(directory: Path, rows: list[dict], predictions: dict, record: dict, samples: Samples) -> None:
    import csv

    with open(directory / "configs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) and k.endswith(("top1", "top5", "loss")) else v)
                             for k, v in row.items()})
    np.savez_compressed(directory / "predictions.npz", index=samples.test.astype(np.int64),
                        labels=samples.test_labels[samples.test].astype(np.int64), **predictions)
    (directory / "validation_subset.json").write_text(json.dumps(
        {"seed": record["seed"], "fraction": record["validation"]["fraction"], "indices": samples.val.tolist()}) + "\n")
    (directory / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
