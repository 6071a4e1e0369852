"""Adaptive average pooling, defined once for numpy arrays and torch tensors.

The bins are torch's `adaptive_avg_pool2d` bins (which extraction uses on the device). Each bin is
summed in float32, cell after cell in a fixed order, and divided once: elementwise adds and one
division round the same way in numpy and torch, on a CPU or a GPU, so the store's reader and the
probes get identical numbers from the same stored grid.

Deriving a coarse grid from a stored finer one is exact when the bins nest (p divides the stored
grid g, and g divides the block's resolution), which is how the writer chooses g.
"""

from __future__ import annotations

import numpy as np


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    # torch.nn.functional.adaptive_avg_pool2d: start = floor(i*size/out), end = ceil((i+1)*size/out)
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _sum_bins(x, axis: int, out: int):
    """(x summed over the cells of each bin along `axis`, float32; cells per bin as a float32 array).

    Cells are added one after the other in index order. Equal bins are moved to a leading axis
    first, so that every add runs over contiguous memory.
    """
    size = x.shape[axis]
    shape = x.shape
    if size % out == 0:
        k = size // out
        split = (*shape[:axis], out, k, *shape[axis + 1 :])
        order = (axis + 1, *[d for d in range(len(split)) if d != axis + 1])
        if _is_torch(x):
            import torch

            cells = x.reshape(split).permute(order).to(torch.float32).contiguous()
        else:
            cells = np.ascontiguousarray(x.reshape(split).transpose(order), dtype=np.float32)
        total = cells[0].clone() if _is_torch(x) else cells[0].copy()
        for offset in range(1, k):
            total += cells[offset]
        return total, np.full(out, k, dtype=np.float32)
    index = (slice(None),) * axis
    parts = []
    for start, stop in _bins(size, out):
        total = x[(*index, slice(start, start + 1))] * 1  # a float32 copy to add into
        for cell in range(start + 1, stop):
            total += x[(*index, slice(cell, cell + 1))]
        parts.append(total)
    counts = np.array([stop - start for start, stop in _bins(size, out)], dtype=np.float32)
    if _is_torch(x):
        import torch

        return torch.cat(parts, dim=axis), counts
    return np.concatenate(parts, axis=axis), counts


def adaptive_avg_pool(features, out: int):
    """(N, C, H, W) -> (N, C, out, out) float32, of the input's kind (numpy array, or torch tensor on its device).

    Rows of each bin are summed first, then columns, in float32 and in a fixed order, then divided
    by the bin's size: the same arithmetic for numpy and torch. A grid already `out` x `out` is
    returned as float32 unchanged.
    """
    if _is_torch(features):
        import torch

        x = features.to(torch.float32)
    else:
        x = np.asarray(features, dtype=np.float32)
    if x.shape[-2:] == (out, out):
        return x.contiguous() if _is_torch(x) else np.ascontiguousarray(x)
    rows, row_counts = _sum_bins(x, 2, out)
    cells, col_counts = _sum_bins(rows, 3, out)
    divisor = row_counts[:, None] * col_counts[None, :]
    if _is_torch(cells):
        import torch

        return (cells / torch.from_numpy(divisor).to(cells.device)).contiguous()
    return np.ascontiguousarray(cells / divisor)


def read_grid(pool: int, resolution: int) -> int:
    """The side of a block's features read at `pool`: the pool, or the block's full resolution for a pool
    at or above it. This is the one place the rule is written; the writer, the reader and every
    selection (`cache.selection`) ask here."""
    return min(int(pool), int(resolution))


def stored_grid(resolution: int, pools: list[int]) -> int:
    """The grid to store for a block so that every requested pool can be derived exactly.

    A pool at or above the block's resolution means the full resolution. When the pools' least
    common multiple divides the resolution it is stored; otherwise the full map is kept.
    """
    effective = sorted({read_grid(p, resolution) for p in pools})
    grid = int(np.lcm.reduce(effective))
    return grid if resolution % grid == 0 else resolution


def derivable(grid: int, resolution: int, pool: int) -> bool:
    """Whether `pool` can be derived exactly from a stored `grid` of a block at `resolution`."""
    pool = read_grid(pool, resolution)
    return grid == resolution or (grid % pool == 0 and resolution % grid == 0)
