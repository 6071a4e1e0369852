"""Resumability and safety of the store: kill -9, mismatched settings, a second writer, additions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache import FeatureStore, FeatureStoreWriter, StoreError, StoreLockedError, StoreMismatchError
from cache.writer import SplitIndex
from pipeline.options import parse_block_spec
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract

from helpers import make_image_folder

pytestmark = pytest.mark.slow  # extractions killed and resumed in subprocesses

REPO = Path(__file__).resolve().parents[1]


def chunk_files(store: Path) -> dict[str, bytes]:
    """Every file of the store by relative path: the bit-for-bit view of it."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def config(model, data, out, **changes) -> ExtractConfig:
    base = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        blocks=parse_block_spec("2-9"),
        timesteps=(10, 90),
        pools=(1, 2),
        batch_size=3,
        chunk_samples=4,
        shard_samples=8,
    )
    return ExtractConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("many") / "images", counts={"train": 40, "val": 8}, seed=1)


def record_writes(monkeypatch) -> list[tuple[str, int, tuple[int, int]]]:
    """(split, shard, (block, timestep)) of every shard written from now on, in order."""
    written = []
    original = FeatureStoreWriter.write_shard

    def record(self, split, shard, features, **kwargs):
        written.extend((split, shard, key) for key in features)
        return original(self, split, shard, features, **kwargs)

    monkeypatch.setattr(FeatureStoreWriter, "write_shard", record)
    return written


def done_chunks(store: Path) -> int:
    """Finished chunks of the deepest array of the train split, read while another process writes."""
    try:
        return int(FeatureStore.open(store).done_chunks("train", 9, 90).sum())
    except (StoreError, KeyError, ValueError):
        return 0


def test_killed_run_resumes_to_a_bit_identical_store_without_recomputing(
    tiny_model, many_images, tmp_path, monkeypatch
):
    reference = tmp_path / "reference.zarr"
    run_extract(config(tiny_model, many_images, reference, batch_size=1), progress=False)

    killed = tmp_path / "killed.zarr"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        "--model",
        str(tiny_model),
        "--data",
        str(many_images),
        "--out",
        str(killed),
        "--blocks",
        "2-9",
        "--timesteps",
        "10,90",
        "--pool",
        "1,2",
        "--batch-size",
        "1",
        "--chunk-samples",
        "4",
        "--shard-samples",
        "8",
    ]
    # The same intra-op thread count as this process (see conftest): CPU kernels sum in a
    # thread-dependent order, and bit-identity is promised for the same machine and settings.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while done_chunks(killed) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert process.poll() is None, "the extraction finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    finished_before = FeatureStore.open(killed)
    missing_before = finished_before.missing()
    assert missing_before, "the kill came too late to test anything"

    written = record_writes(monkeypatch)
    run_extract(config(tiny_model, many_images, killed, batch_size=1), progress=False)

    per_shard = finished_before.shard_samples // finished_before.chunk_samples
    for split, shard, (block, timestep) in written:
        chunks = set(range(shard * per_shard, min((shard + 1) * per_shard, finished_before.num_chunks(split))))
        assert chunks <= set(missing_before[(split, block, timestep)]), f"recomputed finished shard {shard} of {split}"
    resumed = chunk_files(killed)
    expected = chunk_files(reference)
    # attributes differ only where this test asked for them to: nothing; the file sets and bytes are equal
    assert resumed.keys() == expected.keys()
    differing = [key for key in expected if resumed[key] != expected[key]]
    assert differing == [], differing


def test_mismatched_store_is_refused_with_the_difference_named(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3")), progress=False)
    before = chunk_files(out)
    with pytest.raises(StoreMismatchError, match="noise_seed: the store has 0, this run asks for 5"):
        run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3"), noise_seed=5), progress=False)
    with pytest.raises(StoreMismatchError, match="dtype"):
        run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3"), dtype="float32"), progress=False)
    assert chunk_files(out) == before
    run_extract(
        config(tiny_model, tiny_data, out, blocks=parse_block_spec("3"), noise_seed=5, overwrite=True), progress=False
    )
    assert FeatureStore.open(out).attrs["noise_seed"] == 5


def test_other_data_is_refused(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3")), progress=False)
    other = make_image_folder(tmp_path / "other", counts={"train": 5, "val": 3}, seed=7)
    with pytest.raises(StoreMismatchError, match="data.file_list_sha256"):
        run_extract(config(tiny_model, other, out, blocks=parse_block_spec("3")), progress=False)


def test_a_second_writer_gets_a_clear_error(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3")), progress=False)
    store = FeatureStore.open(out)
    attrs = store.attrs
    settings = {
        key: attrs[key]
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
    before = chunk_files(out)
    with FeatureStoreWriter.open(out, settings=settings, splits=splits, block_table=attrs["block_table"]):
        with pytest.raises(StoreLockedError, match="being written by another process"):
            run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3-4")), progress=False)
    assert chunk_files(out) == before
    run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3-4")), progress=False)  # the lock is gone


def test_adding_blocks_and_timesteps_computes_only_what_is_missing(tiny_model, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3,5"), timesteps=(10,)), progress=False)
    first = chunk_files(out)
    writes = record_writes(monkeypatch)
    run_extract(
        config(tiny_model, tiny_data, out, blocks=parse_block_spec("3,5,8"), timesteps=(10, 90)), progress=False
    )
    assert {key for _, _, key in writes} == {(3, 90), (5, 90), (8, 10), (8, 90)}
    after = chunk_files(out)
    unchanged = [k for k in first if "block3/t10/" in k or "block5/t10/" in k]
    assert unchanged and all(after[k] == first[k] for k in unchanged)
    store = FeatureStore.open(out)
    assert store.blocks == [3, 5, 8] and store.timesteps == [10, 90] and not store.missing()

    # a pool that needs a finer grid than block 3 was stored at cannot be added silently
    with pytest.raises(StoreMismatchError, match="block 3: the store has it pooled to 2x2, this run needs 4x4"):
        run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3"), pools=(4,)), progress=False)


def test_overwrite_keeps_a_matching_store_and_replaces_a_different_one(tiny_model, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    run_extract(config(tiny_model, tiny_data, out, blocks=parse_block_spec("3")), progress=False)
    writes = record_writes(monkeypatch)
    # What `dvc repro` runs after a timestep is added: the matching store is extended, not redone.
    run_extract(
        config(tiny_model, tiny_data, out, blocks=parse_block_spec("3"), timesteps=(10, 90, 150), overwrite=True),
        progress=False,
    )
    assert {key for _, _, key in writes} == {(3, 150)}
    # A finer pool than block 3 was stored at, with --overwrite: the store is rebuilt at the new grid.
    run_extract(
        config(tiny_model, tiny_data, out, blocks=parse_block_spec("3"), pools=(4,), overwrite=True), progress=False
    )
    store = FeatureStore.open(out)
    assert store.block_info(3)["grid"] == 4 and store.timesteps == [10, 90] and not store.missing()


def as_format_1(store: Path) -> None:
    """What a store written before digests looks like: no _digests, flags of 1, no index digests or recipe."""
    import json
    import shutil

    import zarr

    shutil.rmtree(store / "_digests")
    group = zarr.open_group(store, mode="r+")
    for split in ("train", "val"):
        for _, flags in group[f"_progress/{split}"].arrays():
            flags[:] = (flags[:] > 0).astype("uint8")
    root = json.loads((store / "zarr.json").read_text())
    for key in ("index_digests", "recipe"):
        del root["attributes"][key]
    root["attributes"]["format"] = "diffusion-feature-cache/1"
    (store / "zarr.json").write_text(json.dumps(root))


def test_a_format_1_store_reads_verifies_and_is_upgraded_when_next_written(tiny_model, tiny_data, tmp_path):
    import json

    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    for out in (old, new):
        run_extract(config(tiny_model, tiny_data, out, blocks=(3,), timesteps=(10,)), progress=False)
    as_format_1(old)
    legacy, fresh = FeatureStore.open(old), FeatureStore.open(new)
    assert legacy.verify() == [] and (legacy.labels("train") == fresh.labels("train")).all()
    assert (legacy.read("train", 3, 10) == fresh.read("train", 3, 10)).all()
    (old / "val/labels/c/0").rename(tmp_path / "labels")  # format 1 has no digests: still never read as zeros
    with pytest.raises(StoreError, match="val/labels chunk"):
        FeatureStore.open(old).labels("val")
    (tmp_path / "labels").rename(old / "val/labels/c/0")
    for out in (old, new):  # the next write upgrades it: format 2, index digests, digests for every new shard
        run_extract(config(tiny_model, tiny_data, out, blocks=(3,), timesteps=(10, 90)), progress=False)
    attrs = json.loads((old / "zarr.json").read_text())["attributes"]
    assert (
        attrs["format"] == "diffusion-feature-cache/2"
        and attrs["index_digests"] == FeatureStore.open(new).attrs["index_digests"]
    )
    assert (FeatureStore.open(old).read("val", 3, 90) == FeatureStore.open(new).read("val", 3, 90)).all()
    assert FeatureStore.open(old).verify() == []
    labels = old / "train/labels/c/0"
    labels.write_bytes((new / "train/labels/c/0").read_bytes())  # the same bytes: fine
    other = tmp_path / "other.zarr"  # a copy from a store of another noise seed is foreign once digests exist
    run_extract(config(tiny_model, tiny_data, other, blocks=(3,), timesteps=(10, 90), noise_seed=4), progress=False)
    shard = "train/block3/t90/c/1/0/0/0"
    (old / shard).write_bytes((other / shard).read_bytes())
    with pytest.raises(StoreError, match="does not match its digest"):
        FeatureStore.open(old).read("train", 3, 90)
