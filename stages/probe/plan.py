"""Resolving a probe request against a store, once, before any training: `make_plan` -> `ProbePlan`.

1. Input sets (`Combo`): every (block, timestep, pool) asked for must be stored (`FeatureStore.select`,
   where a pool at or above a block's resolution reads its full grid; one error lists all problems and
   what the store has).
2. Rows per role (`Samples`): the train split's rows (minus a carved validation subset, unless an
   official validation split is named) train the heads and give the standardisation statistics;
   the validation rows choose hyper-parameters; the test split is scored once, for the chosen
   configuration only. An unfinished extraction is refused unless `allow_incomplete`, and then only
   samples finished in every requested array are used.
3. Memory: whether features are kept in memory or streamed, and in how many passes over groups of
   input sets (`plan_passes`); results do not depend on either.
4. Views: a store with augmented views of the train split (`pipeline extract --views K`) trains the
   heads on one view per sample per epoch, `view_choice(seed, epoch, index, K)`; the validation and
   test rows, and the standardisation statistics, are view 0 (the centre view).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from cache.errors import IncompleteStoreError, UserError
from cache.reader import FeatureStore
from cache.text import format_bytes, format_ranges
from stages.devices import available_memory, resident_memory
from stages.probe.fewshot import RULE, few_shot_rows, rows_digest, smallest_class
from stages.probe.registry import HeadSpec
from stages.probe.settings import ProbeSettings

log = logging.getLogger(__name__)


class ProbeInputError(UserError, ValueError):
    """The request does not match the store (unknown block, timestep, pool or split, ...)."""


# -- input sets ----------------------------------------------------------------------------------------
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
    spec = settings.spec
    selection = store.select(blocks=settings.blocks, timesteps=settings.timesteps, pools=settings.pools, partial=True)
    problems = [p.describe() for p in selection.problems]
    grids = dict(selection.grids)
    small = sorted({(b, p) for (b, p), g in grids.items() if g < spec.min_grid})
    if small and settings.pools is None and settings.blocks is None:
        log.warning(
            "%s needs grids of %dx%d or more: skipping %s",
            spec.name,
            spec.min_grid,
            spec.min_grid,
            ", ".join(f"block {b} pool {p}" for b, p in small),
        )
        grids = {k: g for k, g in grids.items() if g >= spec.min_grid}
    elif small:
        problems.append(
            f"the {spec.name} head needs a pooled grid of at least {spec.min_grid}x{spec.min_grid}; "
            + ", ".join(f"block {b} at pool {p} is {grids[(b, p)]}x{grids[(b, p)]}" for b, p in small)
        )
    if problems:
        raise ProbeInputError(
            f"{store.path} cannot serve this probe: " + "; ".join(problems) + ".\n" + store.describe()
        )
    pairs = list(selection.arrays)
    if not pairs:
        raise ProbeInputError(f"nothing to probe.\n{store.describe()}")
    channels = {i.block: i.channels for i in selection.inputs}
    if settings.fuse:
        if len({b for b, _ in pairs}) * len({t for _, t in pairs}) != len(pairs):
            raise ProbeInputError(
                f"--fuse needs every requested block at every requested timestep.\n{store.describe()}"
            )
        return [
            Combo(tuple(pairs), p, tuple((channels[b], grids[(b, p)]) for b, _ in pairs))
            for p in selection.pools
            if all((b, p) in grids for b, _ in pairs)
        ]
    return [Combo((i.array,), i.pool, ((i.channels, i.grid),)) for i in selection.inputs if (i.block, i.pool) in grids]


# -- rows per role -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """The rows of one store split that serve one role."""

    split: str
    labels: np.ndarray  # (N,) every label of the split
    index: np.ndarray  # (n,) sorted row indices into the split

    @property
    def y(self) -> np.ndarray:
        return self.labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def by_chunk(self, chunk_samples: int) -> list[tuple[int, np.ndarray]]:
        """(chunk, the rows of `index` in it) for every store chunk that holds some of them, in order."""
        chunk_of = self.index // chunk_samples
        return [(int(k), self.index[chunk_of == k]) for k in np.unique(chunk_of)]


@dataclass(frozen=True)
class Samples:
    """Rows by role: `fit` trains the heads (and gives the standardisation statistics), `selection`
    chooses hyper-parameters, `test` scores the chosen configuration."""

    fit: Rows
    selection: Rows
    test: Rows
    chunk_samples: int

    @property
    def carved(self) -> bool:
        """Whether the selection rows were carved out of the train split."""
        return self.selection.split == self.fit.split

    def fit_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.fit.labels), bool)
        mask[self.fit.index] = True
        return mask

    def roles(self, settings: ProbeSettings) -> dict:
        """The split of each role, as run.json records them."""
        selection = (
            f"{self.selection.split} (a stratified {settings.val_fraction:g} of it, seed {settings.seed})"
            if self.carved
            else self.selection.split
        )
        return {"train": self.fit.split, "validation": selection, "test": self.test.split}


def role_splits(store: FeatureStore, settings: ProbeSettings) -> tuple[str, str | None, str]:
    """(train, official validation or None, test) split names, checked against the store.

    Roles not given default to the data set's (recorded by its kind, `stages.data.registry`: e.g.
    FGVC-Aircraft and Flowers-102 choose on their official val split), else: no validation split
    (carved from train) and the store's 'test' split, else its 'val' split."""
    recorded = store.attrs.get("data", {}).get("roles") or {}
    official = settings.val_split
    if (
        official is None
        and recorded.get("val") in store.splits
        and recorded["val"] not in (settings.train_split, settings.test_split)
    ):
        official = recorded["val"]
        log.info("choosing on the data set's official validation split %r (its kind's default)", official)
    fallback = recorded.get("test") if recorded.get("test") in store.splits else None
    test = settings.test_split or fallback or ("test" if "test" in store.splits else "val")
    roles = {"--train-split": settings.train_split, "--val-split": official, "--test-split": test}
    for option, split in roles.items():
        if split is not None and split not in store.splits:
            default = (
                " (the default: the store's 'test' split, else its 'val' split)"
                if option == "--test-split" and settings.test_split is None
                else ""
            )
            raise ProbeInputError(
                f"{store.path} has no split {split!r} for {option}{default}; it has "
                f"{', '.join(store.splits)}. Name one of them with {option}."
            )
    if test == settings.train_split:
        raise ProbeInputError(f"the test split {test!r} is also the train split; name another with --test-split")
    unused = [s for s in store.splits if s not in (settings.train_split, official, test)]
    if official is None and "val" in unused:
        log.info(
            "the store's 'val' split is not used: validation rows are carved out of %r "
            "(--val-split val selects on it instead)",
            settings.train_split,
        )
    return settings.train_split, official, test


def select_samples(store: FeatureStore, combos: list[Combo], settings: ProbeSettings) -> Samples:
    train, official, test = role_splits(store, settings)
    splits = [s for s in (train, official, test) if s is not None]
    arrays = sorted({pair for c in combos for pair in c.inputs})
    missing = {
        key: chunks for key, chunks in store.missing().items() if key[0] in splits and (key[1], key[2]) in arrays
    }
    if missing and not settings.allow_incomplete:
        lines = [
            f"  {split} block {b} timestep {t}: chunks {format_ranges(chunks, 8)}"
            for (split, b, t), chunks in sorted(missing.items())
        ]
        raise IncompleteStoreError(
            f"{store.path} is not fully extracted for this probe; unfinished sample chunks:\n"
            + "\n".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "")
            + "\nRe-run `pipeline extract` with the same settings to finish it, or pass --allow-incomplete to probe "
            "only the finished samples."
        )
    usable = {}
    for split in splits:
        mask = np.ones(store.num_samples(split), bool)
        for b, t in arrays:
            mask &= store.finished_mask(split, b, t)
        usable[split] = np.flatnonzero(mask)
        if len(usable[split]) == 0:
            raise IncompleteStoreError(f"{store.path}: no finished {split} samples in every requested array")
    if missing:
        log.warning(
            "incomplete store: using %s", ", ".join(f"{len(usable[s])} of {store.num_samples(s)} {s}" for s in splits)
        )
    train_labels = store.labels(train)
    if official is None:
        fit, selection = carve_validation(train_labels, usable[train], settings.val_fraction, settings.seed)
        selection_rows = Rows(train, train_labels, selection)
    else:
        fit = usable[train]
        selection_rows = Rows(official, store.labels(official), usable[official])
    if settings.shots is not None or settings.episode is not None:
        fit = _few_shot(store, train_labels, fit, settings)
    return Samples(
        Rows(train, train_labels, fit),
        selection_rows,
        Rows(test, store.labels(test), usable[test]),
        store.chunk_samples,
    )


def _few_shot(store: FeatureStore, labels: np.ndarray, fit: np.ndarray, settings: ProbeSettings) -> np.ndarray:
    """The fit rows of a few-shot episode (`settings.episode`), after checking every asked shot count fits."""
    c, count = smallest_class(labels, fit)
    most = max([*(settings.shots or ()), *((settings.episode[0],) if settings.episode else ())])
    if most > count:
        name = store.classes[c] if c < len(store.classes) else str(c)
        raise ProbeInputError(
            f"--shots {most} is more than the {count} fit rows of class {name!r}, the smallest "
            f"(the train split less its validation rows); give --shots {count} or fewer"
        )
    if settings.episode is None:
        return fit
    shots, episode = settings.episode
    return few_shot_rows(labels, fit, shots=shots, episode=episode, seed=settings.seed)


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


def view_choice(seed: int, epoch: int, index: np.ndarray, views: int) -> np.ndarray:
    """(n,) the view each train row `index` reads in `epoch`: a seeded hash of (seed, epoch, index) mod `views`.

    A pure function of each row's index (splitmix64 of a mix of the three), so it does not depend on
    the batch order, the data mode or which other rows are used; with one view it is all zeros."""
    index = np.asarray(index, dtype=np.uint64)
    if views <= 1:
        return np.zeros(len(index), np.int64)
    with np.errstate(over="ignore"):
        x = index * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
            (int(seed) * 0x632BE59BD9B4E019 + int(epoch) + 1) & 0xFFFFFFFFFFFFFFFF
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(views)).astype(np.int64)


# -- the batch order ------------------------------------------------------------------------------------------
@dataclass
class Window:
    chunks: list[int]
    batches: list[np.ndarray]  # train-split row indices


def epoch_schedule(
    samples: Samples, window_chunks: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = False
) -> list[Window]:
    """Chunks in a seeded random order, cut into windows; fit rows shuffled within a window, cut into batches
    of about `batch_size` (a window's rows are split evenly, so no batch is a tiny remainder), or, with
    `drop_last` (the paper's data loader), into batches of exactly `batch_size`, the remainder of each
    window dropped. Memory and stream mode follow this one order."""
    rng = np.random.default_rng([seed, 1, epoch])
    n, cs = len(samples.fit.labels), samples.chunk_samples
    order = rng.permutation(-(-n // cs))
    chunk_of_fit = samples.fit.index // cs
    windows = []
    for start in range(0, len(order), window_chunks):
        chunks = [int(k) for k in order[start : start + window_chunks]]
        rows = samples.fit.index[np.isin(chunk_of_fit, chunks)]
        if len(rows) == 0:
            continue
        rows = rows[rng.permutation(len(rows))]
        if drop_last:
            full = len(rows) // batch_size
            if full:
                windows.append(Window(chunks, [rows[i * batch_size : (i + 1) * batch_size] for i in range(full)]))
            continue
        count = max(1, int(round(len(rows) / batch_size)))
        windows.append(Window(chunks, np.array_split(rows, count)))
    return windows


# -- memory ------------------------------------------------------------------------------------------------
class MemoryBudgetError(ProbeInputError):
    """An input set alone does not fit what an explicit --memory-budget leaves once the process is counted."""


# What a torch optimizer's first step loads into a process that has not taken one yet (torch._dynamo and what it
# imports): 160 MB resident measured with torch 2.14 (CUDA build, on the CPU), rounded up.
FIRST_STEP_ALLOWANCE = 192 << 20


def first_step_allowance(torch_head: bool) -> int:
    """FIRST_STEP_ALLOWANCE for a torch head in a process that has not yet taken an optimizer step, else 0."""
    return FIRST_STEP_ALLOWANCE if torch_head and "torch._dynamo" not in sys.modules else 0


def process_floor(torch_head: bool) -> int:
    """Bytes the process holds before it holds any feature: its resident set now (0 where the system does not
    report it) and what its first training step will load."""
    return resident_memory() + first_step_allowance(torch_head)


def _budget_text(n: float) -> str:
    """Bytes rounded up to a tenth of a GB, or a whole MB, as `--memory-budget` reads them."""
    if n >= 1 << 30:
        return f"{math.ceil(n / (1 << 30) * 10) / 10:g}GB"
    return f"{max(1, math.ceil(n / (1 << 20)))}MB"


def plan_passes(
    combos: list[Combo],
    settings: ProbeSettings,
    store: FeatureStore,
    n_train: int,
    n_test: int,
    window_samples: int,
    num_classes: int,
    *,
    views: int = 1,
    floor: int | None = None,
) -> tuple[str, list[list[int]], int]:
    """(mode, passes of combo indices, budget). Memory mode needs n_train rows of a pass's input sets,
    stream mode a window of rows (plus the stored grids it is pooled from); passes split the input
    sets so that each fits the budget. Results do not depend on the split.

    The budget is the whole process's: an explicit `settings.memory_budget` less the process's floor
    (`process_floor`, or `floor`) is what the features may use. The default budget, half the available
    memory, already leaves out what the process holds, so only the first step's allowance is taken from it.
    A streamed input set that alone needs more than an explicit budget leaves is refused
    (`MemoryBudgetError`, naming the largest --shuffle-window that fits); without one it is tried anyway."""
    spec = settings.spec
    explicit = settings.memory_budget is not None
    if floor is None:
        floor = process_floor(spec.is_torch)
    budget = settings.memory_budget or available_memory() // 2
    left = budget - (floor if explicit else first_step_allowance(spec.is_torch))
    per_param = 16  # weight, gradient and two optimizer moments, float32
    hypers = len(settings.hypers())
    options = settings.head_options()

    def params(c: Combo) -> int:
        return hypers * spec.parameters(c.dim, num_classes, options)

    def memory_cost(c: Combo) -> int:  # train rows kept, test rows while scoring
        return 4 * (n_train * spec.train_copies + n_test) * c.dim + per_param * params(c)

    def stream_cost(c: Combo, window: int = window_samples) -> int:  # one window of packed rows, and the chunks
        # read at a time, stored and pooled
        raw = sum(store.block_info(b)["channels"] * store.block_info(b)["grid"] ** 2 for b, _ in c.inputs)
        read_rows = 4 * settings.read_threads * store.chunk_samples  # stages.probe.features.Reader.chunks
        return 4 * window * c.dim + 4 * read_rows * (raw + c.dim) + per_param * params(c)

    mode = settings.data_mode
    if mode == "auto":
        fits = sum(memory_cost(c) for c in combos) <= left or all(memory_cost(c) <= left for c in combos)
        mode = "memory" if fits or not spec.is_torch else "stream"
    if mode == "stream" and not spec.is_torch:
        raise ProbeInputError(
            "the scikit-learn probes need their features in memory; use a torch head "
            "(--head linear) to stream, or --data-mode memory"
        )
    cost = memory_cost if mode == "memory" else stream_cost
    passes, current, used = [], [], 0
    for i, c in enumerate(combos):
        if current and used + cost(c) > left:
            passes.append(current)
            current, used = [], 0
        current.append(i)
        used += cost(c)
    passes.append(current)
    too_big = [c for c in combos if cost(c) > left]
    if too_big and mode == "stream" and explicit:
        raise _over_budget(too_big, stream_cost, settings, store, budget, floor, left, views)
    if too_big:
        log.warning(
            "%s need more than the memory budget (%s, %s of it for features) in %s mode; trying anyway",
            ", ".join(c.key for c in too_big),
            format_bytes(budget),
            format_bytes(max(left, 0)),
            mode,
        )
    return mode, passes, budget


def _over_budget(
    too_big: list[Combo],
    stream_cost,
    settings: ProbeSettings,
    store: FeatureStore,
    budget: int,
    floor: int,
    left: int,
    views: int,
) -> MemoryBudgetError:
    """The refusal: what each streamed input set needs, what the budget leaves, the largest --shuffle-window
    (whole store chunks) that fits every one of them in 7/8 of it, and the --memory-budget whose 7/8 fits the
    asked window."""
    cs = store.chunk_samples
    room = left - left // 8  # an eighth spare: the process's resident set varies a little from run to run
    chunks = min((room - stream_cost(c, 0)) // (4 * cs * views * c.dim) for c in too_big)
    need = max(stream_cost(c) for c in too_big)
    window = f"--shuffle-window {chunks * cs} or " if chunks >= 1 else ""
    keys = ", ".join(c.key for c in too_big) + (" needs" if len(too_big) == 1 else " need up to")
    return MemoryBudgetError(
        f"{keys} {format_bytes(need)} streamed (a {settings.shuffle_window}-sample "
        f"shuffle window), more than the {format_bytes(max(left, 0))} that --memory-budget {format_bytes(budget)} "
        f"leaves after the process's {format_bytes(floor)}; pass {window}--memory-budget "
        f"{_budget_text(floor + need + need // 7)}"
    )


# -- the plan -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbePlan:
    """A probe request resolved against its store: everything the sweeps need, decided before they run."""

    settings: ProbeSettings
    spec: HeadSpec
    store: FeatureStore = field(repr=False)
    combos: list[Combo]
    samples: Samples = field(repr=False)
    hypers: list[dict]
    num_classes: int
    mode: str  # "memory" or "stream"
    passes: list[list[int]]  # combo indices per pass
    budget: int
    window_chunks: int  # store chunks shuffled together
    epochs: int | None  # torch heads
    rungs: list[tuple[int, int]]  # successive halving: [(after epoch, keep)]
    views: int = 1  # views of the train split the heads train on (one per sample per epoch)

    @property
    def options(self) -> dict:
        options = self.settings.head_options()
        if self.spec.name == "diffssl-attention":  # DifFormer: the blocks of each timestep attend together
            options["steps"] = len(self.combos[0].timesteps) if self.combos else 1
        return options

    def schedule(self, epoch: int) -> list[Window]:
        """The batches of (0-based) `epoch`."""
        return epoch_schedule(
            self.samples,
            self.window_chunks,
            self.settings.batch_size,
            self.settings.seed,
            epoch,
            drop_last=self.settings.recipe is not None,
        )

    def record(self) -> dict:
        """What run.json records about the plan."""
        samples = self.samples
        return {
            "splits": samples.roles(self.settings),
            "combos": [
                {
                    "key": c.key,
                    "blocks": c.blocks,
                    "timesteps": c.timesteps,
                    "pool": c.pool,
                    "shapes": [list(s) for s in c.shapes],
                }
                for c in self.combos
            ],
            "samples": {
                "train": int(len(samples.fit.labels)),
                "fit": int(len(samples.fit)),
                "val": int(len(samples.selection)),
                "test": int(len(samples.test)),
                "test_total": int(len(samples.test.labels)),
            },
            "validation": {
                "split": samples.selection.split,
                "carved": samples.carved,
                "fraction": self.settings.val_fraction if samples.carved else None,
                "seed": self.settings.seed,
                "stratified": samples.carved,
                "size": int(len(samples.selection)),
                "indices_sha256": hashlib.sha256(samples.selection.index.astype(np.int64).tobytes()).hexdigest(),
            },
            "data_mode": self.mode,
            "passes": len(self.passes),
            "memory_budget": self.budget,
            "shuffle_window": self.window_chunks * samples.chunk_samples,
            "epochs": self.epochs,
            "halving": [{"after_epoch": e, "keep": k} for e, k in self.rungs] if self.spec.is_torch else None,
            "recipe": self.settings.recipe,
            "few_shot": None
            if self.settings.episode is None
            else {
                "shots": self.settings.episode[0],
                "episode": self.settings.episode[1],
                "seed": self.settings.seed,
                "rule": RULE,
                "indices_sha256": rows_digest(samples.fit.index),
            },
            "views": {
                "train": self.views,
                "stored": self.store.views(self.samples.fit.split),
                "choice": "stages.probe.plan.view_choice(seed, epoch, index, views)",
                "evaluation": "view 0 (the centre view)",
            },
        }


def make_plan(store: FeatureStore, settings: ProbeSettings) -> ProbePlan:
    """Resolve `settings` against `store` (see the module docstring); nothing is trained or written."""
    combos = plan_combos(store, settings)
    samples = select_samples(store, combos, settings)
    views = train_views(store, combos, settings, samples.fit.split)
    num_classes = len(store.classes) or int(max(samples.fit.labels.max(), samples.test.labels.max())) + 1
    window_chunks = max(1, settings.shuffle_window // samples.chunk_samples)
    mode, passes, budget = plan_passes(
        combos,
        settings,
        store,
        len(samples.fit.labels) * views,
        len(samples.test.labels),
        window_chunks * samples.chunk_samples * views,
        num_classes,
        views=views,
    )
    if mode == "stream" and settings.solver == "lbfgs":
        raise ProbeInputError(
            f"the features of this probe do not fit the memory budget ({format_bytes(budget)}) that "
            "--solver lbfgs needs; train with minibatches: add --solver minibatch"
        )
    epochs = rungs = None
    if settings.spec.is_torch:
        steps = sum(
            len(w.batches)
            for w in epoch_schedule(
                samples, window_chunks, settings.batch_size, settings.seed, 0, drop_last=settings.recipe is not None
            )
        )
        if steps == 0:
            raise ProbeInputError(
                f"{len(samples.fit)} fit rows make no full batch of {settings.batch_size} (the "
                f"recipe "
                "drops the last partial batch, as the paper's loader does); give a smaller "
                "--batch-size"
            )
        epochs = settings.num_epochs(steps)
        rungs = settings.rungs(epochs)
    return ProbePlan(
        settings,
        settings.spec,
        store,
        combos,
        samples,
        settings.hypers(len(samples.fit)),
        num_classes,
        mode,
        passes,
        budget,
        window_chunks,
        epochs,
        rungs or [],
        views,
    )


def train_views(store: FeatureStore, combos: list[Combo], settings: ProbeSettings, split: str) -> int:
    """How many views of the train split the heads train on: all stored ones, or `settings.views`; every
    view's requested arrays must be finished."""
    stored = store.views(split)
    views = stored if settings.views is None else settings.views
    if views > stored:
        raise ProbeInputError(
            f"{store.path} holds {stored} view(s) of {split!r}, not {views}: extract with "
            f"`pipeline extract ... --views {views}`, or ask for --views {stored} or fewer"
        )
    if views > 1 and not settings.spec.is_torch:
        log.info("%s fits once, not per epoch: it uses the centre view only", settings.spec.name)
        return 1
    arrays = sorted({pair for c in combos for pair in c.inputs})
    for view in range(1, views):
        name = store.view_split(split, view)
        unfinished = [(b, t) for b, t in arrays if store.missing_chunks(name, b, t)]
        if unfinished:
            raise IncompleteStoreError(
                f"{store.path}: view {view} of {split} is unfinished for "
                f"{', '.join(f'block {b} t {t}' for b, t in unfinished)}; finish the "
                f"extraction, "
                f"or train on fewer views (--views {view})"
            )
    return views
