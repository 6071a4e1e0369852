"""scikit-learn probes over a hyper-parameter grid, each chosen on a held-out validation set.

    probe = LogRegProbe(Cs=(0.01, 0.1, 1.0)).fit(X_fit, y_fit, X_val, y_val)
    probe.val_top1_        # (n_C,) validation top-1 of every C
    probe.best_C_          # the chosen C; predict / decision_function use it
    probe.decision_grid(X) # (n_C, N, K) scores of every C

All three follow scikit-learn's conventions (`__init__` stores hyper-parameters, `fit` validates,
learns, returns self; learned state ends in `_`). They fit the whole grid in one go where the
model allows it: LogRegProbe warm-starts along increasing C, KNNProbe answers every k from one
neighbour search (voting as DINOv2 does by default, `--vote`), RidgeProbe solves every alpha from one
eigendecomposition.
Without validation data the first grid value is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from cache.errors import ConfigError
from stages.probe.settings import check_grid, check_vote


def topk_labels(scores: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """(N, K) scores -> (N, min(k, K)) class labels, best first (ties: lower class index first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray(classes)[order]


class _GridProbe(ClassifierMixin, BaseEstimator):
    """Shared: choose the grid value with the best validation top-1 (first on ties)."""

    _grid_name = ""

    def _select(self, X_val, y_val) -> None:
        if X_val is None:
            self.val_top1_ = None
            self.best_index_ = 0
            return
        X_val = check_array(X_val, dtype=np.float32)
        y_val = np.asarray(y_val)
        scores = self.decision_grid(X_val)
        self.val_top1_ = np.array([np.mean(self.classes_[s.argmax(axis=1)] == y_val) for s in scores])
        self.best_index_ = int(np.argmax(self.val_top1_))

    def grid_index(self, value) -> int:
        """Position of a grid value in `grid_` (the order of `decision_grid`)."""
        found = np.flatnonzero(self.grid_ == value)
        if not len(found):
            raise ValueError(f"{value!r} is not in the fitted grid {self.grid_.tolist()}")
        return int(found[0])

    def decision_function(self, X) -> np.ndarray:
        """(N, n_classes) scores of the chosen grid value."""
        check_is_fitted(self)
        return self.decision_grid(X)[self.best_index_]

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def _check_fit(self, X, y, name: str, values, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, y, the sorted grid) checked as scikit-learn checks them; `classes_` set."""
        grid = check_grid(type(self).__name__, name, values)
        X, y = check_X_y(X, y, dtype=dtype)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ConfigError(
                f"{type(self).__name__} needs at least 2 classes in the training data, got {len(self.classes_)}"
            )
        return X, y, np.array(sorted(set(grid)))


class _LinearGridProbe(_GridProbe):
    """A linear classifier per grid value: `coefs_` (n_grid, K, D) and `intercepts_` (n_grid, K)."""

    def _choose(self, X_val, y_val) -> None:
        self._select(X_val, y_val)
        self.coef_, self.intercept_ = self.coefs_[self.best_index_], self.intercepts_[self.best_index_]

    def decision_grid(self, X) -> np.ndarray:
        """(n_grid, N, K) logits of every grid value (fitted on the fit rows only)."""
        X = check_array(X, dtype=np.float32)
        return np.einsum("nd,gkd->gnk", X, self.coefs_) + self.intercepts_[:, None, :]

    def decision_function(self, X) -> np.ndarray:
        """(N, n_classes) logits of the chosen model (`coef_`, `intercept_`: refitted where the probe refits)."""
        check_is_fitted(self)
        X = check_array(X, dtype=np.float32)
        return X @ self.coef_.T + self.intercept_


class LogRegProbe(_LinearGridProbe):
    """Multinomial L2 logistic regression (lbfgs) for every C, warm-started along increasing C, as scikit-learn's
    `_logistic_regression_path` does. `tol` is tighter than scikit-learn's default 1e-4, which stops lbfgs
    after a few dozen iterations at large C, short of the optimum (bench/converge.py).

    `refit`: after choosing C on the validation rows, fit that C once more on fit + validation rows, as DINOv2's
    `eval/log_regression.py` does before its test; `coef_` / `intercept_` (and
    `decision_function`, `predict`) are then the refitted model's, `decision_grid` stays the fit rows' path."""

    def __init__(
        self,
        Cs: Sequence[float] = tuple(10.0 ** (e / 2) for e in range(-8, 7)),
        *,
        max_iter: int = 2000,
        tol: float = 1e-6,
        refit: bool = False,
    ):
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol
        self.refit = refit

    def fit(self, X, y, X_val=None, y_val=None) -> LogRegProbe:
        # float64: scikit-learn (1.9) keeps float32 input in float32 for lbfgs, whose loss then stops improving short
        # of `tol` (digits, C = 1: the same 71 iterations at tol 1e-6 and 1e-8, coefficients 1e-3 off the optimum)
        X, y, self.Cs_ = self._check_fit(X, y, "Cs", self.Cs, np.float64)
        self.grid_ = self.Cs_
        model = LogisticRegression(C=self.Cs_[0], max_iter=self.max_iter, tol=self.tol, warm_start=True)
        coefs, intercepts, self.n_iter_ = [], [], []
        for C in self.Cs_:
            model.set_params(C=float(C))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X, y)
            coef, intercept = _class_rows(model)
            coefs.append(coef)
            intercepts.append(intercept)
            self.n_iter_.append(int(np.max(model.n_iter_)))
        self.coefs_, self.intercepts_ = np.stack(coefs), np.stack(intercepts)  # (n_C, K, D), (n_C, K)
        self._choose(X_val, y_val)
        if X_val is not None:  # ties in validation top-1 go to the lower validation loss, as the torch sweep's `select`
            losses = np.array([_log_loss(s, np.searchsorted(self.classes_, y_val)) for s in self.decision_grid(X_val)])
            tied = np.flatnonzero(self.val_top1_ == self.val_top1_.max())
            self.best_index_ = int(tied[np.argmin(losses[tied])])
            self.coef_, self.intercept_ = self.coefs_[self.best_index_], self.intercepts_[self.best_index_]
        self.best_C_ = float(self.Cs_[self.best_index_])
        if self.refit and X_val is not None:
            X_all = np.concatenate([X, check_array(X_val, dtype=np.float64)])
            y_all = np.concatenate([y, np.asarray(y_val)])
            model = LogisticRegression(C=self.best_C_, max_iter=self.max_iter, tol=self.tol)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X_all, y_all)
            if not np.array_equal(model.classes_, self.classes_):
                raise ConfigError("the validation rows hold classes the fit rows do not; refit needs the same classes")
            self.coef_, self.intercept_ = _class_rows(model)
        return self


def _class_rows(model: LogisticRegression) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) coefficients and (K,) intercepts in float32, one row per class (binary: two symmetric rows, the
    same argmax as scikit-learn's one)."""
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef.astype(np.float32), intercept.astype(np.float32)


class RidgeProbe(_LinearGridProbe):
    """One-vs-rest ridge regression on {-1, 1} targets (RidgeClassifier) for every alpha.

    Solved in float64 from one eigendecomposition of X^T X (or X X^T when there are fewer samples
    than features), so the grid costs one factorisation.
    """

    def __init__(self, alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)):
        self.alphas = alphas

    def fit(self, X, y, X_val=None, y_val=None) -> RidgeProbe:
        X, y, self.alphas_ = self._check_fit(X, y, "alphas", self.alphas, np.float64)
        self.grid_ = self.alphas_
        Y = np.where(y[:, None] == self.classes_[None, :], 1.0, -1.0)
        x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
        Xc, Yc = X - x_mean, Y - y_mean
        coefs = []
        if X.shape[1] <= X.shape[0]:
            eigenvalues, V = np.linalg.eigh(Xc.T @ Xc)
            projected = V.T @ (Xc.T @ Yc)
            for alpha in self.alphas_:
                coefs.append(V @ (projected / (eigenvalues + alpha)[:, None]))
        else:
            eigenvalues, U = np.linalg.eigh(Xc @ Xc.T)
            projected = U.T @ Yc
            for alpha in self.alphas_:
                coefs.append(Xc.T @ (U @ (projected / (eigenvalues + alpha)[:, None])))
        coefs = np.stack(coefs)  # (n_alpha, D, K)
        self.coefs_ = np.ascontiguousarray(coefs.transpose(0, 2, 1)).astype(np.float32)  # (n_alpha, K, D)
        self.intercepts_ = (y_mean[None, :] - np.einsum("d,adk->ak", x_mean, coefs)).astype(np.float32)
        self._choose(X_val, y_val)
        self.best_alpha_ = float(self.alphas_[self.best_index_])
        return self


class KNNProbe(_GridProbe):
    """k nearest neighbours by cosine similarity; every k is answered from one search for the largest k.

    Features are L2-normalised; the neighbours of a query are the k training rows of highest cosine
    similarity s (ties: the lower training row first). Each neighbour votes for its class with

    - ``softmax`` (the default): exp(s / T), T = ``temperature`` (0.07), as DINO and DINOv2
      (`dinov2/eval/knn.py`) and solo-learn report kNN accuracy; the votes of a query are divided by
      their sum over its k neighbours (DINOv2 divides by the sum over its largest k, which changes no
      argmax);
    - ``distance``: 1 / (1 - s), scikit-learn's ``KNeighborsClassifier(metric="cosine",
      weights="distance")``, including its rule that neighbours at distance 0 take the whole vote;
    - ``uniform``: 1 (a majority vote; ties go to the lower class).

    k above the number of training rows means all of them.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 5, 10, 20, 50, 100),
        *,
        vote: str = "softmax",
        temperature: float = 0.07,
        batch_size: int = 1024,
    ):
        self.ks = ks
        self.vote = vote
        self.temperature = temperature
        self.batch_size = batch_size

    def fit(self, X, y, X_val=None, y_val=None) -> KNNProbe:
        ks = check_grid(type(self).__name__, "ks", self.ks, integer=True)
        check_vote(type(self).__name__, self.vote, self.temperature)
        X, y = check_X_y(X, y, dtype=np.float32)
        self.classes_, self._codes = np.unique(y, return_inverse=True)
        usable = sorted({min(k, len(y)) for k in ks})
        self.ks_ = self.grid_ = np.array(usable)
        self._train = _unit_rows(torch.from_numpy(np.ascontiguousarray(X)))
        self._select(X_val, y_val)
        self.best_k_ = int(self.ks_[self.best_index_])
        return self

    def grid_index(self, value) -> int:
        """k above the number of training rows means all of them."""
        return super().grid_index(min(int(value), len(self._codes)))

    def neighbours(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(N, k_max) cosine similarities (descending; ties: lower training row first) and their training rows."""
        queries = _unit_rows(torch.from_numpy(check_array(X, dtype=np.float32)))
        k = int(self.ks_.max())
        sims, indices = [], []
        for start in range(0, len(queries), self.batch_size):
            block = queries[start : start + self.batch_size] @ self._train.T
            top, index = _stable_top(block, k)
            sims.append(top.double().numpy())
            indices.append(index.numpy())
        return np.concatenate(sims), np.concatenate(indices)

    def kneighbors(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(N, k_max) cosine distances (ascending) and indices into the training rows."""
        sims, indices = self.neighbours(X)
        return np.clip(1.0 - sims, 0.0, None), indices

    def decision_grid(self, X) -> np.ndarray:
        """(n_k, N, n_classes) votes of every k, from one neighbour search."""
        sims, indices = self.neighbours(X)
        return knn_votes(
            sims, self._codes[indices], self.ks_, len(self.classes_), vote=self.vote, temperature=self.temperature
        )


def knn_votes(
    sims: np.ndarray, codes: np.ndarray, ks, num_classes: int, *, vote: str = "softmax", temperature: float = 0.07
) -> np.ndarray:
    """(n_k, N, num_classes) votes of the first k neighbours for every k in `ks`.

    sims (N, k_max): cosine similarities, most similar first; codes (N, k_max): their class indices."""
    out = np.zeros((len(ks), len(sims), num_classes))
    rows = np.broadcast_to(np.arange(len(sims))[:, None], codes.shape)
    if vote == "softmax":  # shifted by the top similarity: exp(s / T) overflows float64 for T << 1
        weights = np.exp((sims - sims[:, :1]) / temperature)
    elif vote == "uniform":
        weights = np.ones_like(sims)
    else:
        distances = np.clip(1.0 - sims, 0.0, None)
        with np.errstate(divide="ignore"):
            weights = 1.0 / distances
    for j, k in enumerate(ks):
        w = weights[:, :k].copy()
        if vote == "distance":
            exact = (distances[:, :k] == 0).any(axis=1)
            w[exact] = (distances[exact, :k] == 0).astype(float)
        np.add.at(out[j], (rows[:, :k], codes[:, :k]), w)
        if vote == "softmax":
            out[j] /= w.sum(axis=1, keepdims=True)
    return out


def _stable_top(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) the largest values of each row of `sims` (B, n), descending, and their columns; among equal
    values the lower column comes first, so which of two equally similar rows is a neighbour does not
    depend on the kernel (at the k boundary it changes the vote)."""
    n = sims.shape[1]
    top, index = torch.topk(sims, min(k + 1, n), dim=1)
    order = torch.from_numpy(np.lexsort((index.numpy(), -top.numpy()), axis=1))
    top, index = top.gather(1, order), index.gather(1, order)
    if top.shape[1] > k:  # a tie across the boundary: only a full stable sort of the row knows its order
        tied = torch.nonzero(top[:, k - 1] == top[:, k]).flatten()
        if len(tied):
            full, columns = torch.sort(sims[tied], dim=1, descending=True, stable=True)
            top[tied], index[tied] = full[:, : k + 1], columns[:, : k + 1]
    return top[:, :k], index[:, :k]


def _log_loss(logits: np.ndarray, codes: np.ndarray) -> float:
    """Mean cross-entropy of (N, K) logits against class positions `codes` (unseen classes: position K, infinite)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    seen = codes < logits.shape[1]
    picked = np.where(seen, logits[np.arange(len(codes)), np.minimum(codes, logits.shape[1] - 1)], -np.inf)
    return float(np.mean(log_z - picked))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
