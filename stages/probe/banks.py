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
from stages.probe.logistic import Eigenbasis, fit_logistic


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

    def __init__(
        self,
        dims: Sequence[int],
        num_hypers: int,
        num_classes: int,
        *,
        hidden: Sequence[int] = (),
        batchnorm: bool = False,
        seeds: Sequence[Sequence[int]] | None = None,
        default_init: bool = False,
    ):
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
                        w[j], bias[j, :, 0] = _init_linear(
                            a, b, generator, linear_probe=not self.hidden and not default_init
                        )
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
            out.append(
                {
                    "params": [self.weights[s] for s in slots],
                    "lr": hyper["lr"],
                    "weight_decay": hyper["weight_decay"],
                    "hyper": l,
                }
            )
            out.append({"params": [self.biases[s] for s in slots], "lr": hyper["lr"], "weight_decay": 0.0, "hyper": l})
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


def fit_lbfgs(
    bank: FlatBank,
    features: Sequence[torch.Tensor],
    labels: torch.Tensor,
    decays: Sequence[float],
    *,
    validation: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    block: int = 5,
    patience: int = 3,
    neighbours: int = 1,
    margin: float = 0.025,
) -> tuple[set[int], dict]:
    """Train the members of a linear `bank` to the optimum of their L2-regularised multinomial logistic loss,

        mean_i CE(W x_i + b, y_i) + weight_decay_l / 2 * ||W||^2      (b not decayed),

    which is scikit-learn's LogisticRegression(C) at weight_decay = 1 / (C n), by batched L-BFGS
    (`stages.probe.logistic.fit_logistic`: float32, then float64 to max |gradient| <= `tol`, scikit-learn's
    meaning of its `tol`). `features` are the bank's groups (G, n, D) of all n fit rows.

    Along the regularisation path, strongest decay first, in blocks of `block` decays: the members of a block
    (every input set of a group x its decays) are solved at once, each starting from its input set's optimum
    at the previous block's weakest decay (as scikit-learn's `_logistic_regression_path` warm-starts along C;
    the first block starts from zero, as scikit-learn does). With `validation` ((G, m, D) groups, labels), an
    input set stops when it overfits: its validation loss rose over the last `patience` decays and its best
    validation top-1 (ties: lower loss, the rule `select` applies) lies `patience` or more decays behind.
    Weaker decays cost the most iterations and, past that point, do not win. (Top-1 alone on a small
    validation set is noisy: an input set of 4 features on digits peaked again 2 decades later.)

    With `validation`, the path runs in float32 only (to max |gradient| <= 100 `tol`, or until float32 stops
    improving the value) and float64 polishes, from those optima, only the decays selection may choose
    (`_polish`): per input set its validation best and `neighbours` decays either side, every decay whose
    validation top-1 is within `margin` (+ half a row) of the best, and every decay whose float32 run
    stopped short of its gradient test (weakly regularised members, where float32 cannot resolve the
    optimum). A float32 optimum's validation top-1 differed from the float64 one's by up to 2 of digits' 121
    rows (1.7 points) and 4 of the MNIST default's 400 (1.0): a margin of 1 row chose a C 1.5 points worse.
    float64 was most of the cost (2/3 of the member-iterations at twice the price). Without `validation` (an
    official validation split, scored later) every member is polished.
    Returns the members trained (bank numbering) and the iteration counts.
    """
    if bank.hidden or bank.batchnorm:
        raise ConfigError("L-BFGS trains plain linear heads only (no hidden layers, no batch norm)")
    labels = labels.to(features[0].device)
    order = sorted(range(bank.L), key=lambda l: -float(decays[l]))  # strongest decay first (the path's order)
    blocks = [order[i : i + block] for i in range(0, len(order), block)]
    trained, counts = set(), {}
    for g, x in enumerate(features):
        G, K, D = x.shape[0], bank.K, x.shape[2]
        basis = Eigenbasis.of(x)
        x = basis.rotate(x)
        going = torch.ones(G, dtype=torch.bool)  # input sets still on the path
        best = [(-1.0, 0.0, -1)] * G  # per input set: (val top-1, -val loss, path position) of its best decay
        losses = [[] for _ in range(G)]  # per input set: validation loss along the path
        tops = [[] for _ in range(G)]  # and validation top-1
        unresolved = [[] for _ in range(G)]  # path positions whose float32 run stopped short of its gradient test
        start = None  # (G, P) each input set's optimum at the previous block's weakest decay
        for b, ls in enumerate(blocks):
            sets = going.nonzero().squeeze(1)
            x0 = None if start is None else start[sets].repeat_interleave(len(ls), 0)
            params, info = fit_logistic(
                x[sets],
                labels,
                K,
                [float(decays[l]) for l in ls],
                tol=tol,
                max_iter=max_iter,
                start=x0,
                polish=validation is None,
                spectrum=basis.spectrum(sets),
            )
            short = torch.tensor(info.pop("short")).view(len(sets), len(ls))
            _add_counts(counts, info)
            params = params.view(len(sets), len(ls), -1)
            for row, i in enumerate(sets.tolist()):
                unresolved[i] += [b * block + j for j in range(len(ls)) if short[row, j]]
            for j, l in enumerate(ls):
                _store(bank, bank._slot[(g, 0, l)], sets, params[:, j], basis)
                trained.update(bank.groups[g][int(i)] * bank.L + l for i in sets)
            if start is None:
                start = params.new_zeros(G, params.shape[2])
            start[sets] = params[:, -1]
            if validation is not None:
                x_val, y_val = basis.rotate(validation[0][g][sets].double(), sets), validation[1].to(x.device)
                logits = torch.einsum("gmd,glkd->glmk", x_val, params[..., : K * D].reshape(len(sets), len(ls), K, D))
                logits = logits + params[..., K * D :][:, :, None, :]
                top1 = (logits.argmax(-1) == y_val).double().mean(-1)  # (G', l)
                loss = (
                    torch.nn.functional.cross_entropy(
                        logits.flatten(0, 2), y_val.repeat(len(sets) * len(ls)), reduction="none"
                    )
                    .view(len(sets), len(ls), -1)
                    .mean(-1)
                )
                for row, i in enumerate(sets.tolist()):
                    for j in range(len(ls)):
                        candidate = (float(top1[row, j]), -float(loss[row, j]), b * block + j)
                        losses[i].append(float(loss[row, j]))
                        tops[i].append(float(top1[row, j]))
                        if candidate[:2] > best[i][:2]:
                            best[i] = candidate
                    tail = losses[i][-patience - 1 :]
                    overfitting = len(tail) == patience + 1 and all(u < v for u, v in zip(tail, tail[1:]))
                    if overfitting and b * block + len(ls) - 1 - best[i][2] >= patience:
                        going[i] = False
            if not going.any():
                break
        if validation is not None:
            m = len(validation[1])
            candidates = [
                sorted(
                    {q for q, top in enumerate(tops[i]) if top >= best[i][0] - margin - 0.5 / m}
                    | {q for q in range(best[i][2] - neighbours, best[i][2] + neighbours + 1) if 0 <= q < len(tops[i])}
                    | set(unresolved[i])
                )
                for i in range(G)
            ]
            _polish(bank, g, x, basis, labels, decays, order, candidates, tol, max_iter, counts)
    return trained, counts


def _polish(bank, g, x, basis, labels, decays, order, candidates, tol, max_iter, counts) -> None:
    """float64 to `tol`, from their float32 optima, for the path positions `candidates[i]` of each input set i
    of group g (the decays selection may choose; x in `basis`). The other members keep their float32 optimum
    (max |gradient| <= 100 tol): their validation scores only have to show that they lose."""
    K = bank.K
    wanted = {}  # path positions -> input sets (of group g) that polish exactly those
    for i, positions in enumerate(candidates):
        wanted.setdefault(tuple(positions), []).append(i)
    for positions, members in wanted.items():
        if not positions:
            continue
        sets, ls = torch.tensor(members), [order[q] for q in positions]
        slots = [bank._slot[(g, 0, l)] for l in ls]
        with torch.no_grad():
            start = torch.stack(
                [
                    torch.cat(
                        [
                            basis.rotate(bank.weights[s][sets].double(), sets).flatten(1),
                            bank.biases[s][sets].flatten(1),
                        ],
                        1,
                    )
                    for s in slots
                ],
                1,
            ).flatten(0, 1)
        params, info = fit_logistic(
            x[sets],
            labels,
            K,
            [float(decays[l]) for l in ls],
            tol=tol,
            max_iter=max_iter,
            start=start,
            rough=None,
            spectrum=basis.spectrum(sets),
        )
        info.pop("short")
        _add_counts(counts, info)
        params = params.view(len(sets), len(ls), -1)
        for j, slot in enumerate(slots):
            _store(bank, slot, sets, params[:, j], basis)


def _add_counts(counts: dict, info: dict) -> None:
    """Sum one fit_logistic call's iteration counts into `counts` (numbers add, per-decay lists concatenate)."""
    for key, value in info.items():
        counts[key] = counts.get(key, [] if isinstance(value, list) else 0) + value


def _store(bank, slot: int, sets: torch.Tensor, params: torch.Tensor, basis) -> None:
    """Write the flat parameters (G', K*D+K) of input sets `sets`, found in `basis`, into the bank's `slot`."""
    K = bank.K
    D = (params.shape[1] - K) // K
    with torch.no_grad():
        weights = basis.unrotate(params[:, : K * D].reshape(-1, K, D), sets)
        bank.weights[slot][sets] = weights.to(bank.weights[slot].dtype)
        bank.biases[slot][sets] = params[:, K * D :].reshape(-1, K, 1).to(bank.biases[slot].dtype)


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

    def __init__(
        self,
        kind: str,
        inputs: Sequence[Sequence[tuple[int, int]]],
        num_hypers: int,
        num_classes: int,
        options: dict,
        seeds: Sequence[Sequence[int]],
    ):
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
