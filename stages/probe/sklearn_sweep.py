"""The scikit-learn sweep: each input set's estimator fits its whole grid at once, chosen on validation.

Features are kept in memory and standardised with the fit rows' statistics, as for the torch heads.
logreg and ridge are saved as linear torch heads (`stages.probe.heads.Probe`), so any torch code
can load them; kNN is non-parametric and saves its configuration only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from stages.probe import heads as H
from stages.probe.features import Layout, MemorySource, Reader, packed_rows, standardise
from stages.probe.plan import Combo, ProbePlan
from stages.probe.results import make_row, probe_config
from stages.probe.scoring import accuracy
from stages.probe.sklearn_probes import topk_labels


def sweep_sklearn(
    plan: ProbePlan, combos: list[Combo], heads_dir: Path, device: torch.device
) -> tuple[list[dict], dict]:
    """Fit, choose and score the estimators of `combos` (one pass); (configs rows, test predictions per key)."""
    settings, samples, spec = plan.settings, plan.samples, plan.spec
    (axis,) = spec.grid
    reader = Reader(
        plan.store,
        [p for c in combos for p in c.pieces],
        allow_incomplete=settings.allow_incomplete,
        threads=settings.read_threads,
    )
    layout = Layout(combos, flat=True)
    source = MemorySource(
        reader, layout, samples.fit.split, samples.fit_mask(), per_channel=False, raw=not settings.standardise
    )
    selection = source.packed if samples.carved else packed_rows(reader, layout, samples.selection, source.stats)
    estimator = spec.load()
    grid = [h[axis.name] for h in plan.hypers]
    y_fit, y_val = samples.fit.y, samples.selection.y
    fitted, rows_out = {}, []
    for ci, combo in enumerate(combos):
        started = time.perf_counter()
        X = layout.combo_matrix(source.packed, ci)
        X_val = layout.combo_matrix(selection, ci)
        if samples.carved:
            X_val = X_val[samples.selection.index]
        probe = estimator(**{axis.setting: tuple(grid)}, **plan.options).fit(X[samples.fit.index], y_fit, X_val, y_val)
        scores = probe.decision_grid(X_val)
        index = [probe.grid_index(v) for v in grid]
        combo_rows = []
        for hyper, j in zip(plan.hypers, index):
            top1, top5 = accuracy(topk_labels(scores[j], probe.classes_, 5), y_val)
            combo_rows.append(make_row(spec.name, combo, hyper, top1, top5 if plan.num_classes > 5 else None))
        # the probe chose on the same validation rows (first of its sorted grid on ties); mark that row
        best = index.index(probe.best_index_)
        combo_rows[best]["selected"] = 1
        fitted[ci] = (probe, combo_rows[best])
        rows_out += combo_rows
        logging.getLogger(__name__).info(
            "%s %s: %s=%s chosen, val top-1 %.4f (%.1f s)",
            spec.name,
            combo.key,
            axis.name,
            combo_rows[best][axis.name],
            combo_rows[best]["val_top1"],
            time.perf_counter() - started,
        )
    # test: each probe at its chosen grid value, chunk by chunk
    parts = {c.key: [] for c in combos}
    chunks = samples.test.by_chunk(samples.chunk_samples)
    for (k, index), (_, pieces) in zip(chunks, reader.chunks(samples.test.split, [k for k, _ in chunks])):
        local = index - k * samples.chunk_samples
        for key, (mean, std) in source.stats.items():
            standardise(pieces[key], mean, std)
        packed = layout.allocate(len(local))
        layout.fill(packed, slice(0, len(local)), {key: value[local] for key, value in pieces.items()})
        for ci, combo in enumerate(combos):
            probe = fitted[ci][0]
            scores = np.full((len(local), plan.num_classes), -np.inf)
            scores[:, probe.classes_] = probe.decision_function(layout.combo_matrix(packed, ci))
            parts[combo.key].append(topk_labels(scores, np.arange(plan.num_classes), 5).astype(np.int32))
    predictions = {key: np.concatenate(p) for key, p in parts.items()}
    for ci, (probe, row) in fitted.items():
        combo = combos[ci]
        top1, top5 = accuracy(predictions[combo.key], samples.test.y)
        row["test_top1"], row["test_top5"] = top1, "" if top5 is None else top5
        if spec.saved_as is None:  # non-parametric (kNN): its "weights" are the fit rows of the store
            config = probe_config(plan, combo, row, kind=spec.name)
            (heads_dir / f"{combo.key}.json").write_text(json.dumps(config, indent=2) + "\n")
            continue
        head = H.build_head(spec.saved_as, combo.shapes, plan.num_classes, {})
        with torch.no_grad():
            head.linear.weight.zero_()
            head.linear.bias.fill_(-1e4)  # classes absent from the fit rows are never predicted
            head.linear.weight[probe.classes_] = torch.from_numpy(probe.coef_)
            head.linear.bias[probe.classes_] = torch.from_numpy(probe.intercept_)
        means = [torch.from_numpy(source.stats[p][0]) for p in combo.pieces]
        stds = [torch.from_numpy(source.stats[p][1]) for p in combo.pieces]
        H.save_probe(
            H.Probe(head, means, stds), heads_dir / combo.key, probe_config(plan, combo, row, kind=spec.saved_as)
        )
    return rows_out, predictions
