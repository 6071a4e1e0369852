"""Sweeps as tasks (`pipeline sweep`, `pipeline probe --workers`): the plan, exact results on every
engine, nothing lost when a worker or the driver is killed, the SLURM job script.

One local cluster of two worker processes on 127.0.0.1 serves the whole module (started by the
engine's own `--workers` code); every test connects to it by its address (`--scheduler`).
"""

from __future__ import annotations

import filecmp
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dask
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from pipeline.cli import main
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings
from stages.sweep.engine import EngineOptions, open_engine
from stages.sweep.plan import StoreRef, plan_sweep
from stages.sweep.run import SweepResult, run_sweep, sweep_digest
from stages.sweep.task import TASKS, run_task
from stages.sweep.versions import VersionMismatchError

from helpers import digits_features, write_store

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(epochs=3, batch_size=64, lrs=(1e-3, 1e-2), pools=(1, 2))
CLI_OPTS = ["--epochs", "3", "--batch-size", "64", "--lr", "1e-3,1e-2", "--pool", "1,2"]
HEADS = ["linear", "ridge"]
GROUP = 2  # 8 input sets per run: 4 tasks per (store, head)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    features, labels = digits_features(n_train=600)
    return write_store(
        tmp_path_factory.mktemp("sweep") / "digits.zarr", features, labels, pools=(1, 2), resolution={1: 8, 2: 8}
    )


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The sweep in this process: what every engine must reproduce bit for bit."""
    return run_sweep(
        [StoreRef("digits", str(store))],
        HEADS,
        OPTS,
        out=tmp_path_factory.mktemp("ref"),
        group_size=GROUP,
        progress=False,
    )


@pytest.fixture(scope="module")
def cluster():
    """(scheduler address, client) of a `--workers 2` engine."""
    # Workers forked from this process start with torch imported (users' workers are spawned, dask's
    # default): on a busy 2-core machine spawning and importing costs each worker tens of seconds.
    # distributed's defaults must be loaded before dask.config.set scopes them: a set whose block
    # imports distributed removes its whole "distributed" section on exit, and every later test that
    # reads dask's distributed config fails with KeyError('distributed').
    import distributed  # noqa: F401

    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"}),
        open_engine(EngineOptions(workers=2)) as engine,
    ):
        assert engine.dashboard is None
        yield engine.client.scheduler.address, engine.client


def run_digest(result, run: str) -> str:
    return sweep_digest(SweepResult(result.plan, {run: result.runs[run]}, 0, 0))


def on(cluster) -> EngineOptions:
    return EngineOptions(scheduler=cluster[0], connect_timeout=10)


# -- the plan ---------------------------------------------------------------------------------------
def test_tasks_are_groups_keyed_by_what_decides_their_numbers(store, tmp_path):
    refs = [StoreRef("digits", str(store))]
    plan = plan_sweep(refs, HEADS, OPTS, group_size=3)
    assert [len(r.tasks) for r in plan.runs] == [3, 3]  # 8 input sets in groups of at most 3
    assert [list(t.combos) for t in plan.runs[0].tasks] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # by default linear banks keep whole passes, heads trained one input set at a time get a task each
    default = plan_sweep(refs, HEADS, OPTS)
    assert [[list(t.combos) for t in r.tasks] for r in default.runs] == [[list(range(8))], [[i] for i in range(8)]]
    keys = [t.key for t in plan.tasks]
    assert len(set(keys)) == len(keys)
    record = plan.record()
    assert record["runs"][0]["tasks"][0]["inputs"] == ["b1_t10_p1", "b1_t90_p1", "b2_t10_p1"]
    # what never changes a number leaves the keys alone; anything that does changes every one
    # (a budget is the whole process's: 1 TB holds this one, whatever pytest itself holds)
    same = plan_sweep(
        [StoreRef("other", str(store))],
        HEADS,
        {**OPTS, "out": "x", "memory_budget": 2**40, "read_threads": 2},
        group_size=3,
    )
    assert [t.key for t in same.tasks] == keys
    for change in ({"seed": 1}, {"lrs": (1e-3,)}, {"epochs": 4}, {"threads": 2}, {"val_fraction": 0.2}):
        other = plan_sweep(refs, HEADS, {**OPTS, **change}, group_size=3)
        assert not set(t.key for t in other.tasks) & set(keys), change


def test_in_process_sweep_is_pipeline_probe(store, reference, tmp_path):
    """The default grouping is bit-identical to `pipeline probe`; linear banks cut smaller (the reference's
    groups of 2) give the same rows and choices, heads equal to float rounding."""
    exact = run_sweep([StoreRef("digits", str(store))], HEADS, OPTS, out=tmp_path / "passes", progress=False)
    for head in HEADS:
        serial = run_probe(ProbeSettings(store=str(store), head=head, out=str(tmp_path / "serial"), threads=1, **OPTS))
        for sweep, exact_heads in ((exact, True), (reference, False)):
            run = sweep.runs[f"digits/{head}"]
            assert (run.run_dir / "configs.csv").read_text() == (serial.run_dir / "configs.csv").read_text()
            assert run.metrics == serial.metrics
            names = sorted(p.name for p in (serial.run_dir / "heads").iterdir())
            assert sorted(p.name for p in (run.run_dir / "heads").iterdir()) == names
            for name in names:
                mine, theirs = run.run_dir / "heads" / name, serial.run_dir / "heads" / name
                if exact_heads or head != "linear" or name.endswith(".json"):
                    assert filecmp.cmp(mine, theirs, shallow=False), name
                else:
                    a, b = load_file(mine), load_file(theirs)
                    for tensor in b:
                        np.testing.assert_allclose(a[tensor], b[tensor], rtol=1e-5, atol=1e-7)
            with np.load(run.run_dir / "predictions.npz") as a, np.load(serial.run_dir / "predictions.npz") as b:
                assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in b.files)


def test_a_rerun_runs_nothing_and_another_configuration_reuses_nothing(store, reference, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(reference.runs["digits/linear"].run_dir.parents[1], root)
    again = run_sweep([StoreRef("digits", str(store))], HEADS, OPTS, out=root, group_size=GROUP, progress=False)
    assert (again.submitted, again.reused) == (0, 8)
    assert sweep_digest(again) == sweep_digest(reference)
    other = run_sweep(
        [StoreRef("digits", str(store))], ["linear"], {**OPTS, "seed": 1}, out=root, group_size=GROUP, progress=False
    )
    assert (other.submitted, other.reused) == (4, 0)


@pytest.mark.slow  # the module's local dask cluster
def test_results_on_two_local_workers_equal_the_in_process_run(store, reference, cluster, tmp_path):
    address, client = cluster
    assert address.startswith("tcp://127.0.0.1:") and len(client.scheduler_info()["workers"]) == 2
    assert all(w.startswith("tcp://127.0.0.1:") for w in client.scheduler_info()["workers"])
    with pytest.raises(urllib.error.HTTPError):  # no dashboard unless asked for
        urllib.request.urlopen(client.dashboard_link, timeout=10)
    result = run_sweep(
        [StoreRef("digits", str(store))],
        HEADS,
        OPTS,
        out=tmp_path,
        group_size=GROUP,
        engine=on(cluster),
        progress=False,
    )
    assert result.submitted == 8
    assert sweep_digest(result) == sweep_digest(reference)
    ran_on = {path.read_text().split('"where": ')[1].split(",")[0] for path in (tmp_path / TASKS).glob("*/task.json")}
    assert str(os.getpid()) not in " ".join(ran_on) and len(ran_on) >= 1


@pytest.mark.slow  # the module's local dask cluster
def test_a_worker_killed_mid_task_loses_nothing(store, reference, cluster, tmp_path):
    """SIGKILL the worker process that is training a task (found by its task's partial directory)."""
    killed = []

    def kill_one():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for partial in (tmp_path / TASKS).glob(".*.partial-*") if (tmp_path / TASKS).exists() else []:
                pid = int(partial.name.split(".partial-")[1].split("-")[-2])
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one)
    killer.start()
    result = run_sweep(
        [StoreRef("digits", str(store))],
        ["linear"],
        OPTS,
        out=tmp_path,
        group_size=GROUP,
        engine=on(cluster),
        progress=False,
    )
    killer.join()
    assert killed, "no task was seen running"
    assert result.submitted == 4
    assert run_digest(result, "digits/linear") == run_digest(reference, "digits/linear")
    assert not list((tmp_path / TASKS).glob(".*"))  # the killed task's partial copy is gone
    deadline = time.monotonic() + 60  # the nanny restarts the worker
    while len(cluster[1].scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)


def _drive(store: str, out: str) -> None:
    os.setsid()  # out of pytest's process group: only this driver is killed
    run_sweep([StoreRef("digits", store)], ["linear"], OPTS, out=out, group_size=GROUP, progress=False)


@pytest.mark.slow  # the module's local dask cluster
def test_a_killed_driver_is_rerun_and_runs_only_missing_tasks(store, reference, cluster, tmp_path):
    """A driver (in-process engine, forked so that it starts with torch imported) SIGKILLed after its first
    task; the rerun, on the cluster, runs the others only."""
    driver = multiprocessing.get_context("fork").Process(target=_drive, args=(str(store), str(tmp_path)))
    driver.start()
    deadline = time.monotonic() + 120
    while not list((tmp_path / TASKS).glob("*/task.json")) and time.monotonic() < deadline and driver.is_alive():
        time.sleep(0.005)
    os.kill(driver.pid, signal.SIGKILL)
    driver.join()
    finished = len(list((tmp_path / TASKS).glob("*/task.json")))
    assert 1 <= finished < 4
    assert not (tmp_path / "digits").exists()  # nothing assembled yet
    result = run_sweep(
        [StoreRef("digits", str(store))],
        ["linear"],
        OPTS,
        out=tmp_path,
        group_size=GROUP,
        engine=on(cluster),
        progress=False,
    )
    assert (result.submitted, result.reused) == (4 - finished, finished)
    assert run_digest(result, "digits/linear") == run_digest(reference, "digits/linear")


@pytest.mark.slow  # the module's local dask cluster
def test_probe_with_a_scheduler_writes_what_the_sweep_writes(store, reference, cluster, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(store),
            "--head",
            "linear",
            "--out",
            str(tmp_path),
            "--scheduler",
            cluster[0],
            "--group-size",
            str(GROUP),
            "--no-render",
            *CLI_OPTS,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 task(s) run, 0 reused" in result.output
    expected = reference.runs["digits/linear"].run_dir
    assert (tmp_path / "linear" / "configs.csv").read_text() == (expected / "configs.csv").read_text()


def test_a_worker_with_other_code_is_refused(store, reference):
    (task,) = reference.plan.runs[0].tasks[:1]
    payload = task.payload(str(reference.runs["digits/linear"].run_dir.parents[1]))
    payload["environment"] = {**payload["environment"], "code": "0" * 64}
    with pytest.raises(VersionMismatchError, match="code 0000"):
        run_task(payload)


# -- SLURM, through the job script dask-jobqueue would submit ------------------------------------------
def test_slurm_job_script_from_dask_config(store, tmp_path):
    import dask_jobqueue  # noqa: F401  (its defaults must be loaded before dask.config.set scopes them)

    config = {
        "jobqueue.slurm.cores": 4,
        "jobqueue.slurm.processes": 4,
        "jobqueue.slurm.memory": "16GB",
        "jobqueue.slurm.queue": "gpu",
        "jobqueue.slurm.walltime": "02:00:00",
    }
    with dask.config.set(config):
        result = CliRunner().invoke(
            main,
            [
                "sweep",
                "--store",
                str(store),
                "--head",
                "linear",
                "--out",
                str(tmp_path),
                "--cluster",
                "slurm",
                "--scale",
                "16",
                "--dry-run",
                *CLI_OPTS,
            ],
        )
    assert result.exit_code == 0, result.output
    script = result.output.split("job script of each slurm job:\n")[1]
    assert script.startswith("#!/usr/bin/env bash")
    for line in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=15G", "#SBATCH -t 02:00:00"):
        assert line in script
    assert f"{sys.executable} -m distributed.cli.dask_worker tcp://" in script
    assert "--nthreads 1" in script and "--nworkers 4" in script
    assert "to run" in result.output and not (tmp_path / "digits").exists()
    missing = CliRunner().invoke(
        main,
        ["sweep", "--store", str(store), "--head", "linear", "--out", str(tmp_path), "--cluster", "slurm", "--dry-run"],
    )
    assert missing.exit_code == 1 and "jobqueue.slurm.cores" in missing.output
    assert missing.output.count("\n") == 1 and "Traceback" not in missing.output


def test_the_probe_runs_no_worker_processes():
    """dask workers are daemonic: nothing a task runs may start processes (DataLoader workers, process pools)."""
    sources = [*(REPO / "stages" / "probe").glob("*.py"), *(REPO / "stages" / "sweep").glob("*.py")]
    for path in sources:
        text = path.read_text()
        for word in ("DataLoader", "multiprocessing", "ProcessPool", "n_jobs", "subprocess"):
            assert word not in text or path.name == "task.py" and word == "DataLoader", (path, word)
