"""Banks: the heads of a sweep, trained together in the same passes over the data.

A *bank* holds (input set x hyper-parameter set) members and returns the logits of all members at
once, (M, B, K); each hyper-parameter set is its own optimizer param group (DINOv2's linear eval).
`FlatBank` computes linear and MLP heads of equal input size as single batched matmuls, so a head
costs little more than its share of the arithmetic; `ModuleBank` holds one module per member (CNN,
attention). Members are seeded from their identity (`member_seed`), never from their position.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import ConfigError
from stages.probe.heads import LinearHead, MLPHead, build_head


def member_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run seed and a member's identity: independent of grouping and order."""
    text = json.dumps([int(seed), *[str(p) for p in parts]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class FlatBank(nn.Module):
    """Linear or MLP heads for many input sets x hyper-parameter sets, computed group by group.

    Input sets whose flattened size D is equal form a group; a group's features come as one tensor
    (G, B, D). Per layer and hyper-parameter set l the weights are (G, out, in) (nn.Linear's
    layout); the L sets are concatenated so that each layer is one batched matmul for the whole
    group. Activations are kept features-major, (G*L, features, B): the layers chain without copies
    and the softmax over K classes runs across contiguous samples, which on a CPU is several times
    faster than over a last dimension of K. Members are ordered input set (`dims` order) major,
    hyper-parameter set minor: member = index * L + l.

    `default_init` gives every layer nn.Linear's initialisation (the paper's recipe), not only the hidden
    layers of an MLP (a linear probe's is otherwise DINOv2's N(0, 0.01)).

    `keep` retires members (successive halving): forward and loss then compute only the active
    members, the same number per input set, so each layer stays one batched matmul per group.
    """

    def __init__(self, dims: Sequence[int], num_hypers: int, num_classes: int, *, hidden: Sequence[int] = (),
                 batchnorm: bool = False, seeds: Sequence[Sequence[int]] | None = None, default_init: bool = False):
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
                        w[j], bias[j, :, 0] = _init_linear(a, b, generator,
                                                           linear_probe=not self.hidden and not default_init)
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
            raise ConfigError(f"every input set must keep the same number (>= 1) of members, got {per_set}")
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


def fit_lbfgs(bank: FlatBank, features: Sequence[torch.Tensor], labels: torch.Tensor, decays: Sequence[float], *,
              max_iter: int = 500, history: int = 20) -> int:
    """Train every member of a linear `bank` to the optimum of its L2-regularised multinomial logistic loss,

        mean_i CE(W x_i + b, y_i) + weight_decay_l / 2 * ||W||^2      (b not decayed),

    which is scikit-learn's LogisticRegression(C) at weight_decay = 1 / (C n), by full-batch L-BFGS with a
    strong-Wolfe line search. `features` are the bank's groups (G, n, D) of all n fit rows. The members'
    objectives share no parameter, so their sum is minimised where each is: one L-BFGS run per
    hyper-parameter set trains it for every input set of a group of equal size with batched matmuls, the
    sets in order of decreasing decay, each starting from the previous one's optimum (the objective is
    strictly convex: the start changes the path, not the optimum). Returns the most iterations of a run.
    """
    if bank.hidden or bank.batchnorm:
        raise ConfigError("L-BFGS trains plain linear heads only (no hidden layers, no batch norm)")
    bank.train()
    bank.double()  # in float32 the summed loss stops improving before the least-regularised members converge
    labels = labels.to(features[0].device)
    most = 0
    for g, x in enumerate(features):
        x = x.double()
        B = x.shape[1]
        previous = None
        # one run per hyper-parameter set, each at its own pace, from the strongest decay down, each warm-started
        # from the previous optimum (as scikit-learn's _logistic_regression_path does along C)
        for l in sorted(range(bank.L), key=lambda l: -float(decays[l])):
            slot, decay = bank._slot[(g, 0, l)], float(decays[l])
            weight, bias = bank.weights[slot], bank.biases[slot]
            if previous is not None:
                with torch.no_grad():
                    weight.copy_(previous[0])
                    bias.copy_(previous[1])
            previous = (weight, bias)
            optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=history,
                                          tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

            def closure(x=x, weight=weight, bias=bias, decay=decay, optimizer=optimizer, B=B):
                optimizer.zero_grad(set_to_none=True)
                logits = torch.baddbmm(bias, weight, x.transpose(1, 2))  # (G, K, B)
                picked = logits.gather(1, labels.view(1, 1, B).expand(logits.shape[0], 1, B)).squeeze(1)
                loss = (torch.logsumexp(logits, dim=1) - picked).sum() / B + 0.5 * decay * weight.pow(2).sum()
                loss.backward()
                return loss

            optimizer.step(closure)
            most = max(most, int(optimizer.state[optimizer._params[0]].get("n_iter", 0)))
    bank.float()
    return most


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
