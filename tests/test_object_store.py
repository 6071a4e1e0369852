"""Stores on object storage: an S3 server (moto's, on 127.0.0.1) and fsspec's memory file system.

A store written to S3 equals the local one, reads back with the project, plain zarr and dask,
resumes after a kill, refuses a second writer while the first holds its lease, and bad addresses
or credentials are one clear line with nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from s3fs import S3FileSystem

from cache import FeatureStore, FeatureStoreWriter, StoreLockedError
from cache.storage import Location
from cache.writer import SplitIndex
from pipeline.cli import main

from helpers import make_image_folder
from s3_server import closed_port, list_keys, s3_environment

pytestmark = pytest.mark.slow  # an S3 server (moto) and killed processes

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--blocks",
    "3,5",
    "--timesteps",
    "10,90",
    "--pool",
    "1",
    "--batch-size",
    "4",
    "--chunk-samples",
    "4",
    "--shard-samples",
    "8",
]


@pytest.fixture(scope="module")
def endpoint():
    with s3_environment("lab") as url:
        yield url


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("s3data") / "images", counts={"train": 20, "val": 6}, classes=2, seed=4
    )


@pytest.fixture(scope="module")
def local_store(tiny_model, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "store.zarr"
    result = CliRunner().invoke(
        main, ["extract", "--model", str(tiny_model), "--data", str(data), "--out", str(out), *ARGS]
    )
    assert result.exit_code == 0, result.output
    return out


def extract(tiny_model, data, out, *extra):
    return CliRunner().invoke(
        main, ["extract", "--model", str(tiny_model), "--data", str(data), "--out", str(out), *ARGS, *extra]
    )


def decoded(store: FeatureStore) -> dict:
    values = {}
    for split in store.splits:
        values[(split, "labels")] = store.labels(split)
        values[(split, "paths")] = np.asarray(store.paths(split))
        for block, timestep in store.arrays():
            values[(split, block, timestep)] = store.read(split, block, timestep)
    return values


def assert_same_features(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_a_store_on_s3_equals_the_local_one_and_reads_with_zarr_and_dask(tiny_model, data, local_store, endpoint):
    import dask.array as da

    url = "s3://lab/features/a.zarr"
    result = extract(tiny_model, data, url)
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(url)
    reference = decoded(FeatureStore.open(local_store))
    assert_same_features(decoded(store), reference)
    # Few objects: one per shard of each array (20 train samples in shards of 8: 3), not one per chunk (5).
    keys = list_keys(endpoint, "lab", "features/a.zarr/train/block3/t10/c/")
    assert len(keys) == 3
    # Plain zarr and dask read the same numbers, with nothing of the project in between.
    group = zarr.open_group(Location.parse(url).zarr_store(read_only=True), mode="r")
    np.testing.assert_array_equal(group["train/block5/t90"][:].astype(np.float32), reference[("train", 5, 90)])
    lazy = da.from_zarr(url, component="val/block3/t10", storage_options={"endpoint_url": endpoint})
    np.testing.assert_array_equal(lazy.compute().astype(np.float32), reference[("val", 3, 10)])
    # A probe reads it as it reads a local store.
    probe = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            url,
            "--head",
            "knn",
            "--blocks",
            "5",
            "--timesteps",
            "90",
            "--knn-k",
            "1",
            "--out",
            str(local_store.parent / "results"),
            "--no-render",
        ],
    )
    assert probe.exit_code == 0, probe.output
    verify = CliRunner().invoke(main, ["verify", "--store", url])
    assert verify.exit_code == 0 and "every finished shard verifies" in verify.output


def test_a_killed_extraction_on_s3_resumes_to_the_same_store(tiny_model, data, local_store, endpoint, monkeypatch):
    url = "s3://lab/features/killed.zarr"
    monkeypatch.setattr("cache.lease.TTL_SECONDS", 2.0)
    command = [
        sys.executable,
        "-c",
        (
            "import os, signal, sys\n"
            "import cache.writer as w\n"
            "original = w.FeatureStoreWriter.write_shard\n"
            "def write_shard(self, split, shard, *args, **kwargs):\n"
            "    if (split, shard) == ('train', 1):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return original(self, split, shard, *args, **kwargs)\n"
            "w.FeatureStoreWriter.write_shard = write_shard\n"
            "from pipeline.cli import main\n"
            "main(sys.argv[1:])\n"
        ),
        "extract",
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        url,
        *ARGS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATURE_STORE_LEASE_TTL": "6"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert FeatureStore.open(url).missing()  # the kill left work to do, and its lease behind
    assert "features/killed.zarr/_writer.lease" in list_keys(endpoint, "lab", "features/killed.zarr/")
    refused = extract(tiny_model, data, url)
    assert refused.exit_code == 1 and "being written by another process" in refused.output
    lease = json.loads(Location.parse(url).read_text("_writer.lease"))
    monkeypatch.setattr("cache.lease.now", lambda: lease["expires"] + 1.0)  # the killed writer's lease expires
    result = extract(tiny_model, data, url)
    assert result.exit_code == 0, result.output
    assert_same_features(decoded(FeatureStore.open(url)), decoded(FeatureStore.open(local_store)))
    assert "features/killed.zarr/_writer.lease" not in list_keys(endpoint, "lab", "features/killed.zarr/")


STALLING_WRITER = (
    "import os, signal, sys\n"
    "import cache.writer as w\n"
    "original = w.FeatureStoreWriter.write_shard\n"
    "def write_shard(self, split, shard, features, *args, **kwargs):\n"
    "    if (split, shard) == ('train', 1) and any(block == 5 for block, _ in features):\n"
    "        os.kill(os.getpid(), signal.SIGSTOP)  # stalled (by the test) past its lease's expiry\n"
    "    return original(self, split, shard, features, *args, **kwargs)\n"
    "w.FeatureStoreWriter.write_shard = write_shard\n"
    "from pipeline.cli import main\n"
    "main(sys.argv[1:])\n"
)


def counting_writes(monkeypatch) -> list[tuple[str, int, int]]:
    """(split, shard, block) of every shard that this process writes from now on."""
    written = []
    original = FeatureStoreWriter.write_shard

    def write_shard(self, split, shard, features, *args, **kwargs):
        written.extend((split, shard, block) for block, _ in features)
        return original(self, split, shard, features, *args, **kwargs)

    monkeypatch.setattr(FeatureStoreWriter, "write_shard", write_shard)
    return written


@pytest.mark.timeout(600)
@pytest.mark.parametrize("taker", ["finished and released the lease", "still holds the lease"])
def test_a_stalled_writer_whose_lease_was_taken_over_stops_and_loses_nothing(
    tiny_model, data, endpoint, monkeypatch, taker, tmp_path
):
    # issue 24: writer A, stalled while extending a store, came back after B had taken its expired lease
    # over, added a block and released the lease; A finished and wrote its stale settings over B's block.
    url = f"s3://lab/features/stalled-{len(taker)}.zarr"
    reference = tmp_path / "reference.zarr"
    assert extract(tiny_model, data, reference, "--blocks", "3,5,7").exit_code == 0
    assert extract(tiny_model, data, url, "--blocks", "3").exit_code == 0
    log = tmp_path / "a.log"
    with open(log, "wb") as output:
        a = subprocess.Popen(
            [
                sys.executable,
                "-c",
                STALLING_WRITER,
                "extract",
                "--model",
                str(tiny_model),
                "--data",
                str(data),
                "--out",
                url,
                *ARGS,
                "--blocks",
                "3,5",
            ],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        _, status = os.waitpid(a.pid, os.WUNTRACED)  # until A stops itself, train shard 0 of block 5 written
        assert os.WIFSTOPPED(status), log.read_text()[-3000:]
        lease = json.loads(Location.parse(url).read_text("_writer.lease"))
        monkeypatch.setattr("cache.lease.now", lambda: lease["expires"] + 1.0)  # A's lease has expired
        from cache.lease import Lease

        holder = None
        if taker == "still holds the lease":
            holder = Lease(Location.parse(url)).acquire()
        else:
            written = counting_writes(monkeypatch)
            assert extract(tiny_model, data, url, "--blocks", "3,5,7").exit_code == 0  # B takes over, adds block 7
            assert ("train", 0, 5) not in written and not [w for w in written if w[2] == 3], written
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("Error:")]
    assert "stalled past its lease's expiry" in line and "Run the same command again" in line, line
    if holder is not None:
        assert f"pid {os.getpid()}" in line
        holder.release()
        written = counting_writes(monkeypatch)
        assert extract(tiny_model, data, url, "--blocks", "3,5,7").exit_code == 0
        assert ("train", 0, 5) not in written and not [w for w in written if w[2] == 3], written
    store = FeatureStore.open(url)
    assert {block for block, _ in store.arrays()} == {3, 5, 7} and not store.missing()
    assert_same_features(decoded(store), decoded(FeatureStore.open(reference)))
    written = counting_writes(monkeypatch)
    assert extract(tiny_model, data, url, "--blocks", "3,5,7").exit_code == 0
    assert written == []  # nothing lost: every shard is finished
    assert "features/stalled" not in " ".join(list_keys(endpoint, "lab", url[len("s3://lab/") :] + "/_writer"))


def test_a_second_writer_on_s3_is_refused_naming_the_first(tiny_model, data, endpoint):
    url = "s3://lab/features/busy.zarr"
    assert extract(tiny_model, data, url).exit_code == 0
    store = FeatureStore.open(url)
    settings = {
        key: store.attrs[key]
        for key in (
            "kind",
            "model",
            "data",
            "preprocessing",
            "noise_seed",
            "dtype",
            "precision",
            "chunk_samples",
            "shard_samples",
        )
    }
    splits = {s: SplitIndex(store.labels(s), store.paths(s)) for s in store.splits}
    with FeatureStoreWriter.open(url, settings=settings, splits=splits, block_table=store.attrs["block_table"]):
        result = extract(tiny_model, data, url)
        assert result.exit_code == 1
        (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert "being written by another process" in line and f"pid {os.getpid()}" in line and "since" in line
        with pytest.raises(StoreLockedError):
            FeatureStoreWriter.repair(url)
    assert extract(tiny_model, data, url).exit_code == 0  # released with the first writer


@pytest.mark.timeout(120)  # bounded: no endless retries
@pytest.mark.parametrize(
    "case",
    [
        "unreachable endpoint",
        "missing credentials",
        "no such bucket",
        "unknown scheme",
        "storage option on a local path",
    ],
)
def test_bad_object_store_addresses_are_one_line_and_write_nothing(
    tiny_model, data, endpoint, monkeypatch, case, tmp_path
):
    url = "s3://lab/features/bad.zarr"
    extra = []
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        expected = "cannot reach the object store"
    elif case == "missing credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        expected = "no credentials"
    elif case == "no such bucket":
        url = "s3://no-such-bucket/features.zarr"
        expected = "bucket 'no-such-bucket' does not exist"
    elif case == "unknown scheme":
        url = "nosuchfs://lab/features.zarr"
        expected = "no file system for nosuchfs://"
    else:
        url = str(tmp_path / "local.zarr")
        extra = ["--storage-option", "anon=true"]
        expected = "storage options apply to object stores"
    S3FileSystem.clear_instance_cache()  # as in a new process: the environment is read again
    result = extract(tiny_model, data, url, *extra)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert expected in line, line
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    S3FileSystem.clear_instance_cache()
    assert list_keys(endpoint, "lab", "features/bad.zarr") == []
    assert not (tmp_path / "local.zarr").exists()


def test_a_store_in_memory_reads_back(tiny_model, data, local_store, monkeypatch):
    url = "memory://tests/store.zarr"
    result = extract(tiny_model, data, url)
    assert result.exit_code == 0, result.output
    assert_same_features(decoded(FeatureStore.open(url)), decoded(FeatureStore.open(local_store)))
    written = []
    original = FeatureStoreWriter.write_shard
    monkeypatch.setattr(
        FeatureStoreWriter, "write_shard", lambda self, *a, **k: written.append(a[:2]) or original(self, *a, **k)
    )
    assert extract(tiny_model, data, url).exit_code == 0  # reopened: every shard is done
    assert written == []
