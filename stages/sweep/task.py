"""One task, where it runs (a dask worker or the driver), and its result files under the results root.

    <root>/.sweep/tasks/<key>/rows.json         the configs.csv rows of the task's input sets (exact floats)
                              predictions.npz   top-5 test predictions per input set
                              heads/            the chosen probe of each input set (as `pipeline probe` saves it)
                              task.json         the task, where and how long it ran

A task builds its result in a hidden directory beside the final one and renames it into place when
complete, so a result directory either holds everything or does not exist: a worker killed at any
moment leaves no result that could be reused. Two workers that ran the same task (a rescheduled
task whose first worker was not dead after all) write equal content; the second rename loses and
its copy is dropped.

The task reopens its store from the location string (a path or URL) and reads its features there;
no array ever goes through the scheduler. It uses no DataLoader or other worker processes (dask's
workers are daemonic processes, which may not start children): reads run in threads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

from cache.errors import UserError
from cache.reader import FeatureStore
from stages.devices import resolve_device
from stages.outputs import full_disk_is_one_line
from stages.probe.plan import make_plan
from stages.probe.run import thread_limit
from stages.probe.settings import ProbeSettings
from stages.probe.sklearn_sweep import sweep_sklearn
from stages.probe.torch_sweep import sweep_torch
from stages.sweep.plan import task_key
from stages.sweep.versions import check_same, environment

TASKS = Path(".sweep") / "tasks"


class TaskChangedError(UserError, RuntimeError):
    """The store or the request changed between planning the sweep and running one of its tasks."""


def task_dir(root: str | Path, key: str) -> Path:
    return Path(root) / TASKS / key


def is_done(root: str | Path, key: str) -> bool:
    """Whether the task has a whole result (see `result_problem`)."""
    return result_problem(root, key) is None


def has_result(root: str | Path, key: str) -> bool:
    """Whether the task's result directory was committed (whole or since damaged)."""
    return (task_dir(root, key) / "task.json").is_file()


def result_problem(root: str | Path, key: str) -> str | None:
    """None when the task's result is whole: task.json, rows.json with a row per input set, predictions.npz
    with each input set's predictions, and each input set's saved head; else what is wrong ("not run" when
    there is no result). A result damaged on disk after it was written is recomputed, never read."""
    directory = task_dir(root, key)
    if not has_result(root, key):
        return "not run"
    try:
        inputs = json.loads((directory / "task.json").read_text())["inputs"]
        rows = json.loads((directory / "rows.json").read_text())
        if not isinstance(rows, list) or not {row["key"] for row in rows} >= set(inputs):
            return "rows.json lacks rows of its input sets"
        with np.load(directory / "predictions.npz") as data:
            if not set(data.files) >= set(inputs):
                return "predictions.npz lacks predictions of its input sets"
        missing = [name for name in inputs if not (directory / "heads" / f"{name}.json").is_file()]
        if missing:
            return f"the saved head of {', '.join(missing)} is missing"
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        return f"cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return None


def run_task(payload: dict) -> dict:
    """Train the task `payload` describes (`Task.payload`) and write its result; returns a summary."""
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    check_same(payload["environment"], environment(), where)
    root, key = Path(payload["root"]), payload["key"]
    if is_done(root, key):
        return {"key": key, "ran": False, "where": where}
    discard_damaged(root, key)
    settings = ProbeSettings(**payload["settings"])
    started = time.perf_counter()
    with (
        thread_limit(settings.threads),
        FeatureStore.open(payload["location"], settings.storage_options).hold() as store,
    ):
        plan = make_plan(store, settings)
        combos = [plan.combos[i] for i in payload["combos"]] if max(payload["combos"]) < len(plan.combos) else []
        if [c.key for c in combos] != payload["combo_keys"] or task_key(plan, combos) != key:
            raise TaskChangedError(
                f"{payload['location']} (or the code reading it) changed since the sweep was planned: the task for "
                f"{', '.join(payload['combo_keys'])} of {payload['run']} no longer matches; run the sweep again"
            )
        device = resolve_device(settings.device)
        partial = root / TASKS / f".{key}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with full_disk_is_one_line(root, f"saving the heads and results of a task of {payload['run']}"):
                (partial / "heads").mkdir(parents=True)
                sweep = sweep_torch if plan.spec.is_torch else sweep_sklearn
                rows, predictions = sweep(plan, combos, partial / "heads", device)
                (partial / "rows.json").write_text(json.dumps(rows) + "\n")
                np.savez_compressed(partial / "predictions.npz", **predictions)
                summary = {
                    "key": key,
                    "run": payload["run"],
                    "inputs": payload["combo_keys"],
                    "where": where,
                    "device": str(device),
                    "seconds": round(time.perf_counter() - started, 3),
                }
                (partial / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
                _commit(partial, task_dir(root, key))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return {**summary, "ran": True}


def _commit(partial: Path, final: Path) -> None:
    try:
        os.rename(partial, final)  # atomic; fails if another copy of the task got there first
    except OSError:
        if not is_done(final.parent.parent.parent, final.name):
            raise
        shutil.rmtree(partial, ignore_errors=True)


def discard_damaged(root: str | Path, key: str) -> str | None:
    """Remove the task's result if it was committed but is no longer whole (so that it is computed again);
    returns what was wrong with it, or None."""
    problem = result_problem(root, key)
    if problem is None or problem == "not run":
        return None
    directory = task_dir(root, key)
    aside = directory.with_name(f".{key}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, aside)  # out of the way in one step; then removed
    except FileNotFoundError:
        return problem
    shutil.rmtree(aside, ignore_errors=True)
    return problem


def read_task(root: str | Path, key: str) -> tuple[list[dict], dict, Path, dict]:
    """(rows, {input-set key: predictions}, heads directory, task.json) of a finished task."""
    directory = task_dir(root, key)
    rows = json.loads((directory / "rows.json").read_text())
    with np.load(directory / "predictions.npz") as data:
        predictions = {name: data[name] for name in data.files}
    return rows, predictions, directory / "heads", json.loads((directory / "task.json").read_text())


def remove_stale_partials(root: str | Path, keys: list[str]) -> None:
    """Drop the hidden copies that killed workers left of tasks that are now done."""
    tasks = Path(root) / TASKS
    if not tasks.is_dir():
        return
    done = {key for key in keys if is_done(root, key)}
    for entry in tasks.iterdir():
        if entry.name.startswith(".") and ".partial-" in entry.name and entry.name[1:].split(".partial-")[0] in done:
            shutil.rmtree(entry, ignore_errors=True)
