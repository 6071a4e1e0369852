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

from stages.probe.lbfgs import minimize

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
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, decays: Sequence[float]):
        self.X = features
        self.G, self.n, self.D = features.shape
        self.K, self.L = int(num_classes), len(decays)
        self.decay = torch.as_tensor(list(decays), dtype=features.dtype, device=features.device)
        self.labels = labels.to(features.device).long()
        self.onehot = torch.nn.functional.one_hot(self.labels, self.K).T.to(features.dtype)  # (K, n)

    @property
    def size(self) -> int:
        return self.K * self.D + self.K

    def __call__(self, index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index (m,) ascending member numbers, x (m, K*D+K) -> values (m,), gradients (m, K*D+K)."""
        sets = torch.div(index, self.L, rounding_mode="floor")
        if len(index) == self.G * self.L:  # every member: no packing
            values, grad = self._evaluate(x.view(self.G, self.L, self.size), self.X)
            values, grad = values.reshape(-1), grad.reshape(len(index), -1)
        else:  # the members of each input set side by side, padded with zeros to the most any set has
            present, counts = torch.unique_consecutive(sets, return_counts=True)
            row = torch.repeat_interleave(torch.arange(len(present), device=x.device), counts)
            pos = torch.arange(len(index), device=x.device) - torch.repeat_interleave(
                torch.cumsum(counts, 0) - counts, counts
            )
            packed = x.new_zeros(len(present), int(counts.max()), self.size)
            packed[row, pos] = x
            values, grad = self._evaluate(packed, self.X if len(present) == self.G else self.X[present])
            values, grad = values[row, pos], grad[row, pos]
        decay = self.decay[index - sets * self.L]
        weights = x[:, : self.K * self.D]
        grad[:, : self.K * self.D] += decay[:, None] * weights
        return values + 0.5 * decay * (weights * weights).sum(1), grad

    def _evaluate(self, packed: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """packed (G', w, P): w members' parameters per input set of X (G', n, D) -> their mean cross-entropy
        (G', w) and its gradient (G', w, P), without the penalty."""
        K, D, n = self.K, self.D, self.n
        sets, width = packed.shape[0], packed.shape[1]
        W = packed[..., : K * D].reshape(sets, width * K, D)
        b = packed[..., K * D :].reshape(sets, width * K, 1)
        logits = torch.baddbmm(b, W, X.transpose(1, 2)).view(sets, width, K, n)
        lse = torch.logsumexp(logits, dim=2, keepdim=True)  # (G', w, 1, n)
        loss = (lse.squeeze(2) - (logits * self.onehot).sum(2)).mean(-1)
        residual = (torch.exp(logits - lse) - self.onehot) / n  # d loss / d logits
        grad_w = torch.bmm(residual.view(sets, width * K, n), X).view(sets, width, K * D)
        return loss, torch.cat([grad_w, residual.sum(-1)], dim=2)


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
    rough * tol (or float32 stops improving the value), then go on in float64 with the same curvature
    histories to `tol`: float32 matmuls cost half, but in float32 the value stops improving before the
    least-regularised members converge. Without `polish`, the float32 phase only (the rough optimum that
    `stages.probe.banks.fit_lbfgs` walks the C path with). `max_iter` bounds each precision's iterations."""
    phases = [(torch.float32, rough * tol), (torch.float64, tol)] if rough else [(torch.float64, tol)]
    if not polish:
        phases = phases[:1]
    x = (
        start
        if start is not None
        else features.new_zeros(features.shape[0] * len(decays), num_classes * (features.shape[2] + 1))
    )
    state, counts = None, {"iterations": 0, "member_iterations": 0, "evaluations": 0}
    diagonal = None if spectrum is None else preconditioner(spectrum, num_classes, decays)
    for dtype, phase_tol in phases:
        objective = LogisticObjective(features.to(dtype), labels, num_classes, decays)
        result = minimize(
            objective,
            x.to(dtype),
            tol=phase_tol,
            max_iter=max_iter,
            history=history,
            state=state,
            ftol=(1 if dtype == torch.float32 else 64) * torch.finfo(dtype).eps,
            precondition=None if diagonal is None else diagonal.to(dtype),
        )  # float64: scikit-learn's lbfgs ftol; float32: its resolution (64 eps stopped strong-C members at 1e-3)
        x, state = result.x, result.state
        counts["iterations"] += int(result.iterations.max())
        counts["member_iterations"] += int(result.iterations.sum())
        counts["evaluations"] += result.evaluations
        # where the iterations go: per precision, per decay (summed over input sets)
        name = str(dtype).removeprefix("torch.")
        counts[f"member_iterations_{name}"] = int(result.iterations.sum())
        counts[f"per_decay_{name}"] = result.iterations.view(-1, len(decays)).sum(0).tolist()
    counts.update(converged=int(result.converged.sum()), members=len(x))
    # members whose last phase stopped well short of its gradient test (float32 stopped improving the value)
    counts["short"] = (result.gradient > SHORT * phases[-1][1]).tolist()
    return x.double(), counts


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
