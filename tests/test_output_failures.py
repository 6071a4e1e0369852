"""Failures while `pipeline probe` and `pipeline sweep` write their results (issue 24): each ends as one line
naming the problem and the fix, or as a correct result, and nothing half-written is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

from helpers import digits_features, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    features, labels = digits_features(n_train=300)
    return write_store(tmp_path_factory.mktemp("outputs") / "store.zarr", features, labels, pools=(1,))


def command(kind: str, store: Path, out: Path, *extra) -> list[str]:
    if kind == "probe":
        return [
            "probe",
            "--store",
            str(store),
            "--head",
            "linear",
            "--blocks",
            "1",
            "--timesteps",
            "10",
            "--epochs",
            "5",
            "--out",
            str(out),
            "--no-render",
            *extra,
        ]
    return [
        "sweep",
        "--store",
        str(store),
        "--head",
        "linear",
        "--blocks",
        "1",
        "--timesteps",
        "10",
        "--epochs",
        "5",
        "--out",
        str(out),
        *extra,
    ]


def leftovers(out: Path) -> list[str]:
    """Half-written results: staging directories of runs and tasks."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".partial" in p.name or ".replaced" in p.name)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    return line


@pytest.mark.parametrize("kind", ["probe", "sweep"])
def test_a_full_disk_while_heads_are_saved_is_one_line_and_leaves_nothing_half_written(
    store, tmp_path, monkeypatch, kind
):
    from safetensors import SafetensorError

    from stages.probe import heads

    def full(state, path, *args, **kwargs):
        # The disk fills as safetensors writes a head: it reports the ENOSPC as its own error, not an OSError
        # (the text is what safetensors 0.8 prints on a full disk).
        Path(path).write_bytes(b"\0" * 16)  # what a write cut short leaves
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(heads, "save_file", full)
    out = tmp_path / "results"
    line = one_error_line(CliRunner().invoke(main, command(kind, store, out)))
    assert (
        f"{out}: no space left on the device while saving" in line
        and " free. Free some space and run the same command again" in line
    ), line
    assert leftovers(out) == []
    monkeypatch.undo()
    result = CliRunner().invoke(main, command(kind, store, out))  # the same command, once there is space
    assert result.exit_code == 0, result.output
    assert leftovers(out) == []


PAUSED_RUN = (
    "import os, signal, sys\n"
    "import {module} as m\n"
    "original = m.{function}\n"
    "def paused(*args, **kwargs):\n"
    "    os.kill(os.getpid(), signal.SIGSTOP)  # stopped (by the test) while it writes its output\n"
    "    return original(*args, **kwargs)\n"
    "m.{function} = paused\n"
    "from pipeline.cli import main\n"
    "main(sys.argv[1:])\n"
)


@pytest.mark.slow  # a paused probe or sweep process
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["probe", "sweep"])
def test_a_second_run_into_an_output_being_written_is_refused_naming_the_first(store, tmp_path, kind):
    # issue 24: two probes of one head shared one staging directory, and a sweep dropped another's tasks in progress
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "results"
    where = ("stages.probe.run", "_train_and_write") if kind == "probe" else ("stages.sweep.task", "run_task")
    code = PAUSED_RUN.format(module=where[0], function=where[1])
    first = subprocess.Popen(
        [sys.executable, "-c", code, *command(kind, store, out)],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), first.stdout.read().decode()[-3000:]
        line = one_error_line(CliRunner().invoke(main, command(kind, store, out)))
        assert "is being written by another process" in line and f"pid {first.pid}" in line, line
        assert f"pipeline {kind}" in line and "wait for it to finish, or write to another --out" in line, line
        os.kill(first.pid, signal.SIGCONT)
        output = first.communicate(timeout=240)[0].decode()
        assert first.returncode == 0, output[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert leftovers(out) == [] and not [p for p in out.parent.rglob(".*.lock")]
    run = out / "linear" if kind == "probe" else out / "store" / "linear"
    serial = tmp_path / "serial"
    assert CliRunner().invoke(main, command(kind, store, serial)).exit_code == 0
    relative = run.relative_to(out)
    assert (run / "configs.csv").read_text() == (serial / relative / "configs.csv").read_text()


def damage_task(task: Path, how: str) -> None:
    if how == "heads folder deleted":
        import shutil

        shutil.rmtree(task / "heads")
    elif how == "predictions deleted":
        (task / "predictions.npz").unlink()
    elif how == "rows truncated":
        (task / "rows.json").write_bytes((task / "rows.json").read_bytes()[:40])
    elif how == "predictions truncated":
        (task / "predictions.npz").write_bytes((task / "predictions.npz").read_bytes()[:100])
    else:
        (task / "task.json").write_text("{")


@pytest.mark.parametrize(
    "how",
    ["heads folder deleted", "predictions deleted", "rows truncated", "predictions truncated", "task.json truncated"],
)
def test_a_task_result_damaged_on_disk_is_noticed_and_computed_again(store, tmp_path, how):
    # issue 24: a damaged task result was read (a traceback) instead of being computed again
    out = tmp_path / "results"
    first = CliRunner().invoke(main, command("sweep", store, out))
    assert first.exit_code == 0, first.output
    expected = (out / "store" / "linear" / "configs.csv").read_text()
    (task,) = [p for p in (out / ".sweep" / "tasks").iterdir() if not p.name.startswith(".")]
    damage_task(task, how)
    again = CliRunner().invoke(main, command("sweep", store, out))
    assert again.exit_code == 0 and "Traceback" not in again.output, again.output
    assert "its result was damaged" in again.output and "1 task(s): 1 run, 0 reused" in again.output, again.output
    assert (out / "store" / "linear" / "configs.csv").read_text() == expected
    assert sorted(p.name for p in (task / "heads").iterdir()) and (task / "predictions.npz").is_file()
    assert leftovers(out) == []


WORKER_DIES_AT_START = (
    "import os, signal, sys\n"
    "if '--multiprocessing-fork' in sys.argv and os.environ.get('KILL_WORKER_TOKEN'):  # a dask worker starting\n"
    "    try:\n"
    "        os.close(os.open(os.environ['KILL_WORKER_TOKEN'], os.O_CREAT | os.O_EXCL | os.O_WRONLY))\n"
    "        first = True\n"
    "    except FileExistsError:\n"
    "        first = False\n"
    "    if first or os.environ.get('KILL_EVERY_WORKER'):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
)


@pytest.mark.slow  # local dask clusters whose workers die
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["the first worker", "every worker"])
def test_a_worker_killed_while_the_local_cluster_starts_is_replaced_or_one_line(store, tmp_path, which):
    # issue 24: a worker lost while `--workers 2` started its LocalCluster was distributed's "Nanny failed to start"
    import os
    import subprocess
    import sys

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WORKER_DIES_AT_START)  # imported by every process, workers included
    repo = Path(__file__).parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook), str(repo)]),
        "KILL_WORKER_TOKEN": str(tmp_path / "token"),
    }
    if which == "every worker":
        env["KILL_EVERY_WORKER"] = "1"
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *command("sweep", store, out, "--workers", "2")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert "the local dask cluster did not start (a worker died while starting" in done.stderr, done.stderr[-3000:]
    if which == "every worker":
        assert done.returncode == 1, done.stderr[-3000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        assert "did not start in 3 tries" in line and "run the same command again" in line, line
        return
    assert done.returncode == 0, done.stderr[-3000:]
    serial = tmp_path / "serial"
    assert CliRunner().invoke(main, command("sweep", store, serial)).exit_code == 0
    relative = Path("store") / "linear" / "configs.csv"
    assert (out / relative).read_text() == (serial / relative).read_text()
