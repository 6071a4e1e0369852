"""Faults injected on purpose, on a tiny store: kills at every write, a full disk, damaged and deleted files,
a store replaced under a reader, images changed in place. Each is a parametrised case: inject, check
that the fault is detected and named (or harmless), repair the way the message says, and compare the
store with an uninterrupted one, file by file.

A kill is simulated in-process, through zarr's store API (`FailingStore`, a `WrapperStore` every store
is opened through): from the chosen write on, every write of the store raises, as if the process had
died there (kill -9 runs no cleanup, and here no cleanup may write either). One case kills a real
process to check that the two agree. Bad input to every command: tests/test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image
from zarr.storage import LocalStore, WrapperStore

from cache import FeatureStore, FeatureStoreWriter
from cache import writer as store_writer
from cache.errors import (
    DataChangedError,
    IntegrityError,
    StoreError,
    StoreFullError,
    StoreInUseError,
    StoreReplacedError,
)
from cache.manifest import COPY
from cache.storage import wrapped_stores
from pipeline.advice import render
from pipeline.cli import main
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract
from stages.models.loading import load_model

from helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = dict(blocks=(3, 5), timesteps=(10, 90), pools=(1,), batch_size=4, chunk_samples=8, shard_samples=16)


class Crash(BaseException):
    """The process died here (a BaseException, so no `except Exception` cleanup runs as if it lived on)."""


def store_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def assert_same_store(store: Path, reference: dict[str, bytes]) -> None:
    files = store_files(store)
    assert sorted(files) == sorted(reference)
    assert [key for key in reference if files[key] != reference[key]] == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("faults") / "images", counts={"train": 20, "val": 8}, classes=2, seed=3
    )


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(str(tiny_model))


def extract(model, data, out, **changes):
    config = ExtractConfig(model=model.source, data=str(data), out=str(out), **{**TINY, **changes})
    return run_extract(config, progress=False, model=model)


@pytest.fixture(scope="module")
def reference(model, data, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "store.zarr"
    extract(model, data, out)
    return store_files(out)


@pytest.fixture
def store(model, data, tmp_path) -> Path:
    out = tmp_path / "store.zarr"
    extract(model, data, out)
    return out


class Faults:
    """When the store's writes fail: from the `from_write`-th on (a kill), or once `after_bytes` were written
    (a full disk). `torn` leaves the killed write's temporary file behind, as a kill during a local write does.

    zarr writes several keys at once: the kill waits for the writes already under way to land (as if the
    process died just after them), and no write starts after it."""

    def __init__(self, from_write: int | None, after_bytes: int | None, torn: bool):
        self.from_write, self.after_bytes, self.torn = from_write, after_bytes, torn
        self.count, self.written, self.dead, self.in_flight = 0, 0, False, 0

    async def write(self, store, key: str, value, *, exclusive: bool) -> None:
        killed = self.dead or (self.from_write is not None and self.count >= self.from_write)
        self.count += 1
        full = not killed and self.after_bytes is not None and self.written + len(value) > self.after_bytes
        if killed:
            if not self.dead and self.torn and isinstance(store, LocalStore):
                target = Path(store.root) / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.with_suffix(".0f0f.partial").write_bytes(value.to_bytes()[: len(value) // 2])
            self.dead = True
            while self.in_flight:  # the writes already under way land (they run on the same event loop)
                await asyncio.sleep(0.001)
            raise Crash(key)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", key)
        self.written += len(value)
        self.in_flight += 1
        try:
            await (store.set_if_not_exists(key, value) if exclusive else store.set(key, value))
        finally:
            self.in_flight -= 1


class FailingStore(WrapperStore):
    """zarr's store API: every write goes through `Faults.write` (reads, listings, deletes pass through)."""

    def __init__(self, store, faults: Faults):
        super().__init__(store)
        self.faults = faults

    def _with_store(self, store) -> FailingStore:
        return type(self)(store, self.faults)

    async def set(self, key: str, value) -> None:
        await self.faults.write(self._store, key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value) -> None:
        await self.faults.write(self._store, key, value, exclusive=True)


@contextmanager
def writes_fail(monkeypatch=None, *, from_write: int | None = None, after_bytes: int | None = None, torn: bool = False):
    """Every store opened meanwhile fails as `Faults` says (through `cache.storage.wrapped_stores`)."""
    faults = Faults(from_write, after_bytes, torn)
    with wrapped_stores(lambda store: FailingStore(store, faults)):
        yield faults


def count_writes(model, data, out, monkeypatch) -> int:
    with writes_fail(monkeypatch, from_write=10**9) as faults:
        extract(model, data, out)
    return faults.count


# -- kills ------------------------------------------------------------------------------------------
@pytest.mark.slow  # a whole extraction killed at every write
def test_a_kill_at_every_write_resumes_to_the_same_store(model, data, reference, tmp_path, monkeypatch):
    """kill -9 at each step of store creation, array creation, chunk writes and flags, then resume.
    (Covers the half-built store that looked complete, the array without flags that got stuck, and a
    kill between two arrays' completion of one chunk.)"""
    total = count_writes(model, data, tmp_path / "counted.zarr", monkeypatch)
    assert total > 40
    failures = []
    for step in range(total):
        out = tmp_path / f"killed{step}.zarr"
        with writes_fail(monkeypatch, from_write=step, torn=step % 2 == 1), pytest.raises(Crash):
            extract(model, data, out)
        extract(model, data, out)
        files = store_files(out)
        if files != reference:
            failures.append(
                (
                    step,
                    sorted(set(files) ^ set(reference))[:3],
                    [k for k in reference if files.get(k) != reference[k]][:3],
                )
            )
        shutil.rmtree(out)
    assert failures == [], failures


@pytest.mark.slow  # a real extraction process, killed
def test_a_killed_process_resumes_like_a_simulated_kill(tiny_model, data, reference, tmp_path):
    out = tmp_path / "killed.zarr"
    command = [
        sys.executable,
        "-c",
        (
            "import os, signal, sys\n"
            "import cache.writer as w\n"
            "original = w.FeatureStoreWriter.write_shard\n"
            "def write_shard(self, split, chunk, *args, **kwargs):\n"
            "    if (split, chunk) == ('train', 1):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return original(self, split, chunk, *args, **kwargs)\n"
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
        str(out),
        "--blocks",
        "3,5",
        "--timesteps",
        "10,90",
        "--pool",
        "1",
        "--batch-size",
        "4",
        "--chunk-samples",
        "8",
        "--shard-samples",
        "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert FeatureStore.open(out).missing()  # the kill left work to do
    result = CliRunner().invoke(main, [str(a) for a in command[3:]])
    assert result.exit_code == 0, result.output
    assert_same_store(out, reference)


# -- a full disk ------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.02, 0.3, 0.7, 0.95])
def test_a_full_disk_is_one_line_and_a_later_run_finishes_the_store(
    model, data, reference, tmp_path, monkeypatch, share
):
    total = sum(len(v) for v in reference.values())
    out = tmp_path / "full.zarr"
    args = [
        "extract",
        "--model",
        model.source,
        "--data",
        str(data),
        "--out",
        str(out),
        "--blocks",
        "3,5",
        "--timesteps",
        "10,90",
        "--pool",
        "1",
        "--batch-size",
        "4",
        "--chunk-samples",
        "8",
        "--shard-samples",
        "16",
    ]
    monkeypatch.setattr("stages.extract.run.load_model", lambda *_: model, raising=False)
    with writes_fail(monkeypatch, after_bytes=int(share * total)):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "no space left" in line and str(out) in line and "free" in line and "Free some space" in line
    assert isinstance(result.exception, SystemExit)
    extract(model, data, out)
    assert_same_store(out, reference)


def test_the_full_disk_error_names_the_space_needed(model, data, tmp_path, monkeypatch):
    out = tmp_path / "full.zarr"
    # past what making the store writes (its settings twice: `cache.manifest`), within its first shards
    with writes_fail(monkeypatch, after_bytes=30_000), pytest.raises(StoreFullError, match=r"need up to [\d.]+ [KM]B"):
        extract(model, data, out)


# -- damaged files ----------------------------------------------------------------------------------
def feature_shard(store: Path, split="train", block=3, timestep=10, shard=1) -> Path:
    return store / f"{split}/block{block}/t{timestep}/c/{shard}/0/0/0"


def flag_chunk(store: Path, split="train", chunk=1) -> Path:
    (flags,) = (store / "_progress" / split).glob("set-*")
    return flags / "c" / str(chunk)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def write_nan(store: Path) -> None:
    array = zarr.open_group(store, mode="r+")["train/block3/t10"]
    values = array[16:20]  # shard 1
    values[0, 0, 0, 0] = np.nan
    array[16:20] = values


def edit_settings(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["splits"]["train"] = 12
    (store / "zarr.json").write_text(json.dumps(meta))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def copy_from_another_store(other: Path):
    """A shard copied in from a store of the same layout made with another noise seed."""

    def damage(store: Path) -> None:
        shutil.copyfile(feature_shard(other), feature_shard(store))

    return damage


def delete_digests(store: Path) -> None:
    (record,) = (store / "_digests" / "train").glob("set-*")
    (record / "c" / "1" / "0").unlink()


# (damage, what reading then says); every case is repaired by the command its message prints
DAMAGE = {
    "flipped bit in a feature chunk": (lambda s: flip_a_bit(feature_shard(s)), "shard 1 (chunk 2) fails its checksum"),
    "truncated feature chunk": (lambda s: truncate(feature_shard(s)), "shard 1 (chunk 2) fails its checksum"),
    "deleted feature chunk": (
        lambda s: feature_shard(s).unlink(),
        "shard 1 (chunk 2) is marked finished but is missing",
    ),
    "finished chunk with a NaN": (write_nan, "shard 1 (chunk 2) is marked finished but holds non-finite values"),
    "garbage completion flag": (lambda s: flag_chunk(s).write_bytes(b"garbage!"), "(its completion flag) fails"),
    "empty completion flag": (lambda s: flag_chunk(s).write_bytes(b""), "(its completion flag) fails"),
    "deleted digest record": (delete_digests, "(the digests of a finished shard) is missing"),
    "edited split size": (edit_settings, "says split 'train' has 12 samples"),
    "truncated array metadata": (
        lambda s: truncate(s / "train/block5/t90/zarr.json"),
        "train/block5/t90 has a damaged",
    ),
    "flipped bit in the labels": (lambda s: flip_a_bit(s / "train/labels/c/0"), "train/labels chunk(s) 0 are damaged"),
    "deleted labels chunk": (lambda s: (s / "train/labels/c/0").unlink(), "train/labels chunk(s) 0 are missing"),
    "deleted val labels chunk": (lambda s: (s / "val/labels/c/0").unlink(), "val/labels chunk(s) 0 are missing"),
    "deleted paths chunk": (lambda s: (s / "val/paths/c/0").unlink(), "val/paths chunk(s) 0 are missing"),
    "deleted file records shard": (
        lambda s: (s / "train/files/c/1/0").unlink(),
        "train/files shard 1 does not match its digests",
    ),
}


def read_everything(path: Path) -> None:
    store = FeatureStore.open(path)
    for split in store.splits:
        store.labels(split)
        store.paths(split)
        store.file_records(split)
        for block, timestep in store.arrays():
            store.read(split, block, timestep)


def advised_command(message: str) -> list[str]:
    """The one command a message advises, split as a shell would."""
    (command,) = re.findall(r"`(pipeline [^`]+)`", message)
    return shlex.split(command)[1:]


def run_advice(message: str, model) -> None:
    """Run the advised command verbatim (in this process, so that it loads the test's tiny model)."""
    result = CliRunner().invoke(main, advised_command(message))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_named_on_read_and_the_advice_run_verbatim_repairs_it(model, data, reference, store, case):
    damage, fragment = DAMAGE[case]
    damage(store)
    with pytest.raises(StoreError) as error:
        read_everything(store)
    message = render(error.value)
    assert fragment in message and str(store) in message
    checked = CliRunner().invoke(main, ["verify", "--store", str(store)])  # verify names it too, and the same fix
    assert checked.exit_code == 1 and advised_command(checked.output) == advised_command(message), checked.output
    run_advice(message, model)
    assert_same_store(store, reference)
    read_everything(store)


def test_a_shard_copied_from_another_store_is_foreign(model, data, reference, store, tmp_path):
    other = tmp_path / "other.zarr"
    extract(model, data, other, noise_seed=1)
    copy_from_another_store(other)(store)
    with pytest.raises(IntegrityError, match=r"shard 1 \(chunk 2\) is marked finished but does not match its digest"):
        read_everything(store)
    checked = CliRunner().invoke(main, ["verify", "--store", str(store)])
    assert checked.exit_code == 1 and "train/block3/t10 shard 1 does not match its digests" in checked.output
    run_advice(checked.output, model)
    assert_same_store(store, reference)


def test_a_damaged_settings_file_is_repaired_from_its_copy_as_advised(model, data, reference, store):
    truncate(store / "zarr.json")
    with pytest.raises(StoreError) as error:
        read_everything(store)
    message = render(error.value)
    assert "zarr.json, the store's settings, is damaged" in message and "its copy" in message
    with pytest.raises(StoreError) as refused:  # an extraction into it is refused the same way, nothing written
        extract(model, data, store)
    assert advised_command(render(refused.value)) == advised_command(message)
    checked = CliRunner().invoke(main, ["verify", "--store", str(store)])
    assert checked.exit_code == 1 and advised_command(checked.output) == advised_command(message), checked.output
    run_advice(message, model)
    assert_same_store(store, reference)


def test_lost_settings_without_a_copy_are_named_and_replaced_with_overwrite(model, data, reference, store):
    truncate(store / "zarr.json")
    truncate(store / "_progress/zarr.json")  # the copy of the settings is gone too (or a store made before it)
    with pytest.raises(StoreError) as error:
        read_everything(store)
    assert "zarr.json, the store's settings, is damaged" in render(error.value)
    assert "--overwrite" in render(error.value)
    with pytest.raises(StoreError) as error:
        extract(model, data, store)
    assert "--overwrite" in render(error.value)
    extract(model, data, store, overwrite=True)
    assert_same_store(store, reference)


@pytest.mark.parametrize("step", [0, 1, 3, 10, 30])
def test_an_overwrite_killed_part_way_is_verified_and_repaired_as_advised(
    model, data, reference, store, tmp_path, monkeypatch, step
):
    other = tmp_path / "other.zarr"  # the store is replaced by one of other settings; the kill stops that
    extract(model, data, other, noise_seed=1)
    shutil.rmtree(store)
    shutil.copytree(other, store)
    with writes_fail(monkeypatch, from_write=step), pytest.raises(Crash):
        extract(model, data, store, overwrite=True)
    checked = CliRunner().invoke(main, ["verify", "--store", str(store)])
    assert checked.exception is None or isinstance(checked.exception, SystemExit), checked.output
    assert "Traceback" not in checked.output
    if store_files(store) == store_files(other):  # killed before its first write: the old store, untouched
        assert checked.exit_code == 0, checked.output
        return
    if checked.exit_code:
        assert "never finished being made" in checked.output
        run_advice(checked.output, model)
    else:  # the settings were written: what is left is unfinished work, which the same command finishes
        assert FeatureStore.open(store).missing() and "unfinished shards" in checked.output
        run_advice(checked.output, model)
    assert_same_store(store, reference)


def test_extract_verify_recomputes_a_damaged_chunk_in_one_go(model, data, reference, store):
    flip_a_bit(feature_shard(store, "val", 5, 90, 0))
    extract(model, data, store, verify=True)
    assert_same_store(store, reference)


def test_rebuilt_flags_recompute_nothing_that_verifies(model, data, reference, store, monkeypatch):
    flag_chunk(store).write_bytes(b"garbage!")
    written = []
    original = FeatureStoreWriter.write_shard
    monkeypatch.setattr(
        FeatureStoreWriter,
        "write_shard",
        lambda self, split, chunk, *a, **k: written.append((split, chunk)) or original(self, split, chunk, *a, **k),
    )
    extract(model, data, store)
    assert written == []
    assert_same_store(store, reference)


def test_a_partial_file_left_by_a_killed_write_is_cleaned_up(model, data, reference, store):
    (store / "train/block3/t10/c/0/0/0/0.1234.partial").write_bytes(b"half")
    extract(model, data, store)
    assert_same_store(store, reference)


# -- a store replaced under a reader ----------------------------------------------------------------
def test_a_reader_notices_a_replaced_store(model, data, store):
    reader = FeatureStore.open(store)
    reader.read_chunk("train", 3, 10, 0)
    extract(model, data, store, noise_seed=1, overwrite=True)
    with pytest.raises(StoreReplacedError, match="was replaced after it was opened .*noise_seed"):
        reader.read_chunk("train", 3, 10, 1)


def test_a_held_store_is_not_replaced(model, data, store):
    before = store_files(store)
    with FeatureStore.open(store).hold():
        with pytest.raises(StoreInUseError, match="open for reading in another process"):
            extract(model, data, store, noise_seed=1, overwrite=True)
        extract(model, data, store, timesteps=(10, 90, 150))  # adding to it is fine meanwhile
    settings = ("zarr.json", COPY)  # the settings and their copy list t150 now
    assert {k: v for k, v in store_files(store).items() if k in before and "t150" not in k and k not in settings} == {
        k: v for k, v in before.items() if k not in settings
    }


def test_overwrite_during_a_streaming_probe_is_refused_and_the_probe_is_unchanged(
    model, data, store, tmp_path, monkeypatch
):
    from stages.probe import features
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    settings = dict(
        store=str(store), head="linear", epochs=2, batch_size=8, data_mode="stream", shuffle_window=8, threads=1
    )
    quiet = run_probe(ProbeSettings(out=str(tmp_path / "quiet"), **settings))
    refused, original = [], features.Reader.read

    def read_and_interfere(self, split, chunks):
        if not refused:
            with pytest.raises(StoreInUseError) as error:
                extract(model, data, store, noise_seed=1, overwrite=True)
            refused.append(str(error.value))
        return original(self, split, chunks)

    monkeypatch.setattr(features.Reader, "read", read_and_interfere)
    busy = run_probe(ProbeSettings(out=str(tmp_path / "busy"), **settings))
    assert refused and busy.rows == quiet.rows
    assert busy.record["store_fingerprint"] == quiet.record["store_fingerprint"]


# -- images changed in place ------------------------------------------------------------------------
@pytest.fixture
def bmp_data(tmp_path) -> Path:
    # BMP has no compression: a changed pixel keeps the file size, as the fault sweep's edit did
    return make_image_folder(tmp_path / "bmp", counts={"train": 12, "val": 4}, classes=2, suffix=".bmp", seed=5)


def repaint(path: Path, *, keep_mtime: bool = False) -> None:
    stat = path.stat()
    with Image.open(path) as image:
        pixels = np.asarray(image).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(path)
    assert path.stat().st_size == stat.st_size
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_image_changed_in_place_is_refused_on_resume_and_extension(model, bmp_data, tmp_path):
    out = tmp_path / "s.zarr"
    extract(model, bmp_data, out)
    before = store_files(out)
    changed = bmp_data / "train" / "class1" / "img0003.bmp"
    repaint(changed)
    for timesteps in ((10, 90), (10, 90, 150)):
        with pytest.raises(DataChangedError, match="train/class1/img0003.bmp"):
            extract(model, bmp_data, out, timesteps=timesteps)
    assert store_files(out) == before


def test_a_change_that_kept_its_mtime_is_caught_when_the_image_is_read_again(model, bmp_data, tmp_path):
    out = tmp_path / "s.zarr"
    extract(model, bmp_data, out)
    repaint(bmp_data / "val" / "class0" / "img0002.bmp", keep_mtime=True)
    with pytest.raises(DataChangedError, match="val/class0/img0002.bmp"):
        extract(model, bmp_data, out, timesteps=(10, 90, 150))
    assert FeatureStore.open(out).missing_chunks("val", 3, 150) == [0]  # nothing mixed in


def test_a_touched_image_is_fine(model, bmp_data, tmp_path):
    out = tmp_path / "s.zarr"
    extract(model, bmp_data, out)
    touched = bmp_data / "train" / "class0" / "img0000.bmp"
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    extract(model, bmp_data, out, timesteps=(10, 90, 150))
    records = FeatureStore.open(out).file_records("train")
    assert records[0, 1] == touched.stat().st_mtime_ns


# -- what the writer refuses to record ---------------------------------------------------------------
def test_non_finite_features_are_never_marked_finished(model, data, tmp_path):
    out = tmp_path / "s.zarr"
    extract(model, data, out)
    store = FeatureStore.open(out)
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
    splits = {s: store_writer.SplitIndex(store.labels(s), store.paths(s)) for s in store.splits}
    with FeatureStoreWriter.open(
        out, settings=settings, splits=splits, block_table=store.attrs["block_table"]
    ) as writer:
        writer.add_arrays({3: 1}, [150], [1])
        values = np.ones((16, store.block_info(3)["channels"], 1, 1), np.float16)  # shard 0: 16 samples
        values[2] = np.inf  # what float16 makes of a feature above 65504
        with pytest.raises(StoreError, match=r"gave NaN or infinite features for train samples 2") as error:
            writer.write_shard("train", 0, {(3, 150): values})
        assert "--dtype float32" in render(error.value)  # the command line's advice
    assert FeatureStore.open(out).missing_chunks("train", 3, 150) == [0, 1, 2]


# -- labels, paths and file records: never read as their fill value (issue 24) ---------------------
def test_a_deleted_labels_chunk_fails_the_probe_with_the_repair_command(model, data, reference, store, tmp_path):
    """The case that once scored 37.5% with exit 0: labels read as all zeros. (CKA reads no labels: its
    numbers do not depend on them.)"""
    (store / "train/labels/c/0").unlink()
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(store),
            "--head",
            "knn",
            "--knn-k",
            "1",
            "--blocks",
            "5",
            "--timesteps",
            "90",
            "--out",
            str(tmp_path / "probe"),
            "--no-render",
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "train/labels chunk(s) 0 are missing" in result.output
    assert advised_command(result.output) == ["verify", "--store", str(store), "--repair"]
    assert not (tmp_path / "probe").exists() or not any((tmp_path / "probe").rglob("*.csv"))
    run_advice(result.output, model)
    assert_same_store(store, reference)


def test_a_view_splits_labels_are_verified_and_repaired(model, data, tmp_path):
    out, reference = tmp_path / "views.zarr", tmp_path / "reference.zarr"
    for path in (out, reference):
        extract(model, data, path, views=2, blocks=(3,), timesteps=(10,))
    (out / "train@view1/labels/c/0").unlink()
    with pytest.raises(IntegrityError) as error:
        FeatureStore.open(out).labels("train@view1")
    assert "train@view1/labels chunk(s) 0 are missing" in str(error.value)
    checked = CliRunner().invoke(main, ["verify", "--store", str(out)])
    assert checked.exit_code == 1 and "train@view1/labels" in checked.output
    run_advice(checked.output, model)
    assert_same_store(out, store_files(reference))


@pytest.fixture(scope="module")
def endpoint():
    from s3_server import s3_environment

    with s3_environment("lab") as url:
        yield url


@pytest.mark.parametrize("where", ["memory", pytest.param("s3", marks=pytest.mark.slow)])
def test_labels_and_paths_on_object_stores_are_verified_and_repaired(model, data, tmp_path, request, where):
    import fsspec

    url = "memory://faults/labels.zarr" if where == "memory" else "s3://lab/faults/labels.zarr"
    if where == "s3":
        request.getfixturevalue("endpoint")
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()
    extract(model, data, url, blocks=(3,), timesteps=(10,))  # one array: object stores are slow to write
    before = {s: (FeatureStore.open(url).labels(s), FeatureStore.open(url).paths(s)) for s in ("train", "val")}
    fs, root = fsspec.core.url_to_fs(url)
    for key in ("train/labels/c/0", "val/paths/c/0"):
        fs.rm(f"{root}/{key}")
    with pytest.raises(IntegrityError, match="train/labels chunk"):
        FeatureStore.open(url).labels("train")
    checked = CliRunner().invoke(main, ["verify", "--store", url])
    assert checked.exit_code == 1 and "train/labels" in checked.output and "val/paths" in checked.output
    run_advice(checked.output, model)
    store = FeatureStore.open(url)
    for split, (labels, paths) in before.items():
        np.testing.assert_array_equal(store.labels(split), labels)
        assert store.paths(split) == paths
    assert store.verify() == []


def test_a_damaged_pixel_store_is_repaired_as_advised(model, data, tmp_path):
    """The raw-pixel baseline's store records its own recipe: the same one command repairs it."""
    out, reference = tmp_path / "pixels.zarr", tmp_path / "reference.zarr"
    for path in (out, reference):
        result = CliRunner().invoke(
            main, ["pixels", "--data", str(data), "--out", str(path), "--size", "8", "--channels", "3"]
        )
        assert result.exit_code == 0, result.output
    flip_a_bit(max(p for p in (out / "train/block0/t0/c").rglob("*") if p.is_file()))
    (out / "val/paths/c/0").unlink()
    checked = CliRunner().invoke(main, ["verify", "--store", str(out)])
    assert checked.exit_code == 1 and "val/paths" in checked.output and "train/block0/t0" in checked.output
    run_advice(checked.output, model)
    assert_same_store(out, store_files(reference))


def as_made_before_recipes(store: Path, *drop: str) -> None:
    """A store written before stores recorded their recipe (and kept a copy of their settings); `drop`: more
    root attributes it lacks."""
    meta = json.loads((store / "zarr.json").read_text())
    for key in ("recipe", *drop):
        del meta["attributes"][key]
    (store / "zarr.json").write_text(json.dumps(meta, indent=2))
    copy = json.loads((store / "_progress/zarr.json").read_text())
    copy["attributes"] = {}
    (store / "_progress/zarr.json").write_text(json.dumps(copy, indent=2))


def test_a_store_made_before_recipes_is_repaired_from_its_settings_as_advised(model, data, reference, store):
    as_made_before_recipes(store)
    flip_a_bit(feature_shard(store))
    with pytest.raises(StoreError) as error:
        read_everything(store)
    run_advice(render(error.value), model)  # verify --repair: the recipe read from the settings, checked, then run
    files, expected = store_files(store), dict(reference)
    settings = [json.loads(files.pop(k))["attributes"] for k in ("zarr.json", "_progress/zarr.json")]
    recorded = [json.loads(expected.pop(k))["attributes"] for k in ("zarr.json", "_progress/zarr.json")]
    assert files == expected  # every feature, flag and digest as the uninterrupted run wrote them
    assert settings[1]["manifest"] == settings[0]  # the copy is back
    assert {k: v for k, v in settings[0].items() if k != "recipe"} == {
        k: v for k, v in recorded[0].items() if k != "recipe"
    }
    assert settings[0]["recipe"]["model"] == recorded[0]["recipe"]["model"]  # the one it ran is recorded now
    read_everything(store)


def test_a_store_made_before_recipes_that_does_not_name_its_model_is_rerun_as_advised(model, data, reference, store):
    as_made_before_recipes(store, "model_source")
    flip_a_bit(feature_shard(store))
    result = CliRunner().invoke(main, ["verify", "--store", str(store), "--repair"])
    assert result.exit_code == 1 and "does not record how it was made" in result.output
    assert "Run the `pipeline extract` that made it again, with the same settings" in result.output
    with pytest.raises(StoreError, match="unfinished"):
        read_everything(store)  # marked unfinished: never read as if it were sound
    extract(model, data, store)  # the rerun the advice names (it records the recipe from now on)
    assert_same_store(store, reference)
