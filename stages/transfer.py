"""The paper's transfer table from probe results alone: one row per data set, one column per
(model, head), each cell the test top-1 of the configuration chosen on validation, with its block
and timestep. Data sets whose images overlap a model's pre-training data (Stanford Dogs is drawn
from ImageNet's training set) are marked: their numbers are not a clean transfer result.

    build_transfer({"cub": "results/cub", "aircraft": "results/aircraft"}, "report/transfer")

Each data set's directory holds one folder per model (pretrained, random_init, pixels, ...) with
that model's runs (`<model>/<head>/`, as `pipeline probe --out results/<data set>/<model>` writes
them); a directory of such directories stands for all of them. The data set's kind is read from
the runs (run.json `data_kind`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cache.errors import ConfigError
from stages.data.registry import KINDS
from stages.outputs import check_output_dir, holds_only, staged_output
from stages.probe.results import ResultsError, best_row, find_runs, read_run, summary_of

TRANSFER_FILES = {"transfer.md", "transfer.csv", "transfer.json", "transfer.png"}
BASELINES = ("random_init", "pixels")  # listed after the models, in this order
MARK = "†"


def _holds_models(directory: Path) -> bool:
    """Whether `directory` is one data set's results: <model>/run.json or <model>/<head>/run.json."""
    return any(directory.glob("*/run.json")) or any(directory.glob("*/*/run.json"))


def expand(result_dirs: Mapping[str, str | Path]) -> dict[str, Path]:
    """{data set: its results}: a directory of data sets (results/<data set>/<model>/<head>/, what the
    transfer template writes) stands for each of them, in name order."""
    out = {}
    for name, directory in result_dirs.items():
        directory = Path(directory)
        if not _holds_models(directory) and directory.is_dir():
            children = {c.name: c for c in sorted(directory.iterdir()) if c.is_dir() and _holds_models(c)}
            if children:
                out.update(children)
                continue
        out[name] = directory
    return out


def collect(result_dirs: Mapping[str, str | Path]) -> list[dict]:
    """One entry per (data set, model, head): the chosen configuration and what the table shows of it."""
    entries = []
    for dataset, directory in result_dirs.items():
        directory = Path(directory)
        models = sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        models = [
            m
            for m in models
            if (m / "run.json").exists() or any((c / "run.json").exists() for c in m.iterdir() if c.is_dir())
        ]
        if not models:
            raise ResultsError(
                f"{directory} holds no <model>/<head>/ probe results for data set {dataset!r}; "
                f"probe with --out {directory}/<model>"
            )
        for model in models:
            for run in find_runs(model):
                record, rows = read_run(run)
                best = summary_of(best_row(rows))
                kind = record.get("data_kind", "folder")
                entries.append(
                    {
                        "dataset": dataset,
                        "kind": kind,
                        "overlaps": KINDS[kind].overlaps if kind in KINDS else None,
                        "model": model.name,
                        "head": record["head"],
                        "run": run.name,
                        "best": best,
                    }
                )
    return entries


def _models(entries: list[dict]) -> list[str]:
    names = list(dict.fromkeys(e["model"] for e in entries))
    return [m for m in names if m not in BASELINES] + [m for m in BASELINES if m in names]


def _cell(best: dict | None, *, with_config: bool = True) -> str:
    if best is None or best.get("test_top1") is None:
        return "–"
    text = f"{100 * best['test_top1']:.1f}"
    if with_config and str(best["blocks"]) != "0":  # the pixel baseline has no block or timestep
        text += f" (b{best['blocks']}, t{best['timesteps']})"
    return text


def build_transfer(result_dirs: Mapping[str, str | Path], out_dir: str | Path) -> dict:
    """Write transfer.md, transfer.csv, transfer.json and transfer.png into `out_dir`; returns transfer.json's
    content: {data set: {"<model>/<head>": test top-1 of the configuration chosen on validation}}."""
    if not result_dirs:
        raise ConfigError("the transfer table needs at least one data set's results (NAME=PATH)")
    out = Path(out_dir)
    check_output_dir(out, made_by=lambda p: holds_only(p, TRANSFER_FILES), command="report", needs_overwrite=False)
    result_dirs = expand(result_dirs)
    entries = collect(result_dirs)
    models = _models(entries)
    columns = [(m, h) for m in models for h in sorted({e["head"] for e in entries if e["model"] == m})]
    table = {(e["dataset"], e["model"], e["head"]): e for e in entries}
    datasets = list(result_dirs)
    overlaps = {e["dataset"]: e["overlaps"] for e in entries if e["overlaps"]}
    metrics = {
        d: {
            f"{m}/{h}": (table[(d, m, h)]["best"] or {}).get("test_top1") if (d, m, h) in table else None
            for m, h in columns
        }
        for d in datasets
    }
    with staged_output(out) as staging:
        (staging / "transfer.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _write_csv(staging / "transfer.csv", entries)
        (staging / "transfer.md").write_text(_markdown(datasets, columns, table, overlaps) + "\n")
        plot_transfer(metrics, datasets, columns, overlaps, staging / "transfer.png")
    return metrics


def _markdown(datasets, columns, table, overlaps) -> str:
    lines = [
        "# Transfer: test top-1 (%) of the configuration chosen on validation",
        "",
        "Each cell: test top-1, and the block (b) and timestep (t) chosen on the validation split.",
        "",
        "| data set | " + " | ".join(f"{m} · {h}" for m, h in columns) + " |",
        "|---" + "|---:" * len(columns) + "|",
    ]
    for d in datasets:
        name = f"{d} {MARK}" if d in overlaps else d
        lines.append(
            f"| {name} | "
            + " | ".join(_cell(table[(d, m, h)]["best"]) if (d, m, h) in table else "–" for m, h in columns)
            + " |"
        )
    for d, what in overlaps.items():
        lines += ["", f"{MARK} {d}: its images overlap {what}; features of a model pre-trained on it have seen them."]
    return "\n".join(lines)


def _write_csv(path: Path, entries: list[dict]) -> None:
    columns = [
        "dataset",
        "kind",
        "overlaps",
        "model",
        "head",
        "run",
        "test_top1",
        "test_top5",
        "val_top1",
        "blocks",
        "timesteps",
        "pool",
        "key",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for e in entries:
            best = e["best"] or {}
            writer.writerow(
                {
                    "dataset": e["dataset"],
                    "kind": e["kind"],
                    "overlaps": e["overlaps"] or "",
                    "model": e["model"],
                    "head": e["head"],
                    "run": e["run"],
                    **{k: "" if best.get(k) is None else best[k] for k in columns[6:]},
                }
            )


def plot_transfer(
    metrics: dict, datasets: list[str], columns: list[tuple[str, str]], overlaps: dict, path: Path
) -> None:
    """Grouped bars: per data set, one bar per (model, head); overlapping data sets are marked."""
    figure = Figure(figsize=(max(5.0, 0.35 * len(datasets) * max(1, len(columns)) + 2.5), 3.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(columns))
    for i, (model, head) in enumerate(columns):
        values = [100 * v if (v := metrics[d][f"{model}/{head}"]) is not None else np.nan for d in datasets]
        bars = axes.bar(
            np.arange(len(datasets)) + (i - (len(columns) - 1) / 2) * width, values, width, label=f"{model} · {head}"
        )
        for bar, value in zip(bars, values):
            if np.isfinite(value):
                axes.text(
                    bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center", va="bottom", fontsize=6
                )
    axes.set_xticks(range(len(datasets)), [f"{d} {MARK}" if d in overlaps else d for d in datasets])
    axes.set_ylabel("test top-1 (%)")
    axes.set_ylim(0, 105)
    title = "transfer: chosen on validation, scored on test"
    axes.set_title(title + (f"\n{MARK} images overlap the pre-training data" if overlaps else ""), fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path)
