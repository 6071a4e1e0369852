"""The feature preparation platonic-rep applies before every metric (`measure_alignment.py`):

1. `clamp`: clip every value to [-q, q], q the 0.95 quantile of |x| taken as platonic-rep's exact
   form does (`remove_outliers(..., exact=True)`): the element at index int(0.95 * numel) of the
   sorted |x|, no interpolation. platonic-rep takes it over one model's features of all layers at
   once; here it is taken over one array (store, block, timestep, pool), the unit this project compares.
2. `l2`: each row divided by max(||x||, 1e-12) (torch.nn.functional.normalize).

`PREPROCESS` names the choices: none, l2, clamp-l2 (both, in that order).
"""

from __future__ import annotations

import numpy as np

PREPROCESS = ("clamp-l2", "l2", "none")
CLAMP_QUANTILE = 0.95
L2_EPS = 1e-12


def clamp_value(x: np.ndarray, q: float = CLAMP_QUANTILE) -> float:
    """The element at index int(q * numel) of sorted |x| (platonic-rep's exact quantile)."""
    flat = np.abs(np.asarray(x)).ravel()
    index = min(int(q * flat.size), flat.size - 1)
    return float(np.partition(flat, index)[index])


def preprocess(x: np.ndarray, how: str) -> np.ndarray:
    """(N, D) features -> (N, D) float64 prepared as `how` says (a new array)."""
    if how not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {how!r}")
    out = np.array(x, dtype=np.float64).reshape(len(x), -1)
    if how == "clamp-l2":
        limit = clamp_value(out)
        np.clip(out, -limit, limit, out=out)
    if how in ("l2", "clamp-l2"):
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), L2_EPS)
    return out
