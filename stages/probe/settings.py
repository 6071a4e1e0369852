"""What a probe run is asked to do: `ProbeSettings`, checked in one place, and the halving schedule.

Every check reads the same way ("The 'C' parameter of LogisticRegression must be ...", as in
scikit-learn) and raises `ConfigError`. Head-specific defaults (grids, epochs, options) come from
the head's row in `stages.probe.registry`. Imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np

from cache.errors import ConfigError
from stages.probe.protocols import PROTOCOLS, protocol_settings
from stages.probe.recipes import RECIPE_HEAD_KIND, RECIPE_HEADS, RECIPES
from stages.probe.registry import HEADS, default_grid, head_spec

# The L-BFGS linear head minimises mean cross-entropy + weight_decay / 2 * ||W||^2, which is scikit-learn's
# LogisticRegression(C) at weight_decay = 1 / (C n) on n fit rows: by default its grid is logreg's C grid in
# those terms (`ProbeSettings.hypers`), so a converged linear head and logreg choose alike.
SOLVERS = ("lbfgs", "minibatch")


def check_grid(owner: str, name: str, values, *, integer: bool = False, low: float = 0.0) -> tuple:
    """A hyper-parameter grid as a tuple of floats (ints if `integer`), each above `low`; else ConfigError."""
    kind = "integers" if integer else "floats"
    message = (
        f"The {name!r} parameter of {owner} must be a non-empty sequence of {kind} in the range "
        f"({low}, inf). Got {values!r} instead."
    )
    try:
        items = tuple(values)
    except TypeError:
        raise ConfigError(message) from None
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in items):
        raise ConfigError(message)
    if any(not v > low or not np.isfinite(v) for v in items) or (integer and any(int(v) != v for v in items)):
        raise ConfigError(message)
    return tuple(int(v) for v in items) if integer else tuple(float(v) for v in items)


# What a setting left None becomes when no recipe fixes it (a recipe's values come first); the command
# line's help reads them from here.
DEFAULTS_OF_NONE = {
    "batch_size": 256,
    "optimizer": "adamw",
    "halving": True,
    "dim": 256,
    "depth": 2,
    "attention_heads": 4,
    "warmup": 0.05,
}
EPISODES_WITH_SHOTS = 5  # few-shot subsets per shot count when --shots is given without --episodes
VOTES = ("softmax", "distance", "uniform")  # kNN votes (stages.probe.sklearn_probes.KNNProbe)


def check_vote(owner: str, vote, temperature) -> None:
    """kNN's vote and temperature, checked as scikit-learn checks its parameters; else ConfigError."""
    if vote not in VOTES:
        raise ConfigError(
            f"The 'vote' parameter of {owner} must be a str among {{{', '.join(map(repr, VOTES))}}}. "
            f"Got {vote!r} instead."
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.integer, np.floating))
        or not 0.0 < temperature < np.inf
    ):
        raise ConfigError(
            f"The 'temperature' parameter of {owner} must be a float in the range (0.0, inf). "
            f"Got {temperature!r} instead."
        )


@dataclass(frozen=True)
class ProbeSettings:
    """Everything a probe run depends on; recorded in run.json. None means "the default for this head".

    `recipe` ("diffssl": `stages.probe.recipes`) trains as the paper's code does; settings it fixes
    that are left None take the recipe's value, settings given explicitly override it.

    Split roles: the heads train on `train_split`; hyper-parameters are chosen on `val_split` (an
    official validation split) or, when it is None, on a stratified `val_fraction` of `train_split`
    carved out with `seed`; the chosen configuration is scored once on `test_split` (None: the
    store's "test" split if it has one, else its "val" split).
    """

    store: str  # a local path or an fsspec URL (s3://...)
    head: str
    storage_options: dict | None = None  # fsspec options of an object store (credentials come from the environment)
    out: str = "results"
    name: str | None = None  # result sub-directory; default: the head (with "_fused")
    blocks: tuple[int, ...] | None = None  # None: every block in the store
    timesteps: tuple[int, ...] | None = None  # None: every stored timestep of each block
    pools: tuple[int, ...] | None = None  # None: the pools the store was extracted for
    fuse: bool = False  # one head over all requested blocks x timesteps (per pool)
    train_split: str = "train"
    val_split: str | None = None
    test_split: str | None = None
    epochs: int | None = None  # None: the head's default, raised on small data to reach its minimum steps
    batch_size: int | None = None  # None: 256 (the recipe's: 128)
    lrs: tuple[float, ...] | None = None
    weight_decays: tuple[float, ...] | None = None
    optimizer: str | None = None  # None: adamw (the recipe's: sgd without momentum)
    warmup: float | None = None  # share of steps with a linear warm-up, then cosine decay to 0; None: 0.05
    halving: bool | None = None  # successive halving over each input set's hyper-parameter sets; None: on
    solver: str | None = None  # linear: "lbfgs" (full batch, in memory) or "minibatch"; None: see `_solver`
    lbfgs_iterations: int = 1000  # the most L-BFGS iterations per precision (each one pass over the fit rows, or a few)
    standardise: bool | None = None  # None: standardise per feature / channel (a recipe or protocol may say raw)
    protocol: str | None = None  # "default", "diffssl", "dinov2": stages.probe.protocols
    batchnorm: bool = False  # linear / mlp: BatchNorm1d without affine before the head (MAE)
    hidden: tuple[int, ...] = (1024,)  # mlp hidden sizes
    width: int = 256  # cnn channels
    dim: int | None = None  # attention: token width d; None: 256 (the recipe's: 1024)
    depth: int | None = None  # attention: transformer blocks k; None: 2
    attention_heads: int | None = None  # None: 4 (the recipe's: 8)
    recipe: str | None = None  # "diffssl": the paper's training (stages.probe.recipes)
    views: int | None = None  # augmented views the heads train on (one per sample per epoch); None: all stored
    Cs: tuple[float, ...] | None = None  # None: the head's default grid (or the protocol's)
    ks: tuple[int, ...] | None = None
    vote: str = "softmax"  # knn: each neighbour votes exp(sim / temperature) (DINOv2), 1 / distance, or 1
    temperature: float = 0.07  # knn: T of the softmax vote (DINOv2's)
    alphas: tuple[float, ...] | None = None
    refit: bool | None = None  # logreg: refit the chosen C on fit + validation rows before testing (DINOv2); None: no
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    memory_budget: int | None = None  # bytes for the process (features get what it does not hold); None: half free
    data_mode: str = "auto"  # auto | memory | stream
    shuffle_window: int = 65536  # samples shuffled together (rounded to whole store chunks)
    allow_incomplete: bool = False
    read_threads: int = 4
    threads: int | None = None  # CPU threads for torch and BLAS during the run; None: the libraries' default
    seeds: tuple[int, ...] | None = None  # retrain the chosen configuration once per seed (stages.probe.repeats)
    shots: tuple[int, ...] | None = None  # few-shot: train on this many rows per class (stages.probe.fewshot)
    episodes: int | None = None  # few-shot: seeded subsets per shot count; None: 5 with shots
    episode: tuple[int, int] | None = None  # (shots, episode): this run trains on that few-shot subset only

    def __post_init__(self):
        def fail(name, what, value):
            raise ConfigError(f"The {name!r} setting of the probe must be {what}. Got {value!r} instead.")

        if self.head not in HEADS:
            fail("head", f"one of {', '.join(HEADS)}", self.head)
        if self.protocol is not None:
            if self.protocol not in PROTOCOLS:
                fail("protocol", f"one of {', '.join(PROTOCOLS)}", self.protocol)
            known = {f.name for f in fields(self)}
            for name, value in protocol_settings(self.protocol, self.head).items():
                # names not (yet) settings are skipped: kNN's vote and temperature come from branch h-protocols
                if name in known and getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        if self.recipe is not None:
            if self.recipe not in RECIPES:
                fail("recipe", f"one of {', '.join(RECIPES)} or None", self.recipe)
            if self.head not in RECIPE_HEADS:
                fail("head", f"one of {', '.join(RECIPE_HEADS)} with recipe {self.recipe!r}", self.head)
            for name, value in RECIPES[self.recipe][self.head].items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        defaults = {
            **DEFAULTS_OF_NONE,
            "standardise": self.recipe is None,
            "solver": self._solver(),
            "Cs": default_grid("logreg"),
            "ks": default_grid("knn"),
            "alphas": default_grid("ridge"),
            "refit": False,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.solver not in SOLVERS:
            fail("solver", "'lbfgs' or 'minibatch'", self.solver)
        if self.solver == "lbfgs":
            if self.head != "linear" or self.batchnorm or self.recipe is not None or self.data_mode == "stream":
                fail(
                    "solver",
                    "'minibatch' unless the head is linear, without --batchnorm, --recipe or --data-mode stream",
                    self.solver,
                )
            if self.lrs is None:
                object.__setattr__(self, "lrs", (1.0,))  # L-BFGS's first step; its line search sets the rest
        if (
            isinstance(self.lbfgs_iterations, bool)
            or not isinstance(self.lbfgs_iterations, (int, np.integer))
            or self.lbfgs_iterations < 1
        ):
            fail("lbfgs_iterations", "a positive integer", self.lbfgs_iterations)
        if self.views is not None and (isinstance(self.views, bool) or self.views < 1):
            fail("views", "a positive integer or None", self.views)
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
        if self.memory_budget is not None and not (0 < self.memory_budget < float("inf")):
            fail("memory_budget", "a positive, finite number of bytes or None", self.memory_budget)
        for name in ("blocks", "timesteps", "pools", "hidden"):
            value = getattr(self, name)
            low, kind = (0, "non-negative") if name == "timesteps" else (1, "positive")
            if value is not None and (not value or any(int(v) != v or v < low for v in value)):
                fail(name, f"a non-empty list of {kind} integers", value)
        for name in ("lrs", "weight_decays", "Cs", "alphas"):
            value = getattr(self, name)
            low = -1e-300 if name == "weight_decays" else 0.0
            if value is not None:
                object.__setattr__(self, name, check_grid("the probe", name, value, low=low))
        object.__setattr__(self, "ks", check_grid("the probe", "ks", self.ks, integer=True))
        check_vote("the probe", self.vote, self.temperature)
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            if not seeds or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in seeds):
                fail("seeds", "a non-empty list of non-negative integers (e.g. 0,1,2) or None", self.seeds)
            if len(set(seeds)) != len(seeds):
                fail("seeds", "a list of distinct seeds (a repeated seed repeats a number, it adds none)", self.seeds)
            object.__setattr__(self, "seeds", tuple(int(v) for v in seeds))
        if self.shots is not None:
            object.__setattr__(self, "shots", check_grid("the probe", "shots", self.shots, integer=True))
            if len(set(self.shots)) != len(self.shots):
                fail("shots", "a list of distinct shot counts", self.shots)
        if self.episodes is not None and self.shots is None:
            raise ConfigError(
                f"--episodes {self.episodes} has no effect without --shots; add --shots (e.g. --shots "
                "1,5,10) or leave --episodes out"
            )
        if self.shots is not None and self.episodes is None:
            object.__setattr__(self, "episodes", EPISODES_WITH_SHOTS)
        if self.episodes is not None and (
            isinstance(self.episodes, bool) or not isinstance(self.episodes, (int, np.integer)) or self.episodes < 1
        ):
            fail("episodes", "a positive integer (few-shot subsets per shot count)", self.episodes)
        if self.episode is not None:
            shots, episode = self.episode
            if int(shots) != shots or shots < 1 or int(episode) != episode or episode < 0:
                fail("episode", "(shots >= 1, episode >= 0) or None", self.episode)
            object.__setattr__(self, "episode", (int(shots), int(episode)))
        if self.name is not None and (
            not self.name or "/" in self.name or os.sep in self.name or self.name.startswith(".")
        ):
            fail("name", "a plain directory name", self.name)
        for name in ("train_split", "val_split", "test_split"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                fail(name, "the name of a split of the store", value)
        roles = [s for s in (self.train_split, self.val_split, self.test_split) if s is not None]
        if len(set(roles)) != len(roles):
            fail(
                "split roles",
                "three different splits (train, validation, test)",
                {"train": self.train_split, "val": self.val_split, "test": self.test_split},
            )
        if self.dim % self.attention_heads:
            fail("dim", f"divisible by attention_heads ({self.attention_heads})", self.dim)

    def _solver(self) -> str:
        """The default solver: L-BFGS for the linear head (batched over input sets and C values, converged:
        docs/probes.md), unless a setting only minibatches have is given (epochs, learning rates, optimizer,
        warm-up, batch size, halving, batch norm, a recipe, streaming) or the head is another."""
        minibatch_only = ("epochs", "lrs", "optimizer", "warmup", "batch_size", "halving", "recipe")
        if (
            self.head != "linear"
            or self.batchnorm
            or self.data_mode == "stream"
            or any(getattr(self, name) is not None for name in minibatch_only)
        ):
            return "minibatch"
        return "lbfgs"

    @property
    def spec(self):
        """The head's row in the registry (with a recipe, the row of the head the recipe trains)."""
        return head_spec(RECIPE_HEAD_KIND[self.recipe][self.head] if self.recipe else self.head)

    def num_epochs(self, steps_per_epoch: int) -> int:
        """The epochs asked for, or the head's default raised to reach its minimum number of steps."""
        if self.solver == "lbfgs":
            return 1  # one full-batch solve (`lbfgs_iterations` L-BFGS iterations at most)
        if self.epochs is not None:
            return self.epochs
        spec = self.spec
        return max(spec.epochs or 1, -(-spec.min_steps // max(1, steps_per_epoch)))

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        name = f"{self.head}_{self.recipe}" if self.recipe else self.head
        return f"{name}_fused" if self.fuse else name

    def hypers(self, n_fit: int | None = None) -> list[dict]:
        """The grid of each input set, in member order. The L-BFGS linear head without a weight-decay grid
        takes logreg's C grid as weight_decay = 1 / (C n_fit) (its length only, without `n_fit`); its rows keep
        their C, which reports show instead of the learning rate L-BFGS does not use."""
        rows = self.spec.hypers(self)
        if self.solver == "lbfgs" and self.weight_decays is None:
            n = max(1, int(n_fit or 1))
            rows = [
                {"lr": row["lr"], "weight_decay": 1.0 / (C * n), "C": C}
                for row in rows[:1]
                for C in sorted(self.Cs, reverse=True)
            ]
        return rows

    def rungs(self, epochs: int) -> list[tuple[int, int]]:
        """Where successive halving retires members: [(after epoch, keep per input set)]; [] without it."""
        use = self.halving and self.spec.is_torch and self.solver == "minibatch"
        return halving_rungs(len(self.hypers()), epochs) if use else []

    def head_options(self) -> dict:
        return self.spec.options_from(self)


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
