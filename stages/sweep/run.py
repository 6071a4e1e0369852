"""Running a sweep: plan it, run the missing tasks on an engine, assemble each (store, head)'s results.

    from stages.sweep.engine import EngineOptions
    from stages.sweep.plan import StoreRef
    from stages.sweep.run import run_sweep
    result = run_sweep([StoreRef("adm256", "features/adm256.zarr")], ["linear", "logreg"],
                       {"blocks": (18, 19, 20), "pools": (1, 2)}, out="results", engine=EngineOptions(workers=4))
    result.runs["adm256/linear"].metrics["best"]

1. `plan_sweep` resolves every (store, head) as `pipeline probe` would and cuts it into tasks
   (`stages.sweep.plan`); the grouping is written to <out>/.sweep/plans/<sweep>.json before anything runs.
2. Only tasks without a finished result under <out>/.sweep/tasks/ are submitted: a rerun after a
   killed driver, worker or cluster continues where it stopped. A result is found by its key, which
   changes with anything that changes its numbers, so one from another configuration is never used.
3. Each run directory (<out>/<store>/<head>, or <out>/<head> for `pipeline probe --workers`) is
   assembled from its tasks' results in the plan's order and swapped in whole: configs.csv, the
   chosen configurations and the saved heads are those of the serial `pipeline probe` run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from stages.devices import resolve_device
from stages.outputs import full_disk_is_one_line, output_lock, staged_output
from stages.probe.plan import ProbeInputError
from stages.probe.record import finish_run
from stages.probe.run import ProbeResult
from stages.progress import progress_bar
from stages.sweep.engine import EngineOptions, open_engine
from stages.sweep.plan import RunPlan, StoreRef, SweepPlan, plan_sweep
from stages.sweep.task import TASKS, discard_damaged, is_done, read_task, remove_stale_partials, task_dir
from stages.sweep.versions import environment

log = logging.getLogger(__name__)


class ResultsRootError(ProbeInputError):
    """The results root cannot hold the sweep (a run directory that is not a probe's, results the workers
    wrote elsewhere)."""


@dataclass
class SweepResult:
    plan: SweepPlan
    runs: dict[str, ProbeResult]  # by run directory relative to the results root
    submitted: int  # tasks run by this call
    reused: int  # tasks whose results were already there


def run_sweep(
    stores: list[StoreRef],
    heads: list[str],
    options: dict,
    *,
    out: str | Path = "results",
    group_size: int | None = None,
    nested: bool = True,
    engine: EngineOptions = EngineOptions(),
    progress: bool = True,
) -> SweepResult:
    """Run the sweep (see the module docstring); `options` are ProbeSettings fields shared by every run.

    `threads` defaults to 1 per task here (parallelism comes from tasks; results depend on the thread
    count in the last bits, so every task of a sweep uses the same one)."""
    root = Path(out)
    with output_lock(root, "sweep"):  # a second sweep into this root would drop this one's tasks in progress
        return _run_sweep(
            root, stores, heads, options, group_size=group_size, nested=nested, engine=engine, progress=progress
        )


def _run_sweep(
    root: Path,
    stores: list[StoreRef],
    heads: list[str],
    options: dict,
    *,
    group_size: int | None,
    nested: bool,
    engine: EngineOptions,
    progress: bool,
) -> SweepResult:
    options = {"threads": 1, **options, "out": str(root)}
    plan = plan_sweep(stores, heads, options, group_size=group_size, nested=nested)
    for run in plan.runs:
        _check_run_dir(root / run.run)
    tasks = plan.tasks
    for task in tasks:
        problem = discard_damaged(root, task.key)
        if problem is not None:
            log.warning(
                "%s: its result was damaged (%s); removed, to be computed again", task_dir(root, task.key), problem
            )
    missing = [t for t in tasks if not is_done(root, t.key)]
    log.info(
        "sweep: %d run(s), %d task(s): %d already done, %d to run on %s",
        len(plan.runs),
        len(tasks),
        len(tasks) - len(missing),
        len(missing),
        engine.describe(),
    )
    # the engine first: an unreachable scheduler or a bad cluster configuration leaves nothing behind
    with open_engine(engine) if missing else contextlib.nullcontext() as runner:
        _record_plan(root, plan)
        if missing:
            with progress_bar(total=len(tasks), desc="sweep", unit="task", enabled=progress) as bar:
                bar.update(len(tasks) - len(missing))
                runner.run([t.payload(str(root)) for t in missing], lambda summary: bar.update(1))
    lost = [t for t in tasks if not is_done(root, t.key)]
    if lost:
        raise ResultsRootError(
            f"{len(lost)} task(s) finished but left no result under {root / TASKS}: the workers "
            f"must "
            f"see the results root at the same path ({root.resolve()}), e.g. on a shared file "
            "system; give --out a path they share"
        )
    remove_stale_partials(root, [t.key for t in tasks])
    runs = {run.run: assemble_run(root, run, plan) for run in plan.runs}
    return SweepResult(plan, runs, submitted=len(missing), reused=len(tasks) - len(missing))


def _check_run_dir(final: Path) -> None:
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / "run.json").exists())):
        raise ResultsRootError(f"{final} exists and is not a probe result directory; choose another --out or --name")


def _record_plan(root: Path, plan: SweepPlan) -> None:
    directory = root / ".sweep" / "plans"
    directory.mkdir(parents=True, exist_ok=True)
    ignore = root / ".sweep" / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# task results of `pipeline sweep`, keyed by content: not for git\n*\n")
    path = directory / f"{plan.key}.json"
    partial = directory / f".{plan.key}.{os.getpid()}"
    partial.write_text(json.dumps(plan.record(), indent=2) + "\n")
    os.replace(partial, path)


def assemble_run(root: Path, run: RunPlan, plan: SweepPlan) -> ProbeResult:
    """Write <root>/<run.run> from its tasks' results, as `pipeline probe` writes a run directory."""
    started = time.perf_counter()
    rows, predictions, seconds, devices = [], {}, 0.0, set()
    final = root / run.run
    _check_run_dir(final)
    with (
        output_lock(final, "sweep"),
        full_disk_is_one_line(root, f"assembling {run.run}"),
        staged_output(final) as partial,
    ):
        (partial / "heads").mkdir()
        for task in run.tasks:
            task_rows, task_predictions, heads, summary = read_task(root, task.key)
            rows += task_rows
            predictions.update(task_predictions)
            for file in sorted(heads.iterdir()):
                shutil.copy2(file, partial / "heads" / file.name)
            seconds += summary["seconds"]
            devices.add(summary["device"])
        engine = {
            "device": ", ".join(sorted(devices)),
            "seconds": round(seconds, 3),  # summed over the tasks
            "versions": environment(),
            "sweep": {
                "plan": plan.key,
                "group_size": plan.group_size,
                "tasks": [{"key": t.key, "inputs": list(t.combo_keys)} for t in run.tasks],
            },
        }
        record, metrics = finish_run(
            partial,
            run.plan,
            rows,
            predictions,
            location=str(run.store.location),
            engine=engine,
            device=resolve_device(run.settings.device),
        )
    log.info("assembled %s from %d task(s) in %.1f s", final, len(run.tasks), time.perf_counter() - started)
    return ProbeResult(final, rows, metrics, record)


def sweep_digest(result: SweepResult) -> str:
    """sha256 of every run's configs.csv and saved heads: equal digests, equal results."""
    digest = hashlib.sha256()
    for name, run in sorted(result.runs.items()):
        for file in [run.run_dir / "configs.csv", *sorted((run.run_dir / "heads").iterdir())]:
            digest.update(f"{name}/{file.name}".encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
