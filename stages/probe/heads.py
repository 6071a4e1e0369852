"""Probe heads in torch, standalone and in banks that train many heads in one pass.

A *head* maps the features of one probe input set to class logits. Its inputs are a list of
pooled grids, one per (block, timestep) it reads, each (B, C_i, p, p):

    LinearHead     flatten and concatenate, optional batch norm without affine (MAE), one linear layer
    MLPHead        flatten and concatenate, hidden layers with ReLU, linear
    CNNHead        concatenate channels, two 3x3 conv + BN + ReLU, global average pool, linear
    AttentionHead  per input: layer norm and 1x1 projection to d channels; grid cells are tokens
                   (learned position/source embedding) after a learned class token; k pre-norm
                   transformer blocks; layer norm and linear on the class token

`Probe` wraps a head with the standardisation it was trained with, so a saved probe reads raw
features from the store; `save_probe` / `load_probe` write and read it (safetensors + json).

A *bank* holds the heads of a sweep, (input set x hyper-parameter set) members, and returns the
logits of all members at once, (M, B, K); each hyper-parameter set is its own optimizer param
group (DINOv2's linear eval). `FlatBank` computes linear and MLP heads of equal input size as
single batched matmuls, so a head costs little more than its share of the arithmetic;
`ModuleBank` holds one module per member (CNN, attention).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

FLAT_KINDS = ("linear", "mlp")
GRID_KINDS = ("cnn", "attention")
TORCH_KINDS = FLAT_KINDS + GRID_KINDS


def member_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run seed and a member's identity: independent of grouping and order."""
    text = json.dumps([int(seed), *[str(p) for p in parts]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# -- standalone heads -----------------------------------------------------------------------------
class LinearHead(nn.Module):
    """(B, C_i, p, p) inputs -> (B, K): flatten, concatenate, [BatchNorm1d(affine=False)], Linear."""

    def __init__(self, in_features: int, num_classes: int, *, batchnorm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(_flatten(inputs)))


class MLPHead(nn.Module):
    """(B, C_i, p, p) inputs -> (B, K): flatten, concatenate, [BN], (Linear, ReLU) per hidden size, Linear."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (1024,), batchnorm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

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

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.body(torch.cat(inputs, dim=1)))


class AttentionHead(nn.Module):
    """Inputs (B, C_i, p_i, p_i) -> (B, K): grid cells of every input as tokens, a class token, k blocks.

    `inputs` lists (channels, grid) per input; each input has its own layer norm, 1x1 projection to
    `dim` and learned embedding per cell (which also tells the inputs apart when fused).
    """

    def __init__(self, inputs: Sequence[tuple[int, int]], num_classes: int, *, dim: int = 256, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the attention dim ({dim}) must be divisible by the number of heads ({heads})")
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c, _ in inputs)
        self.projections = nn.ModuleList(nn.Linear(c, dim) for c, _ in inputs)
        self.positions = nn.ParameterList(nn.Parameter(torch.randn(g * g, dim) * 0.02) for _, g in inputs)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

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
    """A freshly initialised head; `inputs` lists (channels, grid) per input."""
    in_features = sum(c * g * g for c, g in inputs)
    if kind == "linear":
        return LinearHead(in_features, num_classes, batchnorm=bool(options.get("batchnorm", False)))
    if kind == "mlp":
        return MLPHead(in_features, num_classes, hidden=tuple(options.get("hidden", (1024,))),
                       batchnorm=bool(options.get("batchnorm", False)))
    if kind == "cnn":
        grids = {g for _, g in inputs}
        if len(grids) != 1 or min(grids) < 4:
            raise ValueError(f"the cnn head needs inputs on one grid of at least 4x4, got grids {sorted(grids)}")
        return CNNHead(sum(c for c, _ in inputs), num_classes, width=int(options.get("width", 256)))
    if kind == "attention":
        return AttentionHead(inputs, num_classes, dim=int(options.get("dim", 256)), depth=int(options.get("depth", 2)),
                             heads=int(options.get("heads", 4)))
    raise ValueError(f"unknown head {kind!r}; torch heads are {', '.join(TORCH_KINDS)}")


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


# -- banks -----------------------------------------------------------------------------------------
class FlatBank(nn.Module):
    """Linear or MLP heads for many input sets x hyper-parameter sets, computed group by group.

    Input sets whose flattened size D is equal form a group; a group's features come as one tensor
    (G, B, D). Per layer and hyper-parameter set l the weights are (G, out, in) (nn.Linear's
    layout); the L sets are concatenated so that each layer is one batched matmul for the whole
    group. Activations are kept features-major, (G*L, features, B): the layers chain without copies
    and the softmax over K classes runs across contiguous samples, which on a CPU is several times
    faster than over a last dimension of K. Members are ordered input set (`dims` order) major,
    hyper-parameter set minor: member = index * L + l.

    `keep` retires members (successive halving): forward and loss then compute only the active
    members, the same number per input set, so each layer stays one batched matmul per group.
    """

    def __init__(self, dims: Sequence[int], num_hypers: int, num_classes: int, *, hidden: Sequence[int] = (),
                 batchnorm: bool = False, seeds: Sequence[Sequence[int]] | None = None):
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.L, self.K, self.hidden, self.batchnorm = int(num_hypers), int(num_classes), tuple(hidden), batchnorm
        self.groups = group_by_dim(self.dims)  # input-set indices per group
        seeds = seeds or [[i * self.L + l for l in range(self.L)] for i in range(len(self.dims))]
        self.weights = nn.ParameterList()  # slot of (group, layer, l) -> (G, out, in)
        self.biases = nn.ParameterList()  # (G, out, 1)
        self._slot = {}
        for g, members in enumerate(self.groups):
            sizes = [self.dims[members[0]], *self.hidden, self.K]
            if batchnorm:
                self.register_buffer(f"bn_mean{g}", torch.zeros(len(members), sizes[0]))
                self.register_buffer(f"bn_var{g}", torch.ones(len(members), sizes[0]))
            for layer, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                for l in range(self.L):
                    w = torch.empty(len(members), b, a)
                    bias = torch.empty(len(members), b, 1)
                    for j, i in enumerate(members):
                        generator = torch.Generator().manual_seed(int(seeds[i][l]) + layer)
                        w[j], bias[j, :, 0] = _init_linear(a, b, generator, linear_probe=not self.hidden)
                    self._slot[(g, layer, l)] = len(self.weights)
                    self.weights.append(nn.Parameter(w))
                    self.biases.append(nn.Parameter(bias))
        self._active = None  # None: every member; else per set the active hyper-parameter indices
        self._picks = {}  # (group, device) -> (G, n) index of the active hyper-parameter sets

    @property
    def num_members(self) -> int:
        return len(self.dims) * self.L

    @property
    def active(self) -> list[int]:
        """Indices of the members that forward and loss compute, in the order forward returns them."""
        if self._active is None:
            return list(range(self.num_members))
        return [i * self.L + l for i in range(len(self.dims)) for l in self._active[i]]

    def keep(self, members: Sequence[int]) -> None:
        """Compute only these members from now on; every input set must keep the same number of them."""
        per_set = [sorted(l for i2, l in map(self.member, set(members)) if i2 == i) for i in range(len(self.dims))]
        if len({len(ls) for ls in per_set}) != 1 or not per_set[0]:
            raise ValueError(f"every input set must keep the same number (>= 1) of members, got {per_set}")
        self._active = None if len(per_set[0]) == self.L else per_set
        self._picks = {}

    def _pick(self, g: int, device: torch.device) -> torch.Tensor | None:
        if self._active is None:
            return None
        if (g, device) not in self._picks:
            self._picks[(g, device)] = torch.tensor([self._active[i] for i in self.groups[g]], device=device)
        return self._picks[(g, device)]

    def member(self, index: int) -> tuple[int, int]:
        """(input-set index, hyper-parameter index) of a member."""
        return divmod(index, self.L)

    def param_groups(self, hypers: Sequence[dict]) -> list[dict]:
        """One optimizer param group per hyper-parameter set (and weights/biases, biases without decay)."""
        out = []
        for l, hyper in enumerate(hypers):
            slots = [slot for (g, layer, ll), slot in self._slot.items() if ll == l]
            out.append({"params": [self.weights[s] for s in slots], "lr": hyper["lr"],
                        "weight_decay": hyper["weight_decay"], "hyper": l})
            out.append({"params": [self.biases[s] for s in slots], "lr": hyper["lr"], "weight_decay": 0.0,
                        "hyper": l})
        return out

    def forward(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """groups[g]: (G_g, B, D_g) features of the group's input sets -> (M, B, K) logits of the active
        members, in `active` order."""
        out = [None] * len(self.dims)
        for g, x in enumerate(groups):
            logits = self._group_logits(g, x).transpose(2, 3)  # (G, n, B, K)
            for j, i in enumerate(self.groups[g]):
                out[i] = logits[j]
        return torch.cat(out, dim=0)  # (len(dims) * n, B, K)

    def loss(self, groups: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum over active members of each member's mean cross-entropy (so each gets its own gradient)."""
        total = 0.0
        for g, x in enumerate(groups):
            logits = self._group_logits(g, x)  # (G, L, K, B)
            G, L, _, B = logits.shape
            picked = logits.gather(2, labels.view(1, 1, 1, B).expand(G, L, 1, B)).squeeze(2)
            total = total + (torch.logsumexp(logits, dim=2) - picked).sum()
        return total / labels.shape[0]

    def _group_logits(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """(G, B, D) features of group g -> (G, n, K, B) logits of its n active members per input set."""
        if self.batchnorm:
            x = self._batchnorm(g, x)
        G, B = x.shape[0], x.shape[1]
        h = x.transpose(1, 2)  # (G, D, B), a view: the matmul reads it transposed
        layers = len(self.hidden) + 1
        for layer in range(layers):
            slots = [self._slot[(g, layer, l)] for l in range(self.L)]
            w = torch.stack([self.weights[s] for s in slots], dim=1)  # (G, L, out, in)
            b = torch.stack([self.biases[s] for s in slots], dim=1)
            pick = self._pick(g, w.device)
            if pick is not None:  # the active members only (retired ones get zero gradients)
                sets = torch.arange(G, device=w.device)[:, None]
                w, b = w[sets, pick], b[sets, pick]  # (G, n, out, in)
            n = w.shape[1]
            if layer == 0:
                h = torch.baddbmm(b.flatten(1, 2), w.flatten(1, 2), h).view(G * n, -1, B)  # (G*n, out, B)
            else:
                h = torch.baddbmm(b.flatten(0, 1), w.flatten(0, 1), h)
            if layer + 1 < layers:
                h = F.relu(h)
        return h.view(G, -1, self.K, B)

    def _batchnorm(self, g: int, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm1d(affine=False) per input set; members of an input set see the same batches,
        # so one set of running statistics serves all of its hyper-parameter sets exactly.
        mean, var = getattr(self, f"bn_mean{g}"), getattr(self, f"bn_var{g}")
        if self.training:
            batch_mean = x.mean(dim=1)
            batch_var = x.var(dim=1, unbiased=False)
            with torch.no_grad():
                n = x.shape[1]
                mean.mul_(0.9).add_(batch_mean, alpha=0.1)
                var.mul_(0.9).add_(batch_var * (n / max(n - 1, 1)), alpha=0.1)
            return (x - batch_mean[:, None]) / torch.sqrt(batch_var[:, None] + 1e-5)
        return (x - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5)

    def export(self, index: int) -> nn.Module:
        """Member `index` as a standalone LinearHead / MLPHead with the same weights (CPU, eval mode)."""
        i, l = self.member(index)
        g = next(g for g, members in enumerate(self.groups) if i in members)
        j = self.groups[g].index(i)
        if self.hidden:
            head = MLPHead(self.dims[i], self.K, hidden=self.hidden, batchnorm=self.batchnorm)
            linears = list(head.layers)
        else:
            head = LinearHead(self.dims[i], self.K, batchnorm=self.batchnorm)
            linears = [head.linear]
        with torch.no_grad():
            for layer, linear in enumerate(linears):
                slot = self._slot[(g, layer, l)]
                linear.weight.copy_(self.weights[slot][j])
                linear.bias.copy_(self.biases[slot][j, :, 0])
            if self.batchnorm:
                head.norm.running_mean.copy_(getattr(self, f"bn_mean{g}")[j])
                head.norm.running_var.copy_(getattr(self, f"bn_var{g}")[j])
        return head.cpu().eval()


def group_by_dim(dims: Sequence[int]) -> list[list[int]]:
    """Indices of equal values, groups ordered by value: how FlatBank groups its input sets."""
    return [[i for i, d in enumerate(dims) if d == value] for value in sorted(set(dims))]


def _init_linear(fan_in: int, fan_out: int, generator: torch.Generator, *, linear_probe: bool):
    """(out, in) weight and (out,) bias: DINOv2's N(0, 0.01) / zero for a linear probe, else nn.Linear's."""
    if linear_probe:
        return torch.randn(fan_out, fan_in, generator=generator) * 0.01, torch.zeros(fan_out)
    bound = 1.0 / fan_in**0.5
    weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
    return weight, (torch.rand(fan_out, generator=generator) * 2 - 1) * bound


class ModuleBank(nn.Module):
    """One head module per (input set, hyper-parameter set) member, same member order as FlatBank."""

    def __init__(self, kind: str, inputs: Sequence[Sequence[tuple[int, int]]], num_hypers: int, num_classes: int,
                 options: dict, seeds: Sequence[Sequence[int]]):
        super().__init__()
        self.L = int(num_hypers)
        self.num_sets = len(inputs)
        heads = []
        for i, shapes in enumerate(inputs):
            for l in range(self.L):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seeds[i][l]))
                    heads.append(build_head(kind, shapes, num_classes, options))
        self.heads = nn.ModuleList(heads)
        self.active = list(range(len(heads)))  # the members forward and loss compute

    @property
    def num_members(self) -> int:
        return len(self.heads)

    def keep(self, members: Sequence[int]) -> None:
        """Compute only these members from now on (successive halving); retired heads get no gradient."""
        self.active = sorted(set(int(m) for m in members))

    def member(self, index: int) -> tuple[int, int]:
        return divmod(index, self.L)

    def param_groups(self, hypers: Sequence[dict]) -> list[dict]:
        out = []
        for index, head in enumerate(self.heads):
            l = index % self.L
            decay = [p for p in head.parameters() if p.ndim >= 2]
            rest = [p for p in head.parameters() if p.ndim < 2]
            out.append({"params": decay, "lr": hypers[l]["lr"], "weight_decay": hypers[l]["weight_decay"], "hyper": l})
            out.append({"params": rest, "lr": hypers[l]["lr"], "weight_decay": 0.0, "hyper": l})
        return out

    def forward(self, sets: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """sets[i]: the input tensors of input set i -> (M, B, K) logits of the active members."""
        return torch.stack([self.heads[m](*sets[m // self.L]) for m in self.active])

    def loss(self, sets: Sequence[Sequence[torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        """Sum over active members of each member's mean cross-entropy."""
        return sum(F.cross_entropy(self.heads[m](*sets[m // self.L]), labels) for m in self.active)

    def export(self, index: int) -> nn.Module:
        return copy.deepcopy(self.heads[index]).cpu().eval()
