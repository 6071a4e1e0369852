"""Many L2-regularised multinomial logistic regressions fitted at once by batched L-BFGS (`stages.probe.lbfgs`).

Each member (input set i, regularisation l) minimises

    f(W, b) = mean_r CE(W x_ir + b, y_r) + decay_l / 2 * ||W||^2          (b not decayed)

which is scikit-learn's LogisticRegression(C) at decay = 1 / (C n) on n rows. Its gradient is
(P - Y) X / n + decay W for W and the row sum of (P - Y) / n for b, with P the softmax probabilities
and Y the one-hot labels: computed here by hand, so one evaluation of all members of a group of input
sets of equal width is two batched matmuls (`LogisticObjective`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stages.probe.lbfgs import Result, minimize

# a member whose max |gradient| ends above SHORT x its phase's tolerance "stopped short": in float32 its validation
# score is not trusted (fit_lbfgs polishes it); between 1 and SHORT x it is (digits: every input set matched)
SHORT = 4
# the preconditioner's floor on eigenvalues, a fraction of their mean (`preconditioner`): 0.1 and 0.3 were tried,
# on digits and on bench/probe.py's store; 0.1 kept most of the gain on both
FLOOR = 0.1


class LogisticObjective:
    """Values and gradients of the members (input set i, regularisation l), member = i * L + l.

    features (G, n, D): the input sets of one group (equal D), labels (n,) in [0, K), decays (L,).
    A member's parameters are flat, (K * D + K,): W (K, D) row-major, then b (K,).

    `mixed` (float32 features): values and gradients exact to float64 at float32's price per evaluation (the
    idea of iterative refinement). Each member has an anchor x0 (`anchor_at`), where its value, gradient and
    probabilities P0 are computed once in float64. At x, everything is computed as a change from the anchor,
    in float32: the logits' change (x - x0) X', the probabilities' change P - P0 (`_change`) and its product
    with the features. Near x0 the changes are small, so float32's relative rounding of them is far below
    what the optimizer resolves, and they are added to the anchor's float64 value and gradient. Far from its
    anchor a member is no more precise than float32: `fit_logistic` re-anchors it and checks in float64.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        decays: Sequence[float],
        *,
        mixed: bool = False,
    ):
        self.X = features
        self.G, self.n, self.D = features.shape
        self.K, self.L = int(num_classes), len(decays)
        self.mixed = mixed
        dtype = torch.float64 if mixed else features.dtype  # of x, values and gradients
        self.decay = torch.as_tensor(list(decays), dtype=dtype, device=features.device)
        self.labels = labels.to(features.device).long()
        # each row's label entry in a member's (K, n) logits, flattened
        self.picked = self.labels * self.n + torch.arange(self.n, device=features.device)
        self.anchor = None  # mixed: per member x0 (M, P), P0 (M, K, n) float32, value (M,) and gradient (M, P)

    @property
    def size(self) -> int:
        return self.K * self.D + self.K

    def __call__(self, index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index (m,) ascending member numbers, x (m, K*D+K) -> values (m,), gradients (m, K*D+K)."""
        sets = torch.div(index, self.L, rounding_mode="floor")
        if len(index) == self.G * self.L:  # every member: no packing

            def pack(t):
                return t.view(self.G, self.L, *t.shape[1:])

            def unpack(t):
                return t.reshape(len(index), *t.shape[2:])

            present = None
        else:  # the members of each input set side by side, padded with zeros to the most any set has
            running, counts = torch.unique_consecutive(sets, return_counts=True)
            row = torch.repeat_interleave(torch.arange(len(running), device=x.device), counts)
            pos = torch.arange(len(index), device=x.device) - torch.repeat_interleave(
                torch.cumsum(counts, 0) - counts, counts
            )
            width = int(counts.max())

            def pack(t):
                packed = t.new_zeros(len(running), width, *t.shape[1:])
                packed[row, pos] = t
                return packed

            def unpack(t):
                return t[row, pos]

            present = None if len(running) == self.G else running
        if not self.mixed:
            logits = self._forward(pack(x), present)
            loss, residual = self._softmax(logits)
            grad = self._backward(residual, present)
        else:
            anchor, probabilities0, loss0, grad0 = self.anchor
            step = self._forward(pack((x - anchor[index]).float()), present)  # change of the logits, float32
            loss, change = self._change(step, pack(probabilities0[index]))
            loss = pack(loss0[index]) + loss
            grad = pack(grad0[index]) + self._backward(change, present)
        return self._penalised(index, sets, x, unpack(loss), unpack(grad))

    def anchor_at(self, index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed precision: make x (m, P), float64, the anchor of members `index`, evaluated in float64 (one
        input set at a time); returns their values and gradients there, exact to float64."""
        if self.anchor is None:
            M = self.G * self.L
            self.anchor = (
                x.new_zeros(M, self.size),
                torch.zeros(M, self.K, self.n, dtype=torch.float32, device=x.device),
                x.new_zeros(M),
                x.new_zeros(M, self.size),
            )
        anchor, probabilities0, loss0, grad0 = self.anchor
        K, D = self.K, self.D
        sets = torch.div(index, self.L, rounding_mode="floor")
        for i in torch.unique(sets).tolist():
            mine = (sets == i).nonzero().squeeze(1)
            members, xi = index[mine], x[mine]
            X = self.X[i].double()
            logits = torch.matmul(xi[:, : K * D].reshape(-1, K, D), X.T) + xi[:, K * D :, None]
            loss, residual = self._softmax(logits)
            grad = torch.cat([torch.matmul(residual, X).flatten(1), residual.sum(-1)], 1) / self.n
            residual.view(len(mine), -1)[:, self.picked] += 1.0  # the probabilities again
            anchor[members], probabilities0[members] = xi, residual.float()
            loss0[members], grad0[members] = loss, grad
        return self._penalised(index, sets, x, loss0[index].clone(), grad0[index].clone())

    def _change(self, step: torch.Tensor, probabilities0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed precision, from the anchors' probabilities P0 (..., K, n) and the change of the logits `step`
        (float32): the change of the mean cross-entropy (float64) and of the probabilities, P - P0 (float32),
        each to float32's relative precision of the change itself, not of the whole. With E = exp(step) - 1
        and z = sum_k P0 E per row: P / P0 - 1 = (E - z) / (1 + z), and the loss changes by
        log(1 + z) - step[label], row by row."""
        lead = step.shape[:-2]
        picked = step.reshape(-1, self.K * self.n)[:, self.picked]
        change = torch.expm1(step)
        z = (change * probabilities0).sum(-2, keepdim=True)
        loss = (torch.log1p(z).reshape(-1, self.n) - picked).double().mean(-1).view(lead)
        change.sub_(z).div_(z + 1.0).mul_(probabilities0)
        return loss, change

    def _penalised(self, index, sets, x, values, grad):
        """Add the L2 penalty on the weights (not the biases) to a member's values and gradients."""
        decay = self.decay[index - sets * self.L]
        weights = x[:, : self.K * self.D]
        grad[:, : self.K * self.D] += decay[:, None] * weights
        return values + 0.5 * decay * (weights * weights).sum(1), grad

    def _forward(self, packed: torch.Tensor, sets: torch.Tensor | None) -> torch.Tensor:
        """packed (G', w, P): w members' parameters per input set `sets` (all when None) -> logits (G', w, K, n)
        in the features' dtype. A subset of the input sets is computed set by set on views of the features:
        gathering them would copy data the size of the features each time the running sets change."""
        K, D, n = self.K, self.D, self.n
        count, width = packed.shape[0], packed.shape[1]
        W = packed[..., : K * D].reshape(count, width * K, D)
        b = packed[..., K * D :].reshape(count, width * K, 1)
        if sets is None:
            logits = torch.baddbmm(b, W, self.X.transpose(1, 2))
        else:
            logits = packed.new_empty(count, width * K, n)
            for j, i in enumerate(sets.tolist()):
                torch.addmm(b[j], W[j], self.X[i].T, out=logits[j])
        return logits.view(count, width, K, n)

    def _softmax(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (..., K, n) -> mean cross-entropy (...) and the residual P - Y (..., K, n), d loss / d logits
        times n. Log-probabilities, then the probabilities in place, then P - Y by touching the n label entries
        only: besides the two matmuls, these (K, n) passes are most of an evaluation's time."""
        lead = logits.shape[:-2]
        logp = torch.log_softmax(logits, dim=-2).view(-1, self.K * self.n)
        loss = -logp[:, self.picked].mean(-1).view(lead)
        residual = logp.exp_()
        residual[:, self.picked] -= 1.0
        return loss, residual.view(logits.shape)

    def _backward(self, residual: torch.Tensor, sets: torch.Tensor | None) -> torch.Tensor:
        """residual (G', w, K, n) -> the data term's gradient (G', w, P) in the features' dtype."""
        K, D, n = self.K, self.D, self.n
        count, width = residual.shape[0], residual.shape[1]
        residual = residual.view(count, width * K, n)
        if sets is None:
            grad_w = torch.bmm(residual, self.X)
        else:
            grad_w = residual.new_empty(count, width * K, D)
            for j, i in enumerate(sets.tolist()):
                torch.mm(residual[j], self.X[i], out=grad_w[j])
        grad_b = residual.sum(-1).view(count, width, K)
        return torch.cat([grad_w.view(count, width, K * D), grad_b], dim=2).div_(n)


class Eigenbasis:
    """Each input set's features in the eigenbasis of their second moment, X U with X'X / n = U diag(s) U'.

    An orthogonal change of basis changes neither the loss nor the penalty (||W U|| = ||W||): the optimum is
    the same, W = W_rot U'. But in that basis the data term's Hessian is nearly diagonal across features,
    with s_j setting the scale of column j, so L-BFGS can start from the right scale of every direction
    (`preconditioner`) instead of learning it from its curvature pairs. Input sets wider than `MAX_WIDTH`
    stay as they are (the decomposition costs D^3)."""

    MAX_WIDTH = 2048

    def __init__(self, U: torch.Tensor | None, s: torch.Tensor | None):
        self.U, self.s = U, s

    @classmethod
    def of(cls, features: torch.Tensor) -> Eigenbasis:
        """features (G, n, D), standardised (mean zero on these rows). One input set at a time in float64, so the
        transient copies are one set's, not the group's."""
        G, n, D = features.shape
        if D > cls.MAX_WIDTH:
            return cls(None, None)
        U = torch.empty(G, D, D, dtype=torch.float64, device=features.device)
        s = torch.empty(G, D, dtype=torch.float64, device=features.device)
        for i in range(G):
            x = features[i].double()
            s[i], U[i] = torch.linalg.eigh(x.T @ x / n)
        return cls(U, s.clamp(min=0))

    def rotate(self, x: torch.Tensor, sets: torch.Tensor | None = None) -> torch.Tensor:
        """(G', r, D) rows or weights of input sets `sets` (all when None) -> the same in the eigenbasis, in x's
        dtype (a new tensor; the product in float64, one input set at a time)."""
        if self.U is None:
            return x
        U = self.U if sets is None else self.U[sets]
        out = torch.empty_like(x)
        for i in range(len(x)):
            out[i] = (x[i].double() @ U[i]).to(x.dtype)
        return out

    def unrotate(self, weights: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """(G', K, D) weights in the eigenbasis -> in the features' own basis."""
        return weights if self.U is None else weights.double() @ self.U[sets].transpose(1, 2)

    def spectrum(self, sets: torch.Tensor) -> torch.Tensor | None:
        return None if self.s is None else self.s[sets]


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    decays: Sequence[float],
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    history: int = 10,
    start: torch.Tensor | None = None,
    rough: float | None = 100.0,
    polish: bool = True,
    spectrum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Every (input set, decay) member of one group at its optimum: (G * L, K*D+K) parameters (float64), counts.

    features (G, n, D), standardised. With `rough`, the iterations run in float32 until max |gradient| <=
    rough * tol (or float32 stops improving the value), then go on with the same curvature histories to `tol`,
    exact to float64 with respect to the features as given: float64 features in float64, float32 features in
    mixed precision (`LogisticObjective(mixed=True)`, float32 matmuls around float64 anchors, re-anchored until
    the float64 gradient meets `tol`). In float32 alone the value stops improving before the
    least-regularised members converge. Without `polish`, the float32 phase only (the rough optimum that
    `stages.probe.banks.fit_lbfgs` walks the C path with). `max_iter` bounds each phase's iterations."""
    precise = "mixed" if features.dtype == torch.float32 else torch.float64
    phases = [(torch.float32, rough * tol), (precise, tol)] if rough else [(precise, tol)]
    if not polish:
        phases = phases[:1]
    x = (
        start
        if start is not None
        else features.new_zeros(features.shape[0] * len(decays), num_classes * (features.shape[2] + 1))
    )
    state, counts = None, {"iterations": 0, "member_iterations": 0, "evaluations": 0}
    diagonal = None if spectrum is None else preconditioner(spectrum, num_classes, decays)
    for kind, phase_tol in phases:
        dtype = torch.float64 if kind == "mixed" else kind
        options = dict(
            tol=phase_tol,
            max_iter=max_iter,
            history=history,
            ftol=0.0 if kind == "mixed" else (1 if dtype == torch.float32 else 64) * torch.finfo(dtype).eps,
            precondition=None if diagonal is None else diagonal.to(dtype),
        )  # float64: scikit-learn's lbfgs ftol; float32: its resolution (64 eps stopped strong-C members at 1e-3);
        # mixed: the gradient test only (its gradients are exact to float64, its values are not: `_refine`)
        if kind == "mixed":
            objective = LogisticObjective(features, labels, num_classes, decays, mixed=True)
            result = _refine(objective, x.double(), state, noisy_values=True, **options)
        else:
            objective = LogisticObjective(features.to(dtype), labels, num_classes, decays)
            result = minimize(objective, x.to(dtype), state=state, **options)
        x, state = result.x, result.state
        counts["iterations"] += int(result.iterations.max())
        counts["member_iterations"] += int(result.iterations.sum())
        counts["evaluations"] += result.evaluations
        # where the iterations go: per phase (float32, then float64 however computed), per decay (summed over
        # input sets)
        name = str(dtype).removeprefix("torch.")
        counts[f"member_iterations_{name}"] = int(result.iterations.sum())
        counts[f"per_decay_{name}"] = result.iterations.view(-1, len(decays)).sum(0).tolist()
    counts.update(converged=int(result.converged.sum()), members=len(x))
    # members whose last phase stopped well short of its gradient test (float32 stopped improving the value)
    counts["short"] = (result.gradient > SHORT * phases[-1][1]).tolist()
    return x.double(), counts


# mixed precision: at most this many rounds of L-BFGS between float64 anchors (from the float32 path's optima, every
# member of bench/probe.py's small store met tol 1e-6 in float64 after the first round)
ANCHORS = 10


def _refine(objective: LogisticObjective, x: torch.Tensor, state: dict | None, **options) -> Result:
    """Minimise in mixed precision: anchor every member at x (float64 values and gradients), run L-BFGS on the
    members whose float64 gradient is above `tol`, re-anchor them where it stopped, and again, while their
    float64 gradient still falls. The members' curvature histories carry over from round to round. The values
    carry float32's rounding of the change from the anchor (about 1e-11 on digits), far above the decreases
    near the optimum, so L-BFGS accepts steps on the derivatives (`minimize(noisy_values=True)`) and stops on
    the gradient test, which is exact to float64, never on the relative decrease of the value."""
    tol, max_iter = options["tol"], options.pop("max_iter")
    precondition = options.pop("precondition")
    M = len(x)
    x = x.clone()
    values, grad = objective.anchor_at(torch.arange(M, device=x.device), x)
    gradient = grad.abs().amax(1)
    iterations = torch.zeros(M, dtype=torch.long, device=x.device)
    converged = gradient <= tol
    todo = ~converged
    evaluations = 1
    if state is not None:
        state = {
            k: v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()
        }
    for _ in range(ANCHORS):
        todo &= iterations < max_iter
        if not todo.any():
            break
        sub = todo.nonzero().squeeze(1)
        result = minimize(
            lambda index, z, sub=sub: objective(sub[index], z),
            x[sub],
            max_iter=max_iter - int(iterations[sub].min()),
            state=None if state is None else _rows(state, sub),
            precondition=None if precondition is None else precondition[sub],
            **options,
        )
        x[sub], iterations[sub] = result.x, iterations[sub] + result.iterations
        state = _write_rows(state, sub, result.state, M)
        values[sub], grad = objective.anchor_at(sub, result.x)
        evaluations += result.evaluations + 1
        now = grad.abs().amax(1)
        # met in float64: done. Otherwise on from the new anchor, while the rounds bring the float64 gradient down
        # (a member far from its anchor can meet tol on a gradient that float32's rounding has blurred).
        converged[sub] = now <= tol
        todo[sub] = ~converged[sub] & (now < gradient[sub])
        gradient[sub] = now
    return Result(x, iterations, converged, values, gradient, evaluations, state)


def _rows(state: dict, rows: torch.Tensor) -> dict:
    return {k: v[rows] if torch.is_tensor(v) else v for k, v in state.items()}


def _write_rows(state: dict | None, rows: torch.Tensor, part: dict, M: int) -> dict:
    """The full state with the members `rows` replaced by `part` (a state of those members only)."""
    if state is None:
        state = {k: v.new_zeros(M, *v.shape[1:]) if torch.is_tensor(v) else v for k, v in part.items()}
        state["fresh"] = torch.ones(M, dtype=torch.bool, device=part["fresh"].device)
    for k, v in part.items():
        if torch.is_tensor(v):
            state[k][rows] = v
        else:
            state[k] = v
    return state


def preconditioner(spectrum: torch.Tensor, num_classes: int, decays: Sequence[float]) -> torch.Tensor:
    """The diagonal of an approximate inverse Hessian per member (G * L, K*D+K), for features expressed in
    the eigenbasis of their second moment, with eigenvalues `spectrum` (G, D).

    At the start (uniform probabilities) the data term's Hessian is (I / K - 1 1' / K^2) (x) Sigma: in
    Sigma's eigenbasis, about s_j / K on weight column j, plus the penalty's decay. L-BFGS scales it
    (gamma) and corrects it with its curvature pairs; what it saves is learning each direction's scale.
    Eigenvalues below FLOOR x their mean count as that: as the fit sharpens, the curvature of the
    low-variance directions no longer follows s_j, and an unfloored diagonal made weakly regularised fits
    slower than none (digits, C = 100: 2,357 iterations against 528 without; 491 floored)."""
    K = int(num_classes)
    decay = torch.as_tensor(list(decays), dtype=spectrum.dtype, device=spectrum.device)
    floor = FLOOR * spectrum.mean(1, keepdim=True)
    weights = 1.0 / (torch.maximum(spectrum, floor)[:, None, :] / K + decay[None, :, None])  # (G, L, D)
    G, L, D = weights.shape
    weights = weights[:, :, None, :].expand(G, L, K, D).reshape(G, L, K * D)
    bias = torch.full((G, L, K), float(K), dtype=spectrum.dtype, device=spectrum.device)
    return torch.cat([weights, bias], dim=2).reshape(G * L, K * D + K)
