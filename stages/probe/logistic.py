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
        K, D, n = self.K, self.D, self.n
        sets = torch.div(index, self.L, rounding_mode="floor")
        present, counts = torch.unique_consecutive(sets, return_counts=True)
        width = int(counts.max())  # members computed per present input set (shorter ones padded with zeros)
        row = torch.repeat_interleave(torch.arange(len(present), device=x.device), counts)
        pos = torch.arange(len(index), device=x.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                  counts)
        packed = x.new_zeros(len(present), width, self.size)
        packed[row, pos] = x
        X = self.X if len(present) == self.G else self.X[present]  # (G', n, D)
        W = packed[..., : K * D].reshape(len(present), width * K, D)
        b = packed[..., K * D:].reshape(len(present), width * K, 1)
        logits = torch.baddbmm(b, W, X.transpose(1, 2)).view(len(present), width, K, n)
        lse = torch.logsumexp(logits, dim=2, keepdim=True)  # (G', w, 1, n)
        loss = (lse.squeeze(2) - (logits * self.onehot).sum(2)).mean(-1)  # (G', w)
        residual = (torch.exp(logits - lse) - self.onehot) / n  # dloss / dlogits
        grad_w = torch.bmm(residual.view(len(present), width * K, n), X).view(len(present), width, K * D)
        grad = torch.cat([grad_w, residual.sum(-1)], dim=2)[row, pos]  # (m, K*D+K)
        decay = self.decay[index - sets * self.L]
        weights = x[:, : K * D]
        values = loss[row, pos] + 0.5 * decay * (weights * weights).sum(1)
        grad[:, : K * D] += decay[:, None] * weights
        return values, grad


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, decays: Sequence[float], *,
                 tol: float = 1e-6, max_iter: int = 1000, history: int = 10,
                 start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Every (input set, decay) member of one group at its optimum; (M, K*D+K) parameters and counts.

    features (G, n, D) standardised, float64 advised for the last digits (see `fit_group`)."""
    objective = LogisticObjective(features, labels, num_classes, decays)
    M = objective.G * objective.L
    x0 = start if start is not None else features.new_zeros(M, objective.size)
    result = minimize(objective, x0.to(features.dtype), tol=tol, max_iter=max_iter, history=history,
                      ftol=64 * torch.finfo(features.dtype).eps)  # scikit-learn's lbfgs ftol, per precision
    return result.x, {"iterations": int(result.iterations.max()), "member_iterations": int(result.iterations.sum()),
                      "evaluations": result.evaluations, "converged": int(result.converged.sum()), "members": M}
