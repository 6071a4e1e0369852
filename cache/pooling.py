"""Exact adaptive average pooling in numpy, with torch's bin boundaries.

Deriving a coarse grid from a stored finer one is exact when the bins nest (p divides the stored
grid g, and g divides the block's resolution), which is how the writer chooses g.
"""

from __future__ import annotations

import numpy as np


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    # torch.nn.functional.adaptive_avg_pool2d: start = floor(i*size/out), end = ceil((i+1)*size/out)
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(features: np.ndarray, out: int) -> np.ndarray:
    """(N, C, H, W) -> (N, C, out, out) float32, averaging as torch's adaptive_avg_pool2d does."""
    features = np.asarray(features, dtype=np.float32)
    n, c, h, w = features.shape
    if h == out and w == out:
        return features
    if h % out == 0 and w % out == 0:
        return features.reshape(n, c, out, h // out, out, w // out).mean(axis=(3, 5), dtype=np.float32)
    pooled = np.empty((n, c, out, out), dtype=np.float32)
    for i, (y0, y1) in enumerate(_bins(h, out)):
        for j, (x0, x1) in enumerate(_bins(w, out)):
            pooled[:, :, i, j] = features[:, :, y0:y1, x0:x1].mean(axis=(2, 3), dtype=np.float32)
    return pooled


def stored_grid(resolution: int, pools: list[int]) -> int:
    """The grid to store for a block so that every requested pool can be derived exactly.

    A pool at or above the block's resolution means the full resolution. When the pools' least
    common multiple divides the resolution it is stored; otherwise the full map is kept.
    """
    effective = sorted({min(int(p), resolution) for p in pools})
    grid = int(np.lcm.reduce(effective))
    return grid if resolution % grid == 0 else resolution


def derivable(grid: int, resolution: int, pool: int) -> bool:
    """Whether `pool` can be derived exactly from a stored `grid` of a block at `resolution`."""
    pool = min(pool, resolution)
    return grid == resolution or (grid % pool == 0 and resolution % grid == 0)
