"""One storage interface (`cache.storage.Location`): a local directory and an fsspec URL answer the same calls
the same way, and no caller asks which kind of store it has."""

from __future__ import annotations

import fcntl
import pickle
import re
import uuid
from pathlib import Path

import pytest

from cache.errors import StoreError
from cache.storage import LocalLocation, Location, ObjectLocation, StorageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(tmp_path / "store.zarr")
    return Location.parse(f"memory://storage-test-{uuid.uuid4().hex}/store.zarr")


def test_the_address_chooses_the_implementation():
    assert type(Location("features/a.zarr")) is LocalLocation is type(Location.parse(Path("a.zarr")))
    assert type(Location("s3://lab/a.zarr")) is ObjectLocation is type(Location.parse("memory://x/a.zarr"))
    assert Location.parse("memory://x/a.zarr/") == Location("memory://x/a.zarr")
    for location in (Location("a.zarr"), Location("s3://lab/a.zarr", {"anon": True})):
        assert pickle.loads(pickle.dumps(location)) == location  # stores travel to dask workers and ranks
    with pytest.raises(StorageError, match="storage options apply to object stores"):
        Location.parse("a.zarr", {"anon": True})


def test_both_kinds_answer_the_same_calls_the_same_way(location):
    location.prepare()
    assert location.children() == [] and not location.exists("zarr.json")
    location.write_bytes("zarr.json", b'{"a": 1}')
    location.write_bytes("train/labels/c/0", b"x")
    location.write_bytes("train/labels/c/1", b"y")
    assert location.read_text("zarr.json") == '{"a": 1}' and location.exists("train/labels/c/1")
    assert location.children() == ["train", "zarr.json"]
    assert location.files_under("train/labels/c") == {"train/labels/c/0", "train/labels/c/1"}
    assert location.files_under("nothing/here") == set()
    location.delete("train/labels/c/0")
    location.delete("train/labels/c/0")  # nothing there is not an error
    assert location.files_under("train") == {"train/labels/c/1"}
    location.delete("train")  # a prefix: everything under it
    assert location.children() == ["zarr.json"]
    location.remove_partial_writes()
    assert location.children() == ["zarr.json"]


def test_what_only_a_directory_has(tmp_path):
    local = Location.parse(tmp_path / "s.zarr")
    local.prepare()
    local.write_bytes("zarr.json", b"{}")
    (local.path / "zarr.json.1234.partial").write_bytes(b"half")  # a write killed before its rename
    local.remove_partial_writes()
    assert local.children() == ["zarr.json"]
    before = local.stamp("zarr.json")
    local.write_bytes("zarr.json", b'{"b": 2}')
    assert before is not None and local.stamp("zarr.json") != before  # an atomic rewrite shows
    assert local.free_bytes() > 0
    fd = local.flock("", fcntl.LOCK_EX)
    try:
        with pytest.raises(BlockingIOError):
            Location.parse(tmp_path / "s.zarr").flock("", fcntl.LOCK_SH)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    assert local.flock("no-such-directory", fcntl.LOCK_SH) is None
    hold = local.hold_writer()
    with pytest.raises(BlockingIOError):
        Location.parse(tmp_path / "s.zarr").hold_writer()
    assert not hold.may_be_lost
    hold.release()
    Location.parse(tmp_path / "s.zarr").hold_writer().release()  # free again
    remote = Location.parse("memory://x/s.zarr")  # no flocks, no disk, no cheap stamp: the writer takes a lease
    assert remote.flock("", fcntl.LOCK_EX) is None and remote.hold_writer() is None
    assert remote.free_bytes() is None and remote.stamp("zarr.json") is None


def test_a_file_is_not_a_store_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        Location.parse(tmp_path / "file").prepare()


def test_no_caller_branches_on_the_kind_of_store():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for package in ("cache", "stages", "pipeline")
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.local\b|isinstance\([^)]*(LocalLocation|ObjectLocation)", line)
    ]
    assert found == []
