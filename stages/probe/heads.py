"""Probe heads in torch, standalone and in banks that train many heads in one pass.

A *head* maps the features of one probe input set to class logits. Its inputs are a list of
pooled grids, one per (block, timestep) it reads, each (B, C_i, p, p):

    LinearHead     flatten and concatenate, optional batch norm without affine (MAE), one linear layer
    MLPHead        flatten and concatenate, hidden layers with ReLU, linear
    CNNHead        concatenate channels, two 3x3 conv + BN + ReLU, global average pool, linear
    AttentionHead  per input: layer norm and 1x1 projection to d channels; grid cells are tokens
                   (learned position/source embedding) after a learned class token; k pre-norm
                   transformer blocks; layer norm and linear on the class token

Each class has `build(inputs, num_classes, **options)`, `inputs` listing (channels, grid) per input;
`build_head` finds the class of a head kind in `stages.probe.registry`. `Probe` wraps a head with the
standardisation it was trained with, so a saved probe reads raw features from the store;
`save_probe` / `load_probe` write and read it (safetensors + json). The sweeps train heads in banks
(`stages.probe.banks`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cache.errors import ConfigError
from stages.probe.registry import head_spec


def _in_features(inputs: Sequence[tuple[int, int]]) -> int:
    return sum(c * g * g for c, g in inputs)


# -- standalone heads -----------------------------------------------------------------------------
class LinearHead(nn.Module):
    """(B, C_i, p, p) inputs -> (B, K): flatten, concatenate, [BatchNorm1d(affine=False)], Linear."""

    def __init__(self, in_features: int, num_classes: int, *, batchnorm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes)

    @classmethod
    def build(cls, inputs: Sequence[tuple[int, int]], num_classes: int, *, batchnorm: bool = False) -> LinearHead:
        return cls(_in_features(inputs), num_classes, batchnorm=bool(batchnorm))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(_flatten(inputs)))


class MLPHead(nn.Module):
    """(B, C_i, p, p) inputs -> (B, K): flatten, concatenate, [BN], (Linear, ReLU) per hidden size, Linear."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (1024,), batchnorm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    @classmethod
    def build(
        cls,
        inputs: Sequence[tuple[int, int]],
        num_classes: int,
        *,
        hidden: Sequence[int] = (1024,),
        batchnorm: bool = False,
    ) -> MLPHead:
        return cls(_in_features(inputs), num_classes, hidden=tuple(hidden), batchnorm=bool(batchnorm))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = self.norm(_flatten(inputs))
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x


class CNNHead(nn.Module):
    """(B, C_i, p, p) inputs with equal p >= 4 -> (B, K): channels concatenated, two conv-BN-ReLU, pool, linear."""

    def __init__(self, channels: int, num_classes: int, *, width: int = 256):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.linear = nn.Linear(width, num_classes)

    @classmethod
    def build(cls, inputs: Sequence[tuple[int, int]], num_classes: int, *, width: int = 256) -> CNNHead:
        grids = {g for _, g in inputs}
        if len(grids) != 1 or min(grids) < 4:
            raise ConfigError(f"the cnn head needs inputs on one grid of at least 4x4, got grids {sorted(grids)}")
        return cls(sum(c for c, _ in inputs), num_classes, width=int(width))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.body(torch.cat(inputs, dim=1)))


class AttentionHead(nn.Module):
    """Inputs (B, C_i, p_i, p_i) -> (B, K): grid cells of every input as tokens, a class token, k blocks.

    `inputs` lists (channels, grid) per input; each input has its own layer norm, 1x1 projection to
    `dim` and learned embedding per cell (which also tells the inputs apart when fused).
    """

    def __init__(
        self, inputs: Sequence[tuple[int, int]], num_classes: int, *, dim: int = 256, depth: int = 2, heads: int = 4
    ):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the attention dim ({dim}) must be divisible by the number of heads ({heads})")
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c, _ in inputs)
        self.projections = nn.ModuleList(nn.Linear(c, dim) for c, _ in inputs)
        self.positions = nn.ParameterList(nn.Parameter(torch.randn(g * g, dim) * 0.02) for _, g in inputs)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    @classmethod
    def build(
        cls, inputs: Sequence[tuple[int, int]], num_classes: int, *, dim: int = 256, depth: int = 2, heads: int = 4
    ) -> AttentionHead:
        return cls(inputs, num_classes, dim=int(dim), depth=int(depth), heads=int(heads))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        tokens = [self.cls.expand(inputs[0].shape[0], -1, -1)]
        for x, norm, projection, position in zip(inputs, self.norms, self.projections, self.positions):
            cells = x.flatten(2).transpose(1, 2)  # (B, p*p, C)
            tokens.append(projection(norm(cells)) + position)
        encoded = self.blocks(torch.cat(tokens, dim=1))
        return self.linear(self.norm(encoded[:, 0]))


def _flatten(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.flatten(1) for x in inputs], dim=1)


def build_head(kind: str, inputs: Sequence[tuple[int, int]], num_classes: int, options: dict) -> nn.Module:
    """A freshly initialised head of a torch kind (`stages.probe.registry`); `inputs` lists (channels, grid)."""
    spec = head_spec(kind)
    if not spec.is_torch:
        raise ConfigError(f"{kind!r} is a scikit-learn probe, not a torch head")
    return spec.load().build(inputs, num_classes, **options)


# -- a head with its standardisation, saved and loaded ------------------------------------------------
class Probe(nn.Module):
    """Raw store features in, logits out: `(x_i - mean_i) / std_i` per input, then the head.

    mean_i, std_i are (C_i, p, p) (per feature) or (C_i, 1, 1) (per channel), from training samples only.
    """

    def __init__(self, head: nn.Module, means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor]):
        super().__init__()
        self.head = head
        self.count = len(means)
        for i, (mean, std) in enumerate(zip(means, stds)):
            self.register_buffer(f"mean{i}", torch.as_tensor(mean, dtype=torch.float32).clone())
            self.register_buffer(f"std{i}", torch.as_tensor(std, dtype=torch.float32).clone())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != self.count:
            raise ValueError(f"this probe reads {self.count} inputs, got {len(inputs)}")
        standard = [(x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}") for i, x in enumerate(inputs)]
        return self.head(*standard)


def save_probe(probe: Probe, path: str | Path, config: dict) -> None:
    """Write `<path>.safetensors` (weights, buffers) and `<path>.json` (what `load_probe` needs and more).

    `config` must hold kind, inputs [(channels, grid), ...], num_classes and options.
    """
    path = Path(path)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in probe.state_dict().items()}
    save_file(state, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(config, indent=2, default=_jsonable) + "\n")


def load_probe(path: str | Path) -> tuple[Probe, dict]:
    """The probe saved at `<path>.json` / `<path>.safetensors`, in eval mode, and its config."""
    path = Path(path)
    config = json.loads(path.with_suffix(".json").read_text())
    inputs = [tuple(map(int, pair)) for pair in config["inputs"]]
    head = build_head(config["kind"], inputs, int(config["num_classes"]), config.get("options", {}))
    state = load_file(str(path.with_suffix(".safetensors")))
    count = sum(1 for name in state if name.startswith("mean"))
    probe = Probe(head, [state[f"mean{i}"] for i in range(count)], [state[f"std{i}"] for i in range(count)])
    probe.load_state_dict(state)
    return probe.eval(), config


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to json")
