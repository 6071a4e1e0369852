"""Heatmaps of a CKA run: the (block x timestep) matrix within each store, and each pair of stores.

Features are grouped by timestep along both axes (blocks in order within a group, the group's
timestep written on the opposite side, white lines between groups), so a store's picture reads as
sub-squares of blocks x blocks per pair of timesteps. Values are written in the cells where they fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stages.cka.streaming import Feature


def write_heatmaps(matrices: dict, out_dir: Path, *, estimator: str, split: str, samples: int) -> list[Path]:
    """`matrices[pool] = (features, (A, A) CKA)` -> `<store>_pool<p>.png` per store and
    `<a>_vs_<b>_pool<p>.png` per pair of stores; returns the paths."""
    written = []
    for pool, (features, matrix) in matrices.items():
        stores = list(dict.fromkeys(f.store for f in features))
        index = {name: [i for i, f in enumerate(features) if f.store == name] for name in stores}
        what = f"{estimator} CKA · pool {pool}×{pool} · {samples} {split} samples"
        for name in stores:
            path = out_dir / f"{name}_pool{pool}.png"
            rows = index[name]
            plot_matrix(
                matrix[np.ix_(rows, rows)],
                [features[i] for i in rows],
                [features[i] for i in rows],
                path,
                title=f"{name}: {what}",
            )
            written.append(path)
        for a, b in combinations(stores, 2):
            path = out_dir / f"{a}_vs_{b}_pool{pool}.png"
            plot_matrix(
                matrix[np.ix_(index[a], index[b])],
                [features[i] for i in index[a]],
                [features[i] for i in index[b]],
                path,
                title=f"{a} (rows) vs {b} (columns): {what}",
            )
            written.append(path)
    return written


def plot_matrix(
    values: np.ndarray,
    rows: Sequence[Feature],
    columns: Sequence[Feature],
    path: Path,
    *,
    title: str,
    label: str = "CKA",
    vmax: float = 1.0,
    cmap: str = "viridis",
) -> None:
    """One heatmap: CKA (or the score `label` names, at most `vmax`) of `rows` x `columns` features, labelled
    by block, grouped by timestep; NaN cells grey."""
    values = np.asarray(values, dtype=np.float64)
    count = max(len(rows), len(columns))
    cell = float(np.clip(10.0 / count, 0.2, 0.6))  # inches per cell
    figure = Figure(figsize=(len(columns) * cell + 2.8, len(rows) * cell + 2.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = values[np.isfinite(values)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
    image = axes.imshow(
        np.ma.masked_invalid(values), cmap=colours, vmin=low, vmax=vmax, aspect="equal", interpolation="nearest"
    )
    if cell >= 0.33:
        size = 5.5 if cell < 0.45 else 7
        for i in range(len(rows)):
            for j in range(len(columns)):
                if np.isfinite(values[i, j]):
                    light = values[i, j] > (low + vmax) / 2  # viridis is light at the top
                    if cmap != "viridis":  # another map: black on light cells by the cell's own luminance
                        red, green, blue, _ = colours(image.norm(values[i, j]))
                        light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                    axes.text(
                        j,
                        i,
                        f"{values[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="black" if light else "white",
                    )
    tick = 7 if cell >= 0.3 else 5.5
    axes.set_xticks(range(len(columns)), [str(f.block) for f in columns], fontsize=tick)
    axes.set_yticks(range(len(rows)), [str(f.block) for f in rows], fontsize=tick)
    _timestep_groups(axes, columns, "x")
    _timestep_groups(axes, rows, "y")
    axes.set_xlabel(f"{columns[0].store}: block" if columns else "")
    axes.set_ylabel(f"{rows[0].store}: block" if rows else "")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label=label, fraction=0.04, pad=0.1)
    figure.tight_layout()
    figure.savefig(path)


def _timestep_groups(axes, features: Sequence[Feature], axis: str) -> None:
    """Timestep labels on the far side of `axis`, with a line between consecutive timestep groups."""
    groups = []
    for i, f in enumerate(features):
        if not groups or groups[-1][0] != f.timestep:
            groups.append([f.timestep, i, i])
        groups[-1][2] = i
    centres = [(first + last) / 2 for _, first, last in groups]
    labels = [f"t={t}" for t, _, _ in groups]
    if axis == "x":
        top = axes.secondary_xaxis("top")
        top.set_xticks(centres, labels, fontsize=8)
        top.tick_params(length=0)
    else:
        right = axes.secondary_yaxis("right")
        right.set_yticks(centres, labels, fontsize=8, rotation=90, va="center")
        right.tick_params(length=0)
    for _, first, _ in groups[1:]:
        (axes.axvline if axis == "x" else axes.axhline)(first - 0.5, color="white", linewidth=1.5)
