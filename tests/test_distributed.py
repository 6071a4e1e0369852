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

from helpers import make_image_folder
from s3_server import closed_port

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--blocks", "2,5,9", "--timesteps", "10,90", "--pool", "1,2", "--batch-size", "4", "--chunk-samples", "4",
        "--shard-samples", "8"]

# Each rank records the shards it writes; rank `KILL_RANK` kills itself before its `KILL_AT`-th shard.
RECORDING = (
    "import json, os, signal, sys\n"
    "import cache.writer as w\n"
    "original = w.FeatureStoreWriter.write_shard\n"
    "count = [0]\n"
    "def write_shard(self, split, shard, *args, **kwargs):\n"
    "    count[0] += 1\n"
    "    if os.environ.get('KILL_RANK') == os.environ.get('RANK', '0') and count[0] == int(os.environ['KILL_AT']):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    result = original(self, split, shard, *args, **kwargs)\n"
    "    with open(os.environ['RECORD'] + '.' + os.environ.get('RANK', '0'), 'a') as f:\n"
    "        f.write(json.dumps([split, shard]) + '\\n')\n"
    "    return result\n"
    "w.FeatureStoreWriter.write_shard = write_shard\n"
    "from pipeline.cli import main\n"
    "main(sys.argv[1:])\n"
)

pytestmark = pytest.mark.slow  # torchrun process groups


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 37 train images: shards of 8 (the last one short), so ranks get unequal shares
    return make_image_folder(tmp_path_factory.mktemp("dist") / "images", counts={"train": 37, "val": 11}, classes=3,
                             seed=6)


def launch(tiny_model, data, out, world_size: int, record: Path, *extra, env: dict | None = None):
    """`world_size` processes of `pipeline extract`, started the way torchrun starts them."""
    port = closed_port()
    processes = []
    for rank in range(world_size):
        rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "RECORD": str(record), **(env or {})}
        if world_size > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            PIPELINE_DIST_TIMEOUT="120")
        command = [sys.executable, "-c", RECORDING, "extract", "--model", str(tiny_model), "--data", str(data),
                   "--out", str(out), *ARGS, *extra]
        processes.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes, timeout=240):
    """Every rank's (exit status, stdout, stderr); ranks still running after `timeout` are killed (a test
    never leaves a process behind)."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def written(record: Path) -> dict[int, list]:
    shards = {}
    for path in sorted(record.parent.glob(record.name + ".*")):
        rank = int(path.suffix[1:])
        shards[rank] = [tuple(json.loads(line)) for line in path.read_text().splitlines()]
    return shards


def decoded(path) -> dict:
    store = FeatureStore.open(path)
    values = {(split, "labels"): store.labels(split) for split in store.splits}
    for split in store.splits:
        for block, timestep in store.arrays():
            values[(split, block, timestep)] = store.read(split, block, timestep)
    return values


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


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
    done = {(split, int(k)) for split in before.splits
            for k in np.flatnonzero(before.done_chunks(split, 9, 90)[:: before.shard_samples // before.chunk_samples])}
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
    done = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--model", str(tiny_model), "--data", str(data),
                           "--out", str(out), *ARGS, "--nproc", "2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(decoded(out), reference)
