"""Tables, heatmaps and summaries from probe result files alone (nothing is recomputed).

A *run* is one `pipeline probe` output directory (its files: `stages.probe.results`). A *result
set* is a directory holding runs side by side (results/linear, results/knn, ...) or a run itself.
`render_run` writes a run's heatmaps and summary.md; `build_report` combines named result sets,
e.g. a pretrained model, its random-init twin and raw pixels:

    build_report({"pretrained": "results/pretrained", "random_init": "results/random_init"}, "report")

"Best" always means chosen on validation (the honest choice); its test accuracy is what is reported.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cache.errors import ConfigError
from stages.outputs import check_output_dir, holds_only, staged_output
from stages.probe.metrics import confusion_matrix
from stages.probe.results import (
    HYPER_KEYS,
    TEST_COLUMNS,
    best_row,
    find_runs,
    read_repeats,
    read_run,
    run_metrics,
    summary_of,
)


# -- one run ---------------------------------------------------------------------------------------
def render_run(run_dir: str | Path, out_dir: str | Path | None = None, *, title: str | None = None) -> dict:
    """Write heatmap_pool<p>.png and summary.md of one run (into the run by default); returns its metrics."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record, rows = read_run(run_dir)
    metrics = run_metrics(record, rows, read_repeats(run_dir))
    images = heatmaps(rows, out_dir, prefix="", title=title or record["name"])
    confusion = confusion_png(run_dir, record, best_row(rows), out_dir / "confusion.png")
    (out_dir / "summary.md").write_text(
        run_markdown(record, rows, images + ([confusion] if confusion else []), out_dir) + "\n"
    )
    return metrics


def confusion_png(run_dir: Path, record: dict, best: dict | None, path: Path) -> Path | None:
    """The row-normalised confusion matrix of the configuration chosen on validation, from predictions.npz;
    None when the run has no saved predictions of it."""
    predictions = Path(run_dir) / "predictions.npz"
    if best is None or not predictions.exists():
        return None
    with np.load(predictions) as saved:
        if best["key"] not in saved.files:
            return None
        top, labels = saved[best["key"]], saved["labels"]
    num_classes = int(record["num_classes"])
    names = [str(c) for c in (record.get("classes") or range(num_classes))]
    plot_confusion(
        confusion_matrix(top, labels, num_classes),
        names,
        path,
        title=f"{record['name']} · {best['key']}: test top-1 {100 * best['test_top1']:.1f}%",
    )
    return path


def plot_confusion(counts: np.ndarray, names: list[str], path: Path, *, title: str) -> None:
    """Rows: true class, normalised to its test samples (%); columns: predicted class. Numbers in the cells
    and every class name up to 30 classes; beyond, a name every few classes and no numbers."""
    k = len(names)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, 100 * counts / np.maximum(totals, 1), np.nan)
    side = min(16.0, max(4.5, 0.38 * k + 2.5))
    figure = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0, vmax=100, interpolation="nearest")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if np.isfinite(share[i, j]) and counts[i, j]:
                    axes.text(
                        j,
                        i,
                        f"{share[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 50 else "black",
                    )
    step = max(1, int(math.ceil(k / 30)))
    shown = list(range(0, k, step))
    short = [n if len(n) <= 18 else n[:17] + "…" for n in names]
    axes.set_xticks(shown, [short[i] for i in shown], rotation=90, fontsize=7)
    axes.set_yticks(shown, [short[i] for i in shown], fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title + "\nrows: share of each true class's test samples (%)", fontsize=9)
    figure.colorbar(image, ax=axes, label="% of the true class", fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path)


def heatmaps(rows: list[dict], out_dir: Path, *, prefix: str, title: str) -> list[Path]:
    """One PNG per pool of test top-1 over blocks x timesteps (single-input runs only)."""
    chosen = [r for r in rows if r["selected"] == 1 and not r["fused"]]
    written = []
    for pool in sorted({r["pool"] for r in chosen}):
        cells = [r for r in chosen if r["pool"] == pool]
        path = out_dir / f"{prefix}heatmap_pool{pool}.png"
        plot_heatmap(cells, path, title=f"{title} · pool {pool}×{pool}")
        written.append(path)
    return written


def plot_heatmap(cells: list[dict], path: Path, *, title: str) -> None:
    """Test top-1 (%) per (timestep row, block column); the cell chosen on validation is outlined."""
    blocks = sorted({int(r["blocks"]) for r in cells})
    timesteps = sorted({int(r["timesteps"]) for r in cells})
    values = np.full((len(timesteps), len(blocks)), np.nan)
    for r in cells:
        values[timesteps.index(int(r["timesteps"])), blocks.index(int(r["blocks"]))] = 100 * r["test_top1"]
    best = best_row(cells)
    figure = Figure(figsize=(max(4.5, 0.62 * len(blocks) + 2.2), max(2.8, 0.5 * len(timesteps) + 2.0)), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=max(high, low + 1e-6), aspect="auto")
    middle = (low + high) / 2
    for i in range(len(timesteps)):
        for j in range(len(blocks)):
            if np.isfinite(values[i, j]):
                axes.text(
                    j,
                    i,
                    f"{values[i, j]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if values[i, j] > middle else "white",
                )
    if best is not None:
        i, j = timesteps.index(int(best["timesteps"])), blocks.index(int(best["blocks"]))
        axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        axes.set_xlabel(
            f"U-Net block (ADM numbering)\nred box: chosen on validation (block {best['blocks']}, "
            f"t={best['timesteps']}: val {100 * best['val_top1']:.1f}%, "
            f"test {100 * best['test_top1']:.1f}%)"
        )
    else:
        axes.set_xlabel("U-Net block (ADM numbering)")
    axes.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    axes.set_yticks(range(len(timesteps)), [str(t) for t in timesteps])
    axes.set_ylabel("noise timestep t")
    axes.set_title(f"{title}: test top-1 (%)")
    figure.colorbar(image, ax=axes, label="test top-1 (%)")
    figure.tight_layout()
    figure.savefig(path)


def run_markdown(record: dict, rows: list[dict], images: list[Path], relative_to: Path, *, level: int = 1) -> str:
    h = "#" * level
    best = best_row(rows)
    lines = [f"{h} {record['name']} ({record['head']} head)", ""]
    samples = record.get("samples", {})
    roles = record.get("splits", {"train": "train", "validation": "carved from train", "test": "val"})
    lines.append(
        f"Store `{record.get('store')}` (fingerprint `{str(record.get('store_fingerprint', ''))[:12]}`), seed "
        f"{record.get('seed')}, {samples.get('fit')} fit ({roles['train']}) / {samples.get('val')} validation "
        f"({roles['validation']}) / {samples.get('test')} test ({roles['test']}) samples, "
        f"{len(record.get('hypers', []))} hyper-parameter sets per input set."
    )
    lines.append("")
    if best is not None:
        lines.append(
            f"Chosen on validation: **{_describe(best)}**: val top-1 {_pct(best['val_top1'])}, "
            f"test top-1 **{_pct(best['test_top1'])}**{_interval(best, 'top1')}"
            + (
                f", test top-5 {_pct(best['test_top5'])}{_interval(best, 'top5')}"
                if best.get("test_top5") is not None
                else ""
            )
            + (
                f", balanced accuracy {_pct(best['test_balanced'])}{_interval(best, 'balanced')}"
                if best.get("test_balanced") is not None
                else ""
            )
            + " (95% bootstrap intervals over test samples)."
        )
        lines.append("")
    chosen = sorted((r for r in rows if r["selected"] == 1), key=lambda r: -r["val_top1"])
    lines += [
        f"{h}# Chosen configuration per input set (sorted by validation top-1)",
        "",
        "| input set | hyper-parameters | val top-1 | test top-1 | test top-5 |",
        "|---|---|---:|---:|---:|",
    ]
    for r in chosen:
        lines.append(
            f"| {r['key']} | {_hypers(r)} | {_pct(r['val_top1'])} | {_pct(r['test_top1'])} | "
            f"{_pct(r.get('test_top5'))} |"
        )
    single = [r for r in chosen if not r["fused"]]
    for pool in sorted({r["pool"] for r in single}):
        cells = [r for r in single if r["pool"] == pool]
        blocks = sorted({int(r["blocks"]) for r in cells})
        timesteps = sorted({int(r["timesteps"]) for r in cells})
        table = {(int(r["timesteps"]), int(r["blocks"])): r["test_top1"] for r in cells}
        lines += [
            "",
            f"{h}# Test top-1 (%), pool {pool}×{pool}: timestep × block",
            "",
            "| t \\ block | " + " | ".join(map(str, blocks)) + " |",
            "|---" * (len(blocks) + 1) + "|",
        ]
        for t in timesteps:
            lines.append(f"| {t} | " + " | ".join(_pct(table.get((t, b)), sign=False) for b in blocks) + " |")
    for image in images:
        lines += ["", f"![{image.stem}]({image.relative_to(relative_to).as_posix()})"]
    return "\n".join(lines)


def _interval(row: dict, metric: str) -> str:
    low, high = row.get(f"test_{metric}_low"), row.get(f"test_{metric}_high")
    return "" if low is None or high is None else f" [{100 * low:.1f}, {100 * high:.1f}]"


def _describe(row: dict) -> str:
    noun = "blocks" if "+" in str(row["blocks"]) else "block"
    return f"{noun} {row['blocks']}, t={row['timesteps']}, pool {row['pool']}, {_hypers(row)}"


def _hypers(row: dict) -> str:
    if row.get("C") is not None:  # logreg, and the L-BFGS linear head (its lr and weight decay follow from C)
        return f"C={row['C']:g}"
    return ", ".join(f"{k}={row[k]:g}" for k in HYPER_KEYS if row.get(k) is not None)


def _pct(value, *, sign: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}" + ("%" if sign else "")


# -- several result sets -----------------------------------------------------------------------------
def build_report(result_dirs: Mapping[str, str | Path], out_dir: str | Path) -> dict:
    """Combine named result sets into `out_dir`: metrics.json, evaluation.json, best.json, configs.csv,
    summary.md, heatmaps/, confusion/ (each run's chosen configuration), comparison.png. Result sets are
    only read.

    metrics.json maps run name (the head, e.g. "linear") -> result-set name -> test top-1 of the
    configuration chosen on validation: plain numbers, so `dvc metrics show/diff` compare them;
    evaluation.json the same configuration's test top-1, top-5, balanced accuracy and their 95%
    bootstrap intervals (also DVC metrics).
    best.json (and the return value) holds the same choice with its configuration and all accuracies.
    """
    if not result_dirs:
        raise ConfigError("build_report needs at least one result directory")
    check_output_dir(Path(out_dir), made_by=is_report_output, command="report", needs_overwrite=False)
    runs = {name: [(p, *read_run(p)) for p in find_runs(path)] for name, path in result_dirs.items()}
    with staged_output(Path(out_dir)) as staging:
        return _write_report(runs, staging)


REPORT_FILES = {"summary.md", "configs.csv", "best.json", "metrics.json", "evaluation.json", "comparison.png"}
# evaluation.json (DVC metrics beside metrics.json): the chosen configuration's test metrics and intervals
EVALUATION_KEYS = ("val_top1", *TEST_COLUMNS)


def is_report_output(out: Path) -> bool:
    """Whether `out` holds only what `build_report` writes (a report can be rebuilt, so it is replaced)."""
    if not holds_only(out, REPORT_FILES, folders={"heatmaps": ".png", "confusion": ".png"}):
        return False
    summary = out / "summary.md"
    return not summary.exists() or summary.read_text().startswith("# Probe report")


def _write_report(runs: dict, out_dir: Path) -> dict:
    (out_dir / "heatmaps").mkdir()
    (out_dir / "confusion").mkdir()
    metrics: dict[str, dict] = {}
    all_rows = []
    sections = []
    for set_name, set_runs in runs.items():
        for run_dir, record, rows in set_runs:
            run_name = run_dir.name
            metrics.setdefault(run_name, {})[set_name] = summary_of(best_row(rows))
            all_rows += [{"result_set": set_name, "run": run_name, **r} for r in rows]
            images = heatmaps(
                rows, out_dir / "heatmaps", prefix=f"{set_name}__{run_name}__", title=f"{set_name} / {run_name}"
            )
            confusion = confusion_png(
                run_dir,
                {**record, "name": f"{set_name} / {run_name}"},
                best_row(rows),
                out_dir / "confusion" / f"{set_name}__{run_name}.png",
            )
            images += [confusion] if confusion else []
            sections.append(
                run_markdown({**record, "name": f"{set_name} / {run_name}"}, rows, images, out_dir, level=2)
            )
    headline = {
        run: {name: None if best is None else best["test_top1"] for name, best in per_set.items()}
        for run, per_set in metrics.items()
    }
    (out_dir / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")
    evaluation = {
        run: {
            name: None if best is None else {k: best[k] for k in EVALUATION_KEYS if best.get(k) is not None}
            for name, best in per_set.items()
        }
        for run, per_set in metrics.items()
    }
    (out_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    (out_dir / "best.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_rows(out_dir / "configs.csv", all_rows)
    names = list(runs)
    comparison = out_dir / "comparison.png"
    plot_comparison(metrics, names, comparison)
    lines = [
        "# Probe report",
        "",
        "Test top-1 of the configuration chosen on validation, per head and result set.",
        "",
        "| head | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for run_name, per_set in sorted(metrics.items()):
        cells = []
        for name in names:
            best = per_set.get(name)
            cells.append("–" if best is None else f"{_pct(best['test_top1'])} ({best['key']})")
        lines.append(f"| {run_name} | " + " | ".join(cells) + " |")
    lines += ["", f"![comparison]({comparison.name})", "", "\n\n".join(sections)]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return metrics


def headline(metrics: dict, names: list[str]) -> list[str]:
    """The headline table of `build_report`'s return value, as aligned text lines: per head and result set,
    the test top-1 of the configuration chosen on validation, its 95% interval and that configuration."""
    header = ("head", "features", "test top-1 [95% interval]", "chosen on validation")
    rows = []
    for head, per_set in sorted(metrics.items()):
        for name in names:
            best = per_set.get(name)
            if best is None:
                rows.append((head, name, "–", "no result"))
            else:
                rows.append((head, name, _pct(best["test_top1"]) + _interval(best, "top1"), _describe(best)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in (header, *rows)]


def _write_rows(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


def plot_comparison(metrics: dict, names: list[str], path: Path) -> None:
    """Grouped bars: per head, the chosen configuration's test top-1 of each result set."""
    heads = sorted(metrics)
    figure = Figure(figsize=(max(4.5, 1.2 * len(heads) * max(1, len(names)) * 0.6 + 2), 3.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [100 * metrics[h][name]["test_top1"] if metrics[h].get(name) else np.nan for h in heads]
        bars = axes.bar(np.arange(len(heads)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        for bar, value in zip(bars, values):
            if np.isfinite(value):
                axes.text(
                    bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7
                )
    axes.set_xticks(range(len(heads)), heads)
    axes.set_ylabel("test top-1 (%)")
    axes.set_ylim(0, 105)
    axes.set_title("chosen on validation, scored on test")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path)
