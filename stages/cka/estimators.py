"""Centred kernel alignment (Kornblith et al. 2019): the estimators' arithmetic, in float64.

For features X (N, p) and Y (N, q) of the same N samples, with Gram matrices K = X X^T, L = Y Y^T and
the centring matrix H = I - 11^T / N:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

- `linear`: HSIC(K, L) = tr(K H L H) / (N-1)^2, computed in feature space as ||Xc^T Yc||_F^2 on
  centred features (no N x N matrix), from sums accumulated chunk by chunk (`CrossMoments`).
- `debiased`: the unbiased HSIC estimator of Song et al. (2012), as Nguyen et al. (2021) use it:
  with K~, L~ the Gram matrices with their diagonals set to zero,
      HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1] / (N(N-3)).
  For the linear kernel every term is a sum over samples of feature-space quantities, so it is
  accumulated from the same chunk sums as `linear` (`CrossMoments.finish`). It needs N >= 4.
- `minibatch`: HSIC_1 of each fixed minibatch, averaged over minibatches, then normalised
  (Nguyen et al. 2021): `unbiased_hsic_matrix` on each batch's Gram matrices.
- `rbf`: the Gram form with the Gaussian kernel exp(-d^2 / (2 sigma^2)), sigma a multiple of the
  median pairwise distance (Kornblith et al.), biased HSIC (H K H): `rbf_cka_matrix`.

Both HSIC estimators are unchanged by adding a constant vector to every sample's features, so
`CrossMoments` takes features shifted by any fixed vector (the streaming code uses the first chunk's
mean), which keeps the float64 sums far from cancellation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ESTIMATORS = ("linear", "debiased", "minibatch", "rbf")
DEBIASED = ("debiased", "minibatch")  # estimators built on HSIC_1, which needs at least 4 samples
MIN_DEBIASED_SAMPLES = 4


def normalise(hsic: np.ndarray) -> np.ndarray:
    """(A, A) HSIC values of every pair -> CKA: H_ij / sqrt(H_ii H_jj); NaN where a side has no variance."""
    diagonal = np.diag(hsic).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.sqrt(np.outer(diagonal, diagonal))
        return np.where(scale > 0, hsic / scale, np.nan)


class CrossMoments:
    """Sums over samples that give linear and debiased HSIC of every pair (i in group a, j in group b).

    Group a holds arrays of widths `widths_a` (features flattened: p_i = C p^2), group b `widths_b`;
    `same` says they are one group (then b's sums are a's). `update` takes one chunk's rows of every
    array of both groups, each (n, p_i), all shifted by a fixed vector per array. Memory: a
    (sum p_a) x (sum p_b) float64 matrix.
    """

    def __init__(self, widths_a: Sequence[int], widths_b: Sequence[int], *, same: bool = False):
        self.same = same
        self.edges_a = np.concatenate([[0], np.cumsum(widths_a)]).astype(int)
        self.edges_b = self.edges_a if same else np.concatenate([[0], np.cumsum(widths_b)]).astype(int)
        da, db, na, nb = self.edges_a[-1], self.edges_b[-1], len(widths_a), len(self.edges_b) - 1
        self.n = 0
        self.cross = np.zeros((da, db))  # sum x y^T
        self.sum_a, self.sum_b = np.zeros(da), np.zeros(db)  # sum x
        self.norms = np.zeros((na, nb))  # sum ||x||^2 ||y||^2
        self.weighted_a = np.zeros((da, nb))  # sum ||y_j||^2 x (for each j)
        self.weighted_b = np.zeros((db, na))  # sum ||x_i||^2 y (for each i)
        self.square_a, self.square_b = np.zeros(na), np.zeros(nb)  # sum ||x||^2

    def update(self, group_a: Sequence[np.ndarray], group_b: Sequence[np.ndarray] | None = None) -> None:
        za = np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1) for x in group_a], axis=1)
        qa = np.stack(
            [np.einsum("ij,ij->i", za[:, lo:hi], za[:, lo:hi]) for lo, hi in zip(self.edges_a[:-1], self.edges_a[1:])],
            axis=1,
        )
        if self.same:
            zb, qb = za, qa
        else:
            zb = np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1) for x in group_b], axis=1)
            qb = np.stack(
                [
                    np.einsum("ij,ij->i", zb[:, lo:hi], zb[:, lo:hi])
                    for lo, hi in zip(self.edges_b[:-1], self.edges_b[1:])
                ],
                axis=1,
            )
        self.n += len(za)
        self.cross += za.T @ zb
        self.sum_a += za.sum(axis=0)
        self.norms += qa.T @ qb
        self.weighted_a += za.T @ qb
        self.square_a += qa.sum(axis=0)
        if not self.same:
            self.sum_b += zb.sum(axis=0)
            self.weighted_b += zb.T @ qa
            self.square_b += qb.sum(axis=0)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(linear, debiased): (A_a, A_b) HSIC numerators of every pair; `normalise` makes CKA of them.

        linear = ||Xc^T Yc||_F^2 (the biased HSIC times (N-1)^2); debiased = HSIC_1 (NaN below 4 samples).
        """
        n = self.n
        sum_b = self.sum_a if self.same else self.sum_b
        weighted_b = self.weighted_a if self.same else self.weighted_b
        square_b = self.square_a if self.same else self.square_b
        ia, ib = len(self.edges_a) - 1, len(self.edges_b) - 1
        linear, debiased = np.zeros((ia, ib)), np.zeros((ia, ib))
        for i, (lo, hi) in enumerate(zip(self.edges_a[:-1], self.edges_a[1:])):
            for j, (lo2, hi2) in enumerate(zip(self.edges_b[:-1], self.edges_b[1:])):
                cross = self.cross[lo:hi, lo2:hi2]
                sx, sy = self.sum_a[lo:hi], sum_b[lo2:hi2]
                centred = cross - np.outer(sx, sy) / n
                linear[i, j] = np.sum(centred * centred)
                if n < MIN_DEBIASED_SAMPLES:
                    debiased[i, j] = np.nan
                    continue
                trace = np.sum(cross * cross) - self.norms[i, j]  # tr(K~ L~)
                totals = (sx @ sx - self.square_a[i]) * (sy @ sy - square_b[j])  # (1'K~1)(1'L~1)
                rows = (
                    sx @ cross @ sy - sx @ self.weighted_a[lo:hi, j] - sy @ weighted_b[lo2:hi2, i] + self.norms[i, j]
                )  # 1'K~L~1
                debiased[i, j] = (trace + totals / ((n - 1) * (n - 2)) - 2 * rows / (n - 2)) / (n * (n - 3))
        return linear, debiased


def unbiased_hsic_matrix(grams: np.ndarray) -> np.ndarray:
    """(A, n, n) Gram matrices of A feature sets on the same n >= 4 samples -> (A, A) HSIC_1 of every pair."""
    grams = np.array(grams, dtype=np.float64)  # a copy: the diagonals are zeroed
    count, n = grams.shape[0], grams.shape[1]
    if n < MIN_DEBIASED_SAMPLES:
        raise ValueError(f"unbiased HSIC needs at least {MIN_DEBIASED_SAMPLES} samples, got {n}")
    index = np.arange(n)
    grams[:, index, index] = 0.0
    flat = grams.reshape(count, -1)
    trace = flat @ flat.T  # tr(K~ L~): the Gram matrices are symmetric
    totals = flat.sum(axis=1)  # 1'K~1
    rows = grams.sum(axis=2)  # K~1
    return (trace + np.outer(totals, totals) / ((n - 1) * (n - 2)) - 2 * (rows @ rows.T) / (n - 2)) / (n * (n - 3))


def linear_grams(features: Sequence[np.ndarray]) -> np.ndarray:
    """A feature sets, each (n, ...) -> (A, n, n) float64 linear Gram matrices X X^T."""
    out = []
    for x in features:
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        out.append(x @ x.T)
    return np.stack(out)


def rbf_gram(features: np.ndarray, sigma: float) -> np.ndarray:
    """(n, ...) -> (n, n) Gaussian-kernel Gram matrix, bandwidth `sigma` times the median pairwise distance
    (over distinct pairs; a median of 0, all samples equal, gives a matrix of ones)."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    x = x - x.mean(axis=0)  # distances are unchanged; the dot products stay small
    dots = x @ x.T
    norms = np.diag(dots)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2 * dots, 0.0)
    upper = squared[np.triu_indices(len(x), k=1)]
    median = float(np.sqrt(np.median(upper))) if upper.size else 0.0
    if median == 0.0:
        return np.ones_like(squared)
    return np.exp(-squared / (2 * (sigma * median) ** 2))


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """H K H: rows and columns of the Gram matrix centred."""
    gram = np.asarray(gram, np.float64)
    gram = gram - gram.mean(axis=0, keepdims=True)
    return gram - gram.mean(axis=1, keepdims=True)


def gram_cka_matrix(centred_grams: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(A, A) biased CKA of every pair from A centred Gram matrices H K H, (A, n, n): <K, L> / (||K|| ||L||).

    An array is used in place (no copy of A n^2 values)."""
    flat = np.asarray(centred_grams, np.float64).reshape(len(centred_grams), -1)
    return normalise(flat @ flat.T)
