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
from pathlib import Path

import numpy as np

from cache.errors import UserError
from cache.reader import FeatureStore
from stages.devices import resolve_device
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
    return (task_dir(root, key) / "task.json").is_file()


def run_task(payload: dict) -> dict:
    """Train the task `payload` describes (`Task.payload`) and write its result; returns a summary."""
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    check_same(payload["environment"], environment(), where)
    root, key = Path(payload["root"]), payload["key"]
    if is_done(root, key):
        return {"key": key, "ran": False, "where": where}
    settings = ProbeSettings(**payload["settings"])
    started = time.perf_counter()
    with thread_limit(settings.threads), FeatureStore.open(payload["location"],
                                                           settings.storage_options).hold() as store:
        plan = make_plan(store, settings)
        combos = [plan.combos[i] for i in payload["combos"]] if max(payload["combos"]) < len(plan.combos) else []
        if [c.key for c in combos] != payload["combo_keys"] or task_key(plan, combos) != key:
            raise TaskChangedError(
                f"{payload['location']} (or the code reading it) changed since the sweep was planned: the task for "
                f"{', '.join(payload['combo_keys'])} of {payload['run']} no longer matches; run the sweep again")
        device = resolve_device(settings.device)
        partial = root / TASKS / f".{key}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (partial / "heads").mkdir(parents=True)
        try:
            sweep = sweep_torch if plan.spec.is_torch else sweep_sklearn
            rows, predictions = sweep(plan, combos, partial / "heads", device)
            (partial / "rows.json").write_text(json.dumps(rows) + "\n")
            np.savez_compressed(partial / "predictions.npz", **predictions)
            summary = {"key": key, "run": payload["run"], "inputs": payload["combo_keys"], "where": where,
                       "device": str(device), "seconds": round(time.perf_counter() - started, 3)}
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
