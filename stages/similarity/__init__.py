"""Representation similarity beside CKA: the metrics of the Platonic Representation Hypothesis (Huh et al.
2024, minyoungg/platonic-rep `metrics.py`), SVCCA, orthogonal Procrustes, with permutation calibration and
bootstrap intervals, across stores (`pipeline similarity`).

- `preprocess`: platonic-rep's feature preparation (clamp at a quantile of |x|, L2-normalise rows).
- `neighbours`: chunked top-k (no N x N matrix) and the sequence scores of two neighbour lists.
- `streamed`: the same top-k read from the store in passes, for features that do not fit the budget.
- `metrics`: the metric table and each metric's arithmetic on two prepared feature sets.
- `calibration`: seeded permutation nulls, p-values and bootstrap intervals.
- `run`: the stage: resolve the request, read the stores, write CSV, JSON and heatmaps.
"""
