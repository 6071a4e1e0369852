"""The probe results schema, defined once: what a run directory holds and how it is read back.

    <out>/<name>/configs.csv             one row per configuration (COLUMNS)
                 run.json                seed, store fingerprint, split roles, every setting, the plan
                 metrics.json            the configuration chosen on validation, overall and per pool
                 predictions.npz         top-5 test predictions of each input set's chosen configuration
                 validation_subset.json  the rows that chose the hyper-parameters
                 heads/<key>.{safetensors,json}   the chosen probe of each input set

The probe stage writes these; `stages.report` renders tables and plots from them alone. "Best" always
means chosen on validation; its test accuracy is what is reported.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from cache.errors import UserError
from stages.probe.registry import GRID_COLUMNS

COLUMNS = ("head", "key", "blocks", "timesteps", "pool", "grid", "dim", "fused", *GRID_COLUMNS, "epochs",
           "val_top1", "val_top5", "val_loss", "selected", "test_top1", "test_top5")
INT_COLUMNS = ("pool", "dim", "fused", "selected", "k", "epochs")
FLOAT_COLUMNS = ("val_top1", "val_top5", "val_loss", "test_top1", "test_top5", "lr", "weight_decay", "C", "alpha")
METRIC_KEYS = ("val_top1", "test_top1", "test_top5")
HYPER_KEYS = GRID_COLUMNS
RESULT_FILES = ("configs.csv", "run.json", "metrics.json", "predictions.npz", "validation_subset.json")


class ResultsError(UserError, FileNotFoundError):
    """A results directory that is missing, incomplete or damaged."""


# -- rows ----------------------------------------------------------------------------------------------
def make_row(head: str, combo, hyper: dict, val_top1: float, val_top5: float | None) -> dict:
    """A configs.csv row of one (input set, hyper-parameter set); test columns stay empty unless chosen."""
    row = {column: "" for column in COLUMNS}
    row.update(head=head, key=combo.key, blocks="+".join(map(str, combo.blocks)),
               timesteps="+".join(map(str, combo.timesteps)), pool=combo.pool,
               grid="+".join(str(g) for _, g in combo.shapes), dim=combo.dim, fused=int(combo.fused),
               val_top1=float(val_top1), val_top5="" if val_top5 is None else float(val_top5), selected=0)
    row.update(hyper)
    return row


def probe_config(plan, combo, row: dict, *, kind: str | None = None) -> dict:
    """The json beside a saved probe: what `load_probe` needs to rebuild it, and where it came from."""
    spec = plan.spec
    return {
        "kind": kind or spec.name,
        "trained_as": spec.name,
        "key": combo.key,
        "inputs": [list(s) for s in combo.shapes],
        "reads": [{"block": b, "timestep": t, "pool": combo.pool, "grid": g} for b, t, g in combo.pieces],
        "num_classes": plan.num_classes,
        "classes": plan.store.classes,
        "options": plan.options if kind is None else {},
        "standardisation": spec.standardisation,
        "hyper": {c: row[c] for c in HYPER_KEYS if row[c] != ""},
        "val_top1": row["val_top1"],
        "test_top1": row["test_top1"],
        "seed": plan.settings.seed,
        "store_fingerprint": plan.store.fingerprint,
    }


# -- writing -------------------------------------------------------------------------------------------
def write_run(directory: Path, rows: list[dict], predictions: dict, record: dict, samples) -> dict:
    """Write every result file of a run into `directory`; returns metrics.json's content."""
    with open(directory / "configs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) and k.endswith(("top1", "top5", "loss")) else v)
                             for k, v in row.items()})
    np.savez_compressed(directory / "predictions.npz", index=samples.test.index.astype(np.int64),
                        labels=samples.test.y.astype(np.int64), **predictions)
    (directory / "validation_subset.json").write_text(json.dumps(
        {"split": samples.selection.split, "seed": record["seed"], "fraction": record["validation"]["fraction"],
         "indices": samples.selection.index.tolist()}) + "\n")
    (directory / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    metrics = run_metrics(*read_run(directory))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# -- reading -------------------------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(run.json, configs.csv rows with numbers parsed); a missing, empty or damaged file is a ResultsError."""
    run_dir = Path(run_dir)
    record_path, rows_path = run_dir / "run.json", run_dir / "configs.csv"
    if not record_path.exists() or not rows_path.exists():
        raise ResultsError(f"{run_dir} is not a probe result (no run.json and configs.csv); run `pipeline probe` first")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
        raise ResultsError(f"{record_path} cannot be read ({error}); re-run the probe that wrote it") from None
    if not isinstance(record, dict) or "head" not in record or "name" not in record:
        raise ResultsError(f"{record_path} is not a probe's run.json (no head and name); re-run the probe that wrote "
                           f"it")
    try:
        with open(rows_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("key", "blocks", "timesteps", "pool", "fused", "selected", "val_top1", "test_top1")
                       if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"no column(s) {', '.join(missing)}")
            rows = [_parse(row, rows_path, number) for number, row in enumerate(reader, 2)]
    except (OSError, ValueError, csv.Error) as error:
        raise ResultsError(f"{rows_path} is damaged ({error}); re-run the probe that wrote it") from None
    if not rows:
        raise ResultsError(f"{rows_path} has no configurations; re-run the probe that wrote it")
    return record, rows


def _parse(row: dict, path: Path, line: int) -> dict:
    if None in row or any(v is None for v in row.values()):
        raise ValueError(f"line {line} does not have one value per column")
    out = dict(row)
    for key in INT_COLUMNS:
        out[key] = int(float(out[key])) if out.get(key, "") != "" else None
    for key in FLOAT_COLUMNS:
        out[key] = float(out[key]) if out.get(key, "") != "" else None
    return out


def find_runs(path: str | Path) -> list[Path]:
    """The run directories of a result set: the path itself, or its sub-directories holding run.json."""
    path = Path(path)
    if (path / "run.json").exists():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / "run.json").exists()) if path.is_dir() else []
    if not runs:
        raise ResultsError(f"no probe results under {path} (looked for run.json in it and its sub-directories)")
    return runs


def best_row(rows: list[dict]) -> dict | None:
    """The chosen configuration with the best validation top-1 (first on ties)."""
    chosen = [r for r in rows if r["selected"] == 1]
    return max(chosen, key=lambda r: r["val_top1"]) if chosen else None


def summary_of(row: dict | None) -> dict | None:
    if row is None:
        return None
    out = {"key": row["key"], "blocks": row["blocks"], "timesteps": row["timesteps"], "pool": row["pool"]}
    out.update({k: row[k] for k in HYPER_KEYS if row.get(k) is not None})
    out.update({k: row[k] for k in METRIC_KEYS if row.get(k) is not None})
    return out


def run_metrics(record: dict, rows: list[dict]) -> dict:
    """metrics.json of a run: the chosen configuration overall and per pool."""
    pools = sorted({r["pool"] for r in rows})
    return {
        "head": record["head"],
        "name": record["name"],
        "best": summary_of(best_row(rows)),
        "by_pool": {str(p): summary_of(best_row([r for r in rows if r["pool"] == p])) for p in pools},
        "num_input_sets": sum(1 for r in rows if r["selected"] == 1),
        "num_configurations": len(rows),
    }
