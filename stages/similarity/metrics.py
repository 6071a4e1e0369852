"""The similarity metrics: one table (`METRICS`) and each metric's arithmetic on two prepared feature sets.

X (N, p) and Y (N, q) are features of the same N samples (after `preprocess`), K = X X^T, L = Y Y^T,
kNN_X(i) the k nearest other samples of i by inner product (`neighbours.nearest_neighbours`).

| metric | value | source |
|---|---|---|
| linear | ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) | Kornblith et al. 2019; `pipeline cka` |
| debiased | HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) | Song et al. 2012; Nguyen et al. 2021 |
| minibatch | sum_b HSIC_1 over fixed minibatches, then normalised | Nguyen et al. 2021 |
| rbf | biased CKA with a Gaussian kernel, sigma x median distance | Kornblith et al. 2019 |
| cka | tr(KHLH) / (sqrt(tr(KHKH) tr(LHLH)) + 1e-6) | platonic-rep `cka` |
| unbiased_cka | HSIC_1(K, L) / (sqrt(HSIC_1(K, K) HSIC_1(L, L)) + 1e-6) | platonic-rep `unbiased_cka` |
| cknna | S(K, L) / (sqrt(S(K, K) S(L, L)) + 1e-6), S = HSIC_1 of K, L kept on mutual kNN | platonic-rep `cknna` |
| mutual_knn | mean_i |kNN_X(i) ∩ kNN_Y(i)| / k | platonic-rep `mutual_knn` |
| cycle_knn | mean_i [i in kNN_X(j) for some j in kNN_Y(i)] | platonic-rep `cycle_knn` |
| lcs_knn | mean_i LCS(kNN_X(i), kNN_Y(i)), in [0, k]: not divided by k | platonic-rep `lcs_knn` |
| edit_distance_knn | 1 - mean_i Levenshtein(kNN_X(i), kNN_Y(i)) / k | platonic-rep `edit_distance_knn` |
| svcca | mean canonical correlation of the top-d left singular vectors of the standardised X, Y | Raghu et al. 2017 |
| procrustes | 2 - 2 ||Xn^T Yn||_* (Xn centred, ||Xn||_F = 1): a distance, 0 when equal | Ding et al. 2021 |

HSIC_1 is the unbiased estimator of Song et al. (2012), eq. 5, in the form platonic-rep writes it:
[sum(K~ * L~^T) + sum(K~) sum(L~) / ((N-1)(N-2)) - 2 sum(K~ L~) / (N-2)] / (N(N-3)), with K~, L~ the
matrices with zero diagonals. CKNNA's S applies it to M * K and M * L, M_ij = 1 where j is in both
kNN_X(i) and kNN_Y(i) (for S(K, K): j in kNN_X(i)); these are sparse, so S is summed over the N k
kept entries. SVCCA standardises each column ((x - mean) / (std + 1e-8), std with N - 1), keeps the
top d = `cca_dim` left singular vectors U_X, U_Y of each side, and averages the canonical
correlations between them, which are the singular values of U_X^T U_Y (the columns are orthonormal).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from stages.cka.estimators import (
    MIN_DEBIASED_SAMPLES,
    CrossMoments,
    centre_gram,
    rbf_gram,
)
from stages.similarity.neighbours import (
    Neighbours,
    cycle_hits,
    edit_distances,
    lcs_lengths,
    nearest_neighbours,
    shared_counts,
)

PLATONIC_EPS = 1e-6  # platonic-rep adds it to the denominators of cka, unbiased_cka and cknna
SVCCA_EPS = 1e-8  # platonic-rep's guard on the columns' standard deviation


@dataclass(frozen=True)
class Metric:
    """A row of the metric table. `uses`: what of each side it reads (`knn`: neighbour lists; `features`:
    the prepared features). `symmetric`: m(X, Y) = m(Y, X). `higher`: larger values mean more similar
    (False for a distance). `top(k)`: the value of identical features."""

    name: str
    uses: str
    symmetric: bool
    higher: bool
    top: Callable[[int], float]
    label: str


def _one(k: int) -> float:
    return 1.0


METRICS = {
    m.name: m
    for m in (
        Metric("linear", "features", True, True, _one, "linear CKA"),
        Metric("debiased", "features", True, True, _one, "debiased CKA"),
        Metric("minibatch", "features", True, True, _one, "minibatch CKA"),
        Metric("rbf", "features", True, True, _one, "RBF CKA"),
        Metric("cka", "features", True, True, _one, "CKA (platonic-rep)"),
        Metric("unbiased_cka", "features", True, True, _one, "unbiased CKA (platonic-rep)"),
        Metric("cknna", "knn", True, True, _one, "CKNNA"),
        Metric("mutual_knn", "knn", True, True, _one, "mutual kNN"),
        Metric("cycle_knn", "knn", False, True, _one, "cycle kNN"),
        Metric("lcs_knn", "knn", True, True, float, "LCS of kNN lists (0..k)"),
        Metric("edit_distance_knn", "knn", True, True, _one, "1 - edit distance of kNN lists / k"),
        Metric("svcca", "features", True, True, _one, "SVCCA"),
        Metric("procrustes", "features", True, False, lambda k: 0.0, "Procrustes distance (0 = equal)"),
    )
}
KNN_METRICS = tuple(name for name, m in METRICS.items() if m.uses == "knn")


@dataclass(frozen=True)
class Parameters:
    """The metrics' parameters. `batches`: minibatch's fixed minibatches, as positions 0..N-1."""

    topk: int = 10
    cca_dim: int = 10
    rbf_sigma: float = 1.0
    batches: tuple[np.ndarray, ...] | None = None
    budget: int = 1 << 30  # bytes for one block of neighbour search
    grams: bool = False  # the CKA metrics from each side's N x N Gram matrix (small N: a pair costs N^2, not N p q)


class Side:
    """One feature set (N, D), prepared, with what the metrics derive from it computed once, when first asked."""

    def __init__(self, x: np.ndarray | None, params: Parameters, *, origin: np.ndarray | None = None):
        self.x = None if x is None else np.asarray(x, dtype=np.float64)
        self.params, self.origin = params, origin

    @classmethod
    def from_neighbours(cls, neighbours: Neighbours, params: Parameters) -> Side:
        """A side of which only the neighbour lists are kept (a streamed search): the kNN metrics and CKNNA only."""
        side = cls(None, params)
        side.neighbours = neighbours
        return side

    @property
    def n(self) -> int:
        return len(self.neighbours.indices) if self.x is None else len(self.x)

    @functools.cached_property
    def neighbours(self) -> Neighbours:
        return nearest_neighbours(self.x, self.params.topk, budget=self.params.budget, origin=self.origin)

    @functools.cached_property
    def centred(self) -> np.ndarray:
        return self.x - self.x.mean(axis=0)

    @functools.cached_property
    def self_hsic(self) -> tuple[float, float]:
        """(tr(K H K H), HSIC_1(K, K))."""
        if self.params.grams:
            return _cross(self, self)
        moments = CrossMoments([self.x.shape[1]], [self.x.shape[1]], same=True)
        moments.update([self.centred])
        linear, debiased = moments.finish()
        return float(linear[0, 0]), float(debiased[0, 0])

    @functools.cached_property
    def gram_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(Kc flattened, diag(Kc), row sums of Kc with a zero diagonal, their total) of Kc = Xc Xc^T: what
        ||Xc^T Yc||_F^2 = <Kc, Lc> and HSIC_1(Kc, Lc) need of this side (`Parameters.grams`)."""
        gram = self.centred @ self.centred.T
        diagonal = np.diag(gram).copy()
        rows = gram.sum(axis=1) - diagonal
        return gram.ravel(), diagonal, rows, float(rows.sum())

    @functools.cached_property
    def _batch_grams(self) -> list[tuple[np.ndarray, float, np.ndarray]]:
        return list(self._batch_terms())

    def batch_grams(self):
        """Per minibatch (minibatch CKA): the flattened Gram matrix with a zero diagonal, its sum, its row sums
        (the terms of HSIC_1 that depend on this side alone). Kept with `Parameters.grams` (small N: a pair then
        costs one dot product per batch), else made again for each pair (N / batch size of them would take
        8 N batch-size bytes per side)."""
        return self._batch_grams if self.params.grams else self._batch_terms()

    def _batch_terms(self):
        for batch in self.params.batches:
            x = self.x[batch]
            gram = x @ x.T
            np.fill_diagonal(gram, 0.0)
            yield gram.ravel(), float(gram.sum()), gram.sum(axis=1)

    @functools.cached_property
    def gram(self) -> np.ndarray:
        """The centred Gaussian Gram matrix (N, N) (rbf)."""
        return centre_gram(rbf_gram(self.x, self.params.rbf_sigma))

    @functools.cached_property
    def basis(self) -> np.ndarray:
        """(N, d) the top-d left singular vectors of the standardised features (svcca)."""
        z = self.centred / (self.x.std(axis=0, ddof=1) + SVCCA_EPS)
        u, _, _ = np.linalg.svd(z, full_matrices=False)
        return u[:, : self.params.cca_dim]

    @functools.cached_property
    def unit(self) -> np.ndarray:
        """Centred features scaled to unit Frobenius norm (procrustes)."""
        norm = np.linalg.norm(self.centred)
        return self.centred / norm if norm > 0 else self.centred

    @functools.cached_property
    def self_cknna(self) -> float:
        nb = self.neighbours
        rows = np.repeat(np.arange(self.n), nb.k)
        values = nb.similarities.ravel()
        return masked_hsic(self.n, rows, nb.indices.ravel(), values, values)

    def permuted(self, perm: np.ndarray) -> Side:
        """The same features with the samples reordered as x[perm]; what is already derived is reordered, not
        recomputed (every quantity a metric uses of one side alone is unchanged by reordering)."""
        other = Side(
            None if self.x is None else self.x[perm],
            self.params,
            origin=None if self.origin is None else self.origin[perm],
        )
        cached = vars(self)
        if "neighbours" in cached:
            other.neighbours = self.neighbours.permuted(perm)
        for name in ("centred", "basis", "unit"):
            if name in cached:
                setattr(other, name, cached[name][perm])
        if "gram" in cached:
            other.gram = self.gram[np.ix_(perm, perm)]
        if "gram_terms" in cached:
            flat, diagonal, rows, total = self.gram_terms
            other.gram_terms = (
                flat.reshape(self.n, self.n)[np.ix_(perm, perm)].ravel(),
                diagonal[perm],
                rows[perm],
                total,
            )
        for name in ("self_hsic", "self_cknna"):
            if name in cached:
                setattr(other, name, cached[name])
        return other

    def resampled(self, rows: np.ndarray) -> Side:
        """A bootstrap resample: the samples `rows` (with repeats); copies of one sample are not neighbours."""
        origin = rows if self.origin is None else self.origin[rows]
        return Side(self.x[rows], self.params, origin=origin)


def masked_hsic(n: int, rows: np.ndarray, cols: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """HSIC_1 (platonic-rep's form) of two N x N matrices that are zero but at (rows, cols), where they hold
    a and b; no entry on the diagonal."""
    A = scipy.sparse.csr_matrix((a, (rows, cols)), shape=(n, n))
    B = scipy.sparse.csr_matrix((b, (rows, cols)), shape=(n, n))
    trace = float(A.multiply(B.T).sum())  # sum(A * B^T)
    totals = float(np.sum(a)) * float(np.sum(b))  # sum(A) sum(B)
    products = float(np.bincount(cols, a, n) @ np.bincount(rows, b, n))  # sum(A B) = (1^T A)(B 1)
    return (trace + totals / ((n - 1) * (n - 2)) - 2 * products / (n - 2)) / (n * (n - 3))


def _ratio(numerator: float, a: float, b: float, eps: float = 0.0) -> float:
    product = a * b
    if not product > 0:
        return float("nan")
    return numerator / (np.sqrt(product) + eps)


def _cross(a: Side, b: Side) -> tuple[float, float]:
    """(||Xc^T Yc||_F^2, HSIC_1(Xc Xc^T, Yc Yc^T)): from the Gram matrices where both sides keep them, else
    from the features' cross moments."""
    if a.params.grams and b.params.grams:
        (ka, da, ra, sa), (kb, db, rb, sb) = a.gram_terms, b.gram_terms
        n = a.n
        linear = float(ka @ kb)
        if n < MIN_DEBIASED_SAMPLES:
            return linear, float("nan")
        trace = linear - float(da @ db)  # tr(K~ L~), the diagonals zeroed
        return linear, (trace + sa * sb / ((n - 1) * (n - 2)) - 2 * float(ra @ rb) / (n - 2)) / (n * (n - 3))
    moments = CrossMoments([a.x.shape[1]], [b.x.shape[1]])
    moments.update([a.centred], [b.centred])
    linear, debiased = moments.finish()
    return float(linear[0, 0]), float(debiased[0, 0])


def _knn_pair(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray]:
    return a.neighbours.indices, b.neighbours.indices


def per_sample(name: str, a: Side, b: Side) -> np.ndarray:
    """(N,) the per-sample terms whose mean is the kNN metric `name` (mutual, cycle, lcs, edit distance)."""
    x, y = _knn_pair(a, b)
    k = x.shape[1]
    if name == "mutual_knn":
        return shared_counts(x, y) / k
    if name == "cycle_knn":
        return cycle_hits(x, y)
    if name == "lcs_knn":
        return lcs_lengths(x, y).astype(np.float64)
    if name == "edit_distance_knn":
        return 1.0 - edit_distances(x, y) / k
    raise KeyError(name)


def cknna(a: Side, b: Side) -> float:
    """CKNNA: HSIC_1 of K and L kept where j is a neighbour of i in both, normalised by each side's own."""
    na, nb = a.neighbours, b.neighbours
    rows, cols, va, vb = [], [], [], []
    chunk = 65536
    for lo in range(0, a.n, chunk):
        i, p, q = np.nonzero(na.indices[lo : lo + chunk, :, None] == nb.indices[lo : lo + chunk, None, :])
        rows.append(i + lo)
        cols.append(na.indices[lo + i, p])
        va.append(na.similarities[lo + i, p])  # K_ij
        vb.append(nb.similarities[lo + i, q])  # L_ij
    kl = masked_hsic(a.n, *(np.concatenate(v) for v in (rows, cols, va, vb)))
    return _ratio(kl, a.self_cknna, b.self_cknna, PLATONIC_EPS)


CROSS_METRICS = ("linear", "debiased", "cka", "unbiased_cka")  # one pass of cross moments gives all four


def scores(names, a: Side, b: Side) -> dict[str, float]:
    """{name: score(name, a, b)} for several metrics of one pair; the cross moments that the four CKA
    metrics share are computed once (they were 4/5 of a default round's time, computed per metric)."""
    cross = _cross(a, b) if any(n in CROSS_METRICS for n in names) else None
    return {n: score(n, a, b, cross=cross) for n in names}


def score(name: str, a: Side, b: Side, *, cross: tuple[float, float] | None = None) -> float:
    """The metric `name` of the pair (a: X, b: Y), a float (NaN where undefined: a side without variance).
    `cross`: `_cross(a, b)` where already computed."""
    if name in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"):
        return float(per_sample(name, a, b).mean())
    if name == "cknna":
        return cknna(a, b)
    if name in CROSS_METRICS:
        linear, debiased = cross if cross is not None else _cross(a, b)
        (la, da), (lb, db) = a.self_hsic, b.self_hsic
        if name == "linear":
            return _ratio(linear, la, lb)
        if name == "debiased":
            return _ratio(debiased, da, db)
        if name == "cka":
            return _ratio(linear, la, lb, PLATONIC_EPS)
        return _ratio(debiased, da, db, PLATONIC_EPS)
    if name == "minibatch":  # unbiased_hsic_matrix of each minibatch's two Gram matrices, from the cached terms
        total = np.zeros(3)
        for batch, (ka, sa, ra), (kb, sb, rb) in zip(a.params.batches, a.batch_grams(), b.batch_grams()):
            n = len(batch)
            terms = [(ka, sa, ra, kb, sb, rb), (ka, sa, ra, ka, sa, ra), (kb, sb, rb, kb, sb, rb)]
            total += [
                (k1 @ k2 + s1 * s2 / ((n - 1) * (n - 2)) - 2 * (r1 @ r2) / (n - 2)) / (n * (n - 3))
                for k1, s1, r1, k2, s2, r2 in terms
            ]
        return _ratio(total[0], total[1], total[2])
    if name == "rbf":
        ka, kb = a.gram.ravel(), b.gram.ravel()
        return _ratio(float(ka @ kb), float(ka @ ka), float(kb @ kb))
    if name == "svcca":
        return float(np.mean(np.linalg.svd(a.basis.T @ b.basis, compute_uv=False)))
    if name == "procrustes":
        return float(2.0 - 2.0 * np.sum(np.linalg.svd(a.unit.T @ b.unit, compute_uv=False)))
    raise KeyError(f"unknown metric {name!r}; the metrics are {', '.join(METRICS)}")
