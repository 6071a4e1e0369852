"""Sharded stores: one object per shard, chunks for reading; stores made before sharding still read,
resume and grow as they are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import main

from helpers import make_image_folder

ARGS = ["--blocks", "3,5", "--pool", "1", "--batch-size", "4", "--chunk-samples", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("shards") / "images", counts={"train": 18, "val": 5}, classes=2, seed=8
    )


def extract(model, data, out, *extra):
    result = CliRunner().invoke(
        main, ["extract", "--model", str(model), "--data", str(data), "--out", str(out), *ARGS, *extra]
    )
    assert result.exit_code == 0, result.output
    return result


def files(array_dir: Path) -> list[str]:
    return sorted(p.relative_to(array_dir).as_posix() for p in (array_dir / "c").rglob("*") if p.is_file())


def test_an_array_is_one_object_per_shard_and_reads_by_chunk(tiny_model, data, tmp_path):
    out = tmp_path / "s.zarr"
    extract(tiny_model, data, out, "--timesteps", "10", "--shard-samples", "8")
    array = zarr.open_group(out, mode="r")["train/block3/t10"]
    assert array.chunks[0] == 4 and array.shards[0] == 8
    assert files(out / "train/block3/t10") == ["c/0/0/0/0", "c/1/0/0/0", "c/2/0/0/0"]  # 18 samples: 3 shards
    store = FeatureStore.open(out)
    assert store.num_chunks("train") == 5 and store.num_shards("train") == 3
    whole = store.read("train", 3, 10)
    pieces = np.concatenate([store.read_chunk("train", 3, 10, k) for k in range(5)])
    np.testing.assert_array_equal(whole, pieces)
    flags = sorted(p.name for p in (next((out / "_progress/train").glob("set-*")) / "c").iterdir())
    assert flags == ["0", "1", "2"]  # one flag object per shard, none per chunk


def test_a_store_made_before_sharding_reads_resumes_and_grows_unsharded(tiny_model, data, tmp_path):
    old = tmp_path / "old.zarr"
    extract(tiny_model, data, old, "--timesteps", "10", "--shard-samples", "4")  # one chunk per object, as before
    root = json.loads((old / "zarr.json").read_text())
    del root["attributes"]["shard_samples"]  # what stores written before sharding record
    (old / "zarr.json").write_text(json.dumps(root))
    before = FeatureStore.open(old)
    assert before.shard_samples == before.chunk_samples == 4
    reference = tmp_path / "new.zarr"  # the same two runs on a sharded store: the same batches, the same numbers
    extract(tiny_model, data, reference, "--timesteps", "10", "--shard-samples", "8")
    extract(tiny_model, data, reference, "--timesteps", "10,90")
    extract(tiny_model, data, old, "--timesteps", "10,90")  # the old layout is kept, the new timestep added
    grown = FeatureStore.open(old)
    # the upgrade is recorded when the store is next written (cache.manifest.upgrade): a shard is still a chunk
    assert json.loads((old / "zarr.json").read_text())["attributes"]["shard_samples"] == grown.chunk_samples == 4
    assert zarr.open_group(old, mode="r")["train/block5/t90"].shards is None
    fresh = FeatureStore.open(reference)
    for split in ("train", "val"):
        for block, timestep in fresh.arrays():
            np.testing.assert_array_equal(grown.read(split, block, timestep), fresh.read(split, block, timestep))


def test_dry_run_counts_objects_and_passes_per_process(tiny_model, data, tmp_path):
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_model),
            "--data",
            str(data),
            "--out",
            str(out),
            *ARGS,
            "--timesteps",
            "10,90",
            "--shard-samples",
            "8",
            "--nproc",
            "2",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "train: 18 images in 3 shards" in result.output and "per process (of 2): 5, 4" in result.output
    assert "objects" in result.output and not out.exists()
