"""Heatmaps of a similarity run, drawn as `pipeline cka` draws them (`stages.cka.heatmaps.plot_matrix`).

Per metric and pool: `<metric>_<store>_pool<p>.png` within each store of two or more features and
`<metric>_<a>_vs_<b>_pool<p>.png` per pair of stores. With permutations, also
`<metric>_calibrated_...png`: the score's gain over chance (score - null mean; null mean - score for
the Procrustes distance), grey where the score is not above chance at 5% (p-value > 0.05).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from stages.cka.heatmaps import plot_matrix
from stages.similarity import calibration
from stages.similarity.metrics import METRICS


def write_heatmaps(results: dict, out_dir: Path, *, settings, samples: int) -> list[Path]:
    """`results[pool] = (features, {metric: Scores})` -> the PNGs above; returns their paths."""
    written = []
    for pool, (features, scores) in results.items():
        stores = list(dict.fromkeys(f.store for f in features))
        index = {name: [i for i, f in enumerate(features) if f.store == name] for name in stores}
        for m, s in scores.items():
            metric = METRICS[m]
            top = metric.top(settings.topk) if metric.higher else 2.0
            what = f"{m} · {settings.preprocess} · pool {pool} · {samples} {settings.split}"
            views = [("", s.score, metric.label, "viridis" if metric.higher else "viridis_r")]
            if s.null is not None:
                mean = np.nanmean(s.null, axis=2) if np.isfinite(s.null).any() else np.full(s.score.shape, np.nan)
                gain = s.score - mean if metric.higher else mean - s.score
                p = np.array(
                    [
                        [
                            calibration.p_value(s.score[i, j], s.null[i, j], higher=metric.higher)
                            for j in range(s.score.shape[1])
                        ]
                        for i in range(s.score.shape[0])
                    ]
                )
                views.append(
                    (
                        "calibrated_",
                        np.where(p <= calibration.LEVEL, gain, np.nan),
                        f"{metric.label}: gain over chance (grey: p > {calibration.LEVEL})",
                        "viridis",
                    )
                )
            for prefix, matrix, label, cmap in views:
                for name in stores:
                    rows = index[name]
                    if len(rows) < 2:  # one feature against itself: a single cell at the metric's top, nothing to see
                        continue
                    path = out_dir / f"{m}_{prefix}{name}_pool{pool}.png"
                    plot_matrix(
                        matrix[np.ix_(rows, rows)],
                        [features[i] for i in rows],
                        [features[i] for i in rows],
                        path,
                        title=f"{name}\n{what}",
                        label=label,
                        vmax=top,
                        cmap=cmap,
                    )
                    written.append(path)
                for a, b in combinations(stores, 2):
                    path = out_dir / f"{m}_{prefix}{a}_vs_{b}_pool{pool}.png"
                    plot_matrix(
                        matrix[np.ix_(index[a], index[b])],
                        [features[i] for i in index[a]],
                        [features[i] for i in index[b]],
                        path,
                        title=f"{a} (rows) vs {b} (columns)\n{what}",
                        label=label,
                        vmax=top,
                        cmap=cmap,
                    )
                    written.append(path)
    return written
