"""Test metrics of saved predictions: top-1, top-5, balanced and per-class accuracy, the confusion
matrix, percentile-bootstrap intervals, and mean and standard deviation over repeats.

Every function reads (N, k) top-k class predictions, best first (-1: no prediction, counted wrong),
and (N,) true labels, as predictions.npz stores them. The definitions are scikit-learn's:

- top-k accuracy: the share of samples whose label is among the first k predictions
  (`sklearn.metrics.top_k_accuracy_score`); top-5 only with more than 5 classes;
- balanced accuracy: the mean over the classes present in the labels of each class's recall
  (`sklearn.metrics.balanced_accuracy_score`); per-class accuracy is that recall;
- bootstrap interval (Efron & Tibshirani 1993, the percentile method): B = 1000 resamples of the test
  samples, drawn with replacement by `np.random.default_rng([seed, 2])`; the 2.5th and 97.5th
  percentiles of the metric over the resamples. The same resamples serve every configuration of a
  run, so their intervals are comparable.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = {
    "resamples": 1000,
    "confidence": 0.95,
    "method": "percentile; test samples drawn with replacement",
    "rng": "numpy.random.default_rng([seed, 2])",
}
_CHUNK = 100  # resamples drawn at once: (100, N) counts


def topk_accuracy(top: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float(np.mean((top[:, :k] == labels[:, None]).any(axis=1)))


def per_class_accuracy(top: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) recall of each class; NaN for a class without test samples."""
    correct = top[:, 0] == labels
    totals = np.bincount(labels, minlength=num_classes).astype(float)
    hits = np.bincount(labels[correct], minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / totals, np.nan)


def balanced_accuracy(top: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    return float(np.nanmean(per_class_accuracy(top, labels, num_classes)))


def confusion_matrix(top: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts of the top-1 predictions; samples without a prediction are left out."""
    valid = top[:, 0] >= 0
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels[valid], top[valid, 0]), 1)
    return matrix


def bootstrap_intervals(
    correct: np.ndarray,
    labels: np.ndarray,
    seed: int,
    *,
    balanced: bool = False,
    resamples: int = BOOTSTRAP["resamples"],
    confidence: float = BOOTSTRAP["confidence"],
) -> np.ndarray:
    """(S, 2) percentile-bootstrap interval of the accuracy of each column of `correct` (N, S) booleans.

    With `balanced`, of the balanced accuracy (per-class means within each resample; a class a resample
    misses is left out of its mean). A resample is a vector of counts (how often each test sample was
    drawn), so each chunk of resamples costs one matrix product for all S configurations."""
    correct = np.asarray(correct, np.float64).reshape(len(labels), -1)
    n = len(labels)
    rng = np.random.default_rng([int(seed), 2])
    classes = np.unique(labels)
    values = []
    for start in range(0, resamples, _CHUNK):
        r = min(_CHUNK, resamples - start)
        draws = rng.integers(0, n, size=(r, n)) + n * np.arange(r)[:, None]
        counts = np.bincount(draws.ravel(), minlength=r * n).reshape(r, n).astype(np.float64)
        if not balanced:
            values.append(counts @ correct / n)
            continue
        per_class = []
        for c in classes:
            rows = labels == c
            drawn = counts[:, rows].sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class.append(np.where(drawn > 0, counts[:, rows] @ correct[rows] / drawn, np.nan))
        values.append(np.nanmean(np.stack(per_class), axis=0))
    tail = 100 * (1 - confidence) / 2
    return np.percentile(np.concatenate(values), [tail, 100 - tail], axis=0).T


def mean_std(values) -> dict:
    """{"mean", "std" (sample standard deviation, n - 1; 0 for one value), "n", "values"}."""
    values = [float(v) for v in values]
    array = np.array(values)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }
