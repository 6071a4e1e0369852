"""The head kinds a probe can train, as data: one row per head (timm keeps its layers as data the same way).

A row says which family trains the head, where its class is, its default hyper-parameter grid and
epochs, which settings configure it, how its features are standardised, and what it costs in
memory. The command line's choices, the settings' checks, the planner, the sweeps and saved probes
all read these rows, so adding a head is one row here and one class beside the others:

- `FLAT` heads (linear, MLP) train as one batched bank of matmuls (`stages.probe.banks.FlatBank`);
- `GRID` heads (CNN, attention) read pooled grids, one module per member (`ModuleBank`); their class
  has `build(inputs, num_classes, **options)`;
- `SKLEARN` probes are estimators that fit their whole grid at once (`stages.probe.sklearn_probes`);
  their constructor takes the grid under the name of its setting (`Cs=...`).

This module imports neither torch nor scikit-learn, so `pipeline --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from itertools import product

from cache.errors import ConfigError

FLAT, GRID, SKLEARN = "flat", "grid", "sklearn"


@dataclass(frozen=True)
class GridAxis:
    """One hyper-parameter of a head's grid: its column in configs.csv, the setting that overrides it."""

    name: str  # e.g. "lr", "C": the configs.csv column and the key in each hyper-parameter set
    setting: str  # the ProbeSettings field holding a user's grid, e.g. "lrs", "Cs"
    default: tuple


def _no_parameters(dim: int, num_classes: int, options: dict) -> int:
    return 0


def _linear_parameters(dim: int, num_classes: int, options: dict) -> int:
    return (dim + 1) * num_classes


def _mlp_parameters(dim: int, num_classes: int, options: dict) -> int:
    sizes = [dim, *options.get("hidden", ()), num_classes]
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


@dataclass(frozen=True)
class HeadSpec:
    name: str
    family: str  # FLAT, GRID or SKLEARN
    implementation: str  # "module:Class"
    grid: tuple[GridAxis, ...]  # the hyper-parameter grid, outermost axis first
    summary: str
    options: tuple[tuple[str, str], ...] = ()  # (head option, ProbeSettings field)
    epochs: int | None = None  # default epochs of a torch head (raised on small data to reach min_steps)
    min_steps: int = 300
    standardisation: str = "per feature"  # or "per channel" (mean and std over the cells of each channel)
    min_grid: int = 1  # the smallest pooled grid the head accepts
    train_copies: int = 1  # copies of the train features the probe holds at once (memory planning)
    saved_as: str | None = None  # scikit-learn: the torch head its fitted weights are saved as
    parameters: Callable[[int, int, dict], int] = _no_parameters  # trained parameters of one member

    @property
    def is_torch(self) -> bool:
        return self.family != SKLEARN

    def load(self) -> type:
        """The head's class (imported on first use)."""
        module, name = self.implementation.split(":")
        return getattr(import_module(module), name)

    def options_from(self, settings) -> dict:
        """The head's options, taken from the settings fields its row names."""
        return {option: _plain(getattr(settings, field)) for option, field in self.options}

    def hypers(self, settings) -> list[dict]:
        """Every hyper-parameter set of the grid (settings override the defaults), outermost axis first."""
        values = []
        for axis in self.grid:
            chosen = getattr(settings, axis.setting, None)
            values.append(axis.default if chosen is None else chosen)
        return [{axis.name: _plain(v) for axis, v in zip(self.grid, combo)} for combo in product(*values)]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec(
            "linear",
            FLAT,
            "stages.probe.heads:LinearHead",
            # 0.1 and 0.3 were never selected in bench/probe.py runs (standardised features, AdamW)
            (GridAxis("lr", "lrs", (1e-3, 3e-3, 1e-2, 3e-2)), GridAxis("weight_decay", "weight_decays", (1e-4,))),
            "one linear layer on flattened features (DINOv2's linear eval)",
            options=(("batchnorm", "batchnorm"),),
            epochs=10,
            min_steps=200,  # a convex probe needs fewer steps than the others (bench/probe.py)
            parameters=_linear_parameters,
        ),
        HeadSpec(
            "mlp",
            FLAT,
            "stages.probe.heads:MLPHead",
            (GridAxis("lr", "lrs", (1e-4, 3e-4, 1e-3)), GridAxis("weight_decay", "weight_decays", (1e-4,))),
            "hidden layers with ReLU on flattened features",
            options=(("hidden", "hidden"), ("batchnorm", "batchnorm")),
            epochs=20,
            parameters=_mlp_parameters,
        ),
        HeadSpec(
            "cnn",
            GRID,
            "stages.probe.heads:CNNHead",
            (GridAxis("lr", "lrs", (1e-4, 3e-4, 1e-3)), GridAxis("weight_decay", "weight_decays", (0.05,))),
            "two 3x3 convolutions on a pooled grid of at least 4x4",
            options=(("width", "width"),),
            epochs=20,
            standardisation="per channel",
            min_grid=4,
        ),
        HeadSpec(
            "attention",
            GRID,
            "stages.probe.heads:AttentionHead",
            (GridAxis("lr", "lrs", (1e-4, 3e-4, 1e-3)), GridAxis("weight_decay", "weight_decays", (0.05,))),
            "a small transformer over the grid cells of every input",
            options=(("dim", "dim"), ("depth", "depth"), ("heads", "attention_heads")),
            epochs=20,
            standardisation="per channel",
        ),
        # The paper's attention head and DifFormer fusion (stages.probe.diffssl); `--recipe diffssl --head attention`
        # trains it with the paper's recipe, `--head diffssl-attention` with the project's own training.
        HeadSpec(
            "diffssl-attention",
            GRID,
            "stages.probe.diffssl:DiffSSLAttention",
            (GridAxis("lr", "lrs", (1e-4, 3e-4, 1e-3)), GridAxis("weight_decay", "weight_decays", (0.05,))),
            "the paper's attention head: LayerNorm, 1x1 conv to d, cls token, k blocks (DifFormer when fused)",
            options=(("dim", "dim"), ("depth", "depth"), ("heads", "attention_heads")),
            epochs=20,
            standardisation="per channel",
        ),
        # C in half-decades from 1e-4 to 1e3: the best C of a converged fit fell outside 1e-3..10 on digits'
        # low-dimensional input sets (bench/converge.py)
        HeadSpec(
            "logreg",
            SKLEARN,
            "stages.probe.sklearn_probes:LogRegProbe",
            (GridAxis("C", "Cs", tuple(round(10.0 ** (e / 2), 12) for e in range(-8, 7))),),
            "scikit-learn's multinomial logistic regression",
            options=(("refit", "refit"),),
            saved_as="linear",
        ),
        HeadSpec(
            "knn",
            SKLEARN,
            "stages.probe.sklearn_probes:KNNProbe",
            (GridAxis("k", "ks", (1, 5, 10, 20, 50, 100)),),
            "k nearest neighbours by cosine similarity",
            options=(("vote", "vote"), ("temperature", "temperature")),
            train_copies=2,
        ),
        HeadSpec(
            "ridge",
            SKLEARN,
            "stages.probe.sklearn_probes:RidgeProbe",
            (GridAxis("alpha", "alphas", (1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)),),
            "one-vs-rest ridge regression",
            saved_as="linear",
        ),
    )
}


def head_spec(name: str) -> HeadSpec:
    """The row of head `name`; an unknown name is an error listing the known ones."""
    try:
        return HEADS[name]
    except KeyError:
        raise ConfigError(f"unknown head {name!r}; choose from {', '.join(HEADS)}") from None


def default_grid(head: str) -> tuple:
    """The default values of a single-axis head's grid (the scikit-learn probes)."""
    (axis,) = HEADS[head].grid
    return axis.default


GRID_COLUMNS = tuple(dict.fromkeys(axis.name for spec in HEADS.values() for axis in spec.grid))
