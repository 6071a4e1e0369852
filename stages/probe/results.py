"""The probe results schema, defined once: what a run directory holds and how it is read back.

    <out>/<name>/configs.csv             one row per configuration (COLUMNS)
                 run.json                seed, store fingerprint, split roles, every setting, the plan
                 metrics.json            the configuration chosen on validation, overall and per pool, with
                                         repeats.json's summaries (built from the files around it alone)
                 per_class.csv           the chosen configuration's test accuracy on each class
                 repeats.json            --seeds and --shots: every repeat's numbers, mean and std
                 predictions.npz         top-5 test predictions of each input set's chosen configuration
                 validation_subset.json  the rows that chose the hyper-parameters
                 few_shot_subsets.json   the train rows of every few-shot episode (with --shots)
                 heads/<key>.{safetensors,json}   the chosen probe of each input set

`run_record` builds run.json and `write_run` writes every file, for every engine (`pipeline probe`,
`probe --workers`, `pipeline sweep`): where the engines agree, so do the files, but for the
ENGINE_FIELDS of run.json. The probe stage writes these; `stages.report` renders tables and plots
from them alone. "Best" always means chosen on validation; its test accuracy is what is reported.
Test metrics and their bootstrap intervals are computed here, from the saved predictions
(`stages.probe.metrics`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from cache.errors import UserError
from stages.probe.metrics import BOOTSTRAP, balanced_accuracy, bootstrap_intervals, per_class_accuracy, topk_accuracy
from stages.probe.registry import GRID_COLUMNS

# test metrics of the chosen configurations, with 95% bootstrap intervals (stages.probe.metrics)
TEST_COLUMNS = (
    "test_top1",
    "test_top5",
    "test_top1_low",
    "test_top1_high",
    "test_top5_low",
    "test_top5_high",
    "test_balanced",
    "test_balanced_low",
    "test_balanced_high",
)
COLUMNS = (
    "head",
    "key",
    "blocks",
    "timesteps",
    "pool",
    "grid",
    "dim",
    "fused",
    *GRID_COLUMNS,
    "epochs",
    "val_top1",
    "val_top5",
    "val_loss",
    "selected",
    *TEST_COLUMNS,
)
INT_COLUMNS = ("pool", "dim", "fused", "selected", "k", "epochs")
FLOAT_COLUMNS = ("val_top1", "val_top5", "val_loss", *TEST_COLUMNS, "lr", "weight_decay", "C", "alpha")
METRIC_KEYS = ("val_top1", *TEST_COLUMNS)
# run.json fields that say how and where the run was computed, not what it computed
ENGINE_FIELDS = ("device", "seconds", "versions", "sweep")
HYPER_KEYS = GRID_COLUMNS
RESULT_FILES = ("configs.csv", "run.json", "metrics.json", "predictions.npz", "validation_subset.json")
FEW_SHOT_FILE = "few_shot_subsets.json"  # with --shots
REPEATS_FILE = "repeats.json"  # with --seeds or --shots
PER_CLASS_FILE = "per_class.csv"


class ResultsError(UserError, FileNotFoundError):
    """A results directory that is missing, incomplete or damaged."""


# -- rows ----------------------------------------------------------------------------------------------
def make_row(head: str, combo, hyper: dict, val_top1: float, val_top5: float | None) -> dict:
    """A configs.csv row of one (input set, hyper-parameter set); test columns stay empty unless chosen."""
    row = {column: "" for column in COLUMNS}
    row.update(
        head=head,
        key=combo.key,
        blocks="+".join(map(str, combo.blocks)),
        timesteps="+".join(map(str, combo.timesteps)),
        pool=combo.pool,
        grid="+".join(str(g) for _, g in combo.shapes),
        dim=combo.dim,
        fused=int(combo.fused),
        val_top1=float(val_top1),
        val_top5="" if val_top5 is None else float(val_top5),
        selected=0,
    )
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
        "options": plan.options if kind in (None, spec.name) else {},  # kNN's vote; not a linear head's
        "standardisation": spec.standardisation,
        "hyper": {c: row[c] for c in HYPER_KEYS if row[c] != ""},
        "val_top1": row["val_top1"],
        "test_top1": row["test_top1"],
        "seed": plan.settings.seed,
        "store_fingerprint": plan.store.fingerprint,
    }


# -- the run record -------------------------------------------------------------------------------------
def run_record(plan, *, location: str, engine: dict) -> dict:
    """run.json of a run planned as `plan` (`stages.probe.plan.ProbePlan`): what was computed from what,
    then `engine` ({device, seconds, versions[, sweep]}: the ENGINE_FIELDS)."""
    from dataclasses import asdict, replace

    unknown = set(engine) - set(ENGINE_FIELDS)
    if unknown:
        raise ValueError(f"not engine fields of run.json: {sorted(unknown)}")
    # the data mode as the plan resolved it: every engine trains in that mode
    settings = replace(plan.settings, data_mode=plan.mode)
    store = plan.store
    return {
        "head": settings.head,
        "name": settings.run_name,
        "store": str(location),
        "store_fingerprint": store.fingerprint,
        "seed": settings.seed,
        "settings": {**asdict(settings), "storage_options": sorted(settings.storage_options or {})},  # no secrets
        "hypers": plan.hypers,
        "head_options": plan.options,
        "num_classes": plan.num_classes,
        "classes": store.classes,
        "data_kind": store.attrs.get("data", {}).get("kind", "folder"),  # what transfer tables mark (stages.transfer)
        **plan.record(),
        "bootstrap": {**BOOTSTRAP, "seed": settings.seed},  # the intervals of the TEST_COLUMNS
        **{key: engine[key] for key in ENGINE_FIELDS if key in engine},
    }


# -- writing -------------------------------------------------------------------------------------------
def score_test(rows: list[dict], predictions: dict, labels: np.ndarray, num_classes: int, seed: int) -> None:
    """Fill the TEST_COLUMNS of the chosen rows from their saved top-k predictions (in place)."""
    chosen = [r for r in rows if r["selected"] == 1 and r["key"] in predictions]
    if not chosen:
        return
    top = [np.asarray(predictions[r["key"]]) for r in chosen]
    top1 = np.stack([t[:, 0] == labels for t in top], axis=1)
    intervals = {
        "top1": bootstrap_intervals(top1, labels, seed),
        "balanced": bootstrap_intervals(top1, labels, seed, balanced=True),
    }
    with_top5 = num_classes > 5 and all(t.shape[1] >= 5 for t in top)
    if with_top5:
        top5 = np.stack([(t[:, :5] == labels[:, None]).any(axis=1) for t in top], axis=1)
        intervals["top5"] = bootstrap_intervals(top5, labels, seed)
    for i, (row, t) in enumerate(zip(chosen, top)):
        row["test_top1"] = topk_accuracy(t, labels, 1)
        row["test_top5"] = topk_accuracy(t, labels, 5) if with_top5 else ""
        row["test_balanced"] = balanced_accuracy(t, labels, num_classes)
        for name, values in intervals.items():
            row[f"test_{name}_low"], row[f"test_{name}_high"] = float(values[i, 0]), float(values[i, 1])
        if not with_top5:
            row["test_top5_low"] = row["test_top5_high"] = ""


def _csv_value(key: str, value):
    return f"{value:.6f}" if isinstance(value, float) and key.startswith(("val_", "test_")) else value


def write_run(
    directory: Path,
    rows: list[dict],
    predictions: dict,
    record: dict,
    samples,
    *,
    extras: dict | None = None,
    few_shot_subsets: dict | None = None,
) -> dict:
    """Write every result file of a run into `directory`; returns metrics.json's content.

    `extras` ({"seeds": ..., "few_shot": ...}) are written to repeats.json and added to metrics.json."""
    score_test(rows, predictions, samples.test.y, record["num_classes"], record["seed"])
    with open(directory / "configs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(k, v) for k, v in row.items()})
    np.savez_compressed(
        directory / "predictions.npz",
        index=samples.test.index.astype(np.int64),
        labels=samples.test.y.astype(np.int64),
        **predictions,
    )
    (directory / "validation_subset.json").write_text(
        json.dumps(
            {
                "split": samples.selection.split,
                "seed": record["seed"],
                "fraction": record["validation"]["fraction"],
                "indices": samples.selection.index.tolist(),
            }
        )
        + "\n"
    )
    if few_shot_subsets:
        (directory / FEW_SHOT_FILE).write_text(json.dumps(few_shot_subsets) + "\n")
    (directory / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if extras:
        (directory / REPEATS_FILE).write_text(json.dumps(extras, indent=2) + "\n")
    best = best_row(read_run(directory)[1])
    if best is not None and best["key"] in predictions:
        write_per_class(
            directory / PER_CLASS_FILE,
            np.asarray(predictions[best["key"]]),
            samples.test.y,
            record.get("classes") or [],
            record["num_classes"],
        )
    metrics = run_metrics(*read_run(directory), read_repeats(directory))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_per_class(path: Path, top: np.ndarray, labels: np.ndarray, classes: list, num_classes: int) -> None:
    """per_class.csv: each class's test samples and the chosen configuration's accuracy on them (its recall)."""
    accuracy = per_class_accuracy(top, labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "name", "test_samples", "test_accuracy"])
        for c in range(num_classes):
            name = classes[c] if c < len(classes) else str(c)
            writer.writerow([c, name, int(counts[c]), "" if np.isnan(accuracy[c]) else f"{accuracy[c]:.6f}"])


def read_repeats(run_dir: str | Path) -> dict:
    """repeats.json ({"seeds": ..., "few_shot": ...}, `stages.probe.repeats`) of a run; {} without repeats."""
    path = Path(run_dir) / REPEATS_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ResultsError(f"{path} cannot be read ({error}); re-run the probe that wrote it") from None


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
        raise ResultsError(
            f"{record_path} is not a probe's run.json (no head and name); re-run the probe that wrote it"
        )
    try:
        with open(rows_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [
                c
                for c in ("key", "blocks", "timesteps", "pool", "fused", "selected", "val_top1", "test_top1")
                if c not in (reader.fieldnames or [])
            ]
            if missing:
                raise ValueError(f"no column(s) {', '.join(missing)}")
            unknown = [c for c in reader.fieldnames if c not in COLUMNS]
            if unknown:  # e.g. a header cut short
                raise ValueError(f"unknown column(s) {', '.join(unknown)}")
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


def run_metrics(record: dict, rows: list[dict], repeats: dict | None = None) -> dict:
    """metrics.json of a run: the chosen configuration overall and per pool (and its repeats, if any)."""
    pools = sorted({r["pool"] for r in rows})
    return {
        "head": record["head"],
        "name": record["name"],
        "best": summary_of(best_row(rows)),
        "by_pool": {str(p): summary_of(best_row([r for r in rows if r["pool"] == p])) for p in pools},
        "num_input_sets": sum(1 for r in rows if r["selected"] == 1),
        "num_configurations": len(rows),
        **(repeats or {}),
    }


def describe_metrics(metrics: dict) -> list[str]:
    """metrics.json in a few lines, as `pipeline probe` and `pipeline sweep` print it under the chosen configuration:
    its test metrics with their intervals, its seeds, the few-shot episodes."""
    best = metrics["best"]

    def pct(value) -> str:
        return f"{100 * value:.1f}%"

    def with_interval(name: str) -> str:
        low, high = best.get(f"test_{name}_low"), best.get(f"test_{name}_high")
        return pct(best[f"test_{name}"]) + ("" if low is None or high is None else f" [{pct(low)}, {pct(high)}]")

    parts = [f"test top-1 {with_interval('top1')}"]
    if best.get("test_top5") is not None:
        parts.append(f"top-5 {with_interval('top5')}")
    if best.get("test_balanced") is not None:
        parts.append(f"balanced {with_interval('balanced')}")
    lines = ["  " + ", ".join(parts) + " (95% bootstrap intervals)"]
    if "seeds" in metrics:
        top1 = metrics["seeds"]["test_top1"]
        lines.append(
            f"  seeds {','.join(str(r['seed']) for r in metrics['seeds']['runs'])}: test top-1 "
            f"{pct(top1['mean'])} ± {pct(top1['std'])}"
        )
    for shots, result in (metrics.get("few_shot") or {}).get("shots", {}).items():
        top1 = result["test_top1"]
        lines.append(f"  {shots}-shot, {top1['n']} episodes: test top-1 {pct(top1['mean'])} ± {pct(top1['std'])}")
    return lines
