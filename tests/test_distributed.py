"""Extraction in several processes (torch.distributed, gloo on the loopback interface) writes the same
store as one process, each shard by exactly one rank; a killed job resumes with another world size
without recomputing a finished shard; rank 0's errors stop every rank with the same message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache import FeatureStore

from helpers import DIST_ARGS as ARGS
from helpers import assert_same, decoded, finish, launch, make_image_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun process groups


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 37 train images: shards of 8 (the last one short), so ranks get unequal shares
    return make_image_folder(
        tmp_path_factory.mktemp("dist") / "images", counts={"train": 37, "val": 11}, classes=3, seed=6
    )


def written(record: Path) -> dict[int, list]:
    shards = {}
    for path in sorted(record.parent.glob(record.name + ".*")):
        rank = int(path.suffix[1:])
        shards[rank] = [tuple(json.loads(line)) for line in path.read_text().splitlines()]
    return shards


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    ((code, _, err),) = finish(launch(tiny_model, data, root / "store.zarr", 1, root / "written"))
    assert code == 0, err[-3000:]
    return decoded(root / "store.zarr")


@pytest.mark.parametrize("world_size", [2, 3])
def test_several_processes_write_the_store_one_process_writes(tiny_model, data, reference, tmp_path, world_size):
    out = tmp_path / "store.zarr"
    results = finish(launch(tiny_model, data, out, world_size, tmp_path / "written"))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert_same(decoded(out), reference)
    shards = written(tmp_path / "written")
    everything = [item for rank in shards.values() for item in rank]
    assert len(everything) == len(set(everything)), "a shard was written twice"  # no two ranks share a shard
    store = FeatureStore.open(out)
    assert sorted(everything) == sorted((s, k) for s in store.splits for k in range(store.num_shards(s)))
    assert len(shards) == world_size  # every rank had work
    assert "wrote" in results[0][1] and all("wrote" not in out for _, out, _ in results[1:])  # rank 0 reports


def test_a_killed_job_resumes_with_another_world_size(tiny_model, data, reference, tmp_path):
    out = tmp_path / "store.zarr"
    processes = launch(tiny_model, data, out, 2, tmp_path / "first", env={"KILL_RANK": "1", "KILL_AT": "3"})
    try:
        deadline = time.monotonic() + 240
        while processes[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes[1].returncode == -signal.SIGKILL
    finally:
        processes[0].kill()  # what torchrun does to the other ranks when one dies
        finish(processes)
    before = FeatureStore.open(out)
    done = {
        (split, int(k))
        for split in before.splits
        for k in np.flatnonzero(before.done_chunks(split, 9, 90)[:: before.shard_samples // before.chunk_samples])
    }
    assert done and before.missing(), "the kill should leave some shards done and some not"
    results = finish(launch(tiny_model, data, out, 3, tmp_path / "second"))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert_same(decoded(out), reference)
    rewritten = {item for rank in written(tmp_path / "second").values() for item in rank}
    assert not rewritten & done, "a finished shard was recomputed"


def test_rank_zeros_error_stops_every_rank_with_its_message(tiny_model, data, reference, tmp_path):
    out = tmp_path / "store.zarr"
    assert all(code == 0 for code, _, _ in finish(launch(tiny_model, data, out, 1, tmp_path / "w")))
    results = finish(launch(tiny_model, data, out, 2, tmp_path / "w2", "--noise-seed", "3"))
    for code, _, err in results:
        assert code == 1 and "Traceback" not in err, err[-3000:]
        (line,) = [line for line in err.splitlines() if line.startswith("Error:")]
        assert "was made with other settings" in line or "noise_seed" in line


def test_nproc_runs_the_job_under_torchrun(tiny_model, data, reference, tmp_path):
    out = tmp_path / "store.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            "--model",
            str(tiny_model),
            "--data",
            str(data),
            "--out",
            str(out),
            *ARGS,
            "--nproc",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(decoded(out), reference)


def test_nproc_with_a_rank_killed_ends_with_one_line_naming_it_and_the_same_command_resumes(
    tiny_model, data, reference, tmp_path
):
    # issue 24: torchrun's agent ended the job with its ChildFailedError traceback
    hook = tmp_path / "hook"
    hook.mkdir()
    # every process of the job (the launcher, and the ranks it starts) imports this at start-up
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('KILL_RANK') == os.environ.get('RANK'):\n"
        "    import cache.writer as w\n"
        "    original, count = w.FeatureStoreWriter.write_shard, [0]\n"
        "    def write_shard(self, *args, **kwargs):\n"
        "        count[0] += 1\n"
        "        if count[0] == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return original(self, *args, **kwargs)\n"
        "    w.FeatureStoreWriter.write_shard = write_shard\n"
    )
    out = tmp_path / "store.zarr"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        str(out),
        *ARGS,
        "--nproc",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    killed = subprocess.run(
        command, cwd=REPO, env={**env, "KILL_RANK": "1"}, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "Traceback" not in killed.stderr + killed.stdout, killed.stderr[-3000:]
    (line,) = [line for line in killed.stderr.splitlines() if line.startswith("Error:")]
    assert "rank 1 of the --nproc 2 job died (killed by SIGKILL)" in line and "run the same command again" in line
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(decoded(out), reference)
