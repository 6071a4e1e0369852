"""Where a store lives: a local directory or an fsspec URL (`s3://`, `gs://`, `memory://` ...).

    location = Location.parse("s3://lab/features/in1k.zarr", {"client_kwargs": {"region_name": "eu-west-1"}})
    location.zarr_store(read_only=True)     # what zarr.open_group takes
    location.read_text("zarr.json"), location.exists("train/labels/zarr.json"), location.delete("train/block3")

`Location` is the one interface to a store's objects (keys relative to the store), with two
implementations that `Location.parse` (or `Location(url)`) chooses from the address, so that no
caller asks which kind it has:

- `LocalLocation`, a directory: zarr's `LocalStore`, writes as atomic renames, `flock`s for the locks
  (`cache.locks`), a disk that can fill up (`free_bytes`), a settings file whose rewrites show in its
  inode and mtime (`stamp`);
- `ObjectLocation`, any fsspec URL: `zarr.storage.FsspecStore`, with credentials and endpoints from the
  standard environment of its file system (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) and `storage_options` for the rest. An object PUT is
  atomic, so what local stores get from a rename object stores get from the PUT itself; there are no
  flocks (`flock` gives None: the writer holds a lease instead, `cache.lease`) and no disk to fill.

Every store zarr opens can be passed through a wrapper (`wrapped_stores`, a zarr `WrapperStore`
factory), as can the few writes made around zarr (the root's zarr.json): the seam through which the
fault tests kill or fill a store at its Nth write, with zarr's public store API only.

Failures to reach a store (an unknown URL scheme, an endpoint that does not answer, missing
credentials, a bucket that does not exist) are `StorageError`s that name the store and the fix.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cache.errors import ELSEWHERE, StoreError
from cache.extras import require


class StorageError(StoreError):
    """A store that cannot be reached or used: the message names it and what to check."""


# Defaults for S3 clients that keep a store that does not answer from hanging a run for minutes;
# a user's own storage options win.
S3_DEFAULTS = {
    "config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3, "mode": "standard"}}
}


# Object stores whose first path element is a bucket (or container) that must exist already.
BUCKETS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def is_url(text: str) -> bool:
    return "://" in str(text)


_wrapper: Callable | None = None


@contextmanager
def wrapped_stores(wrap: Callable) -> Iterator[None]:
    """Meanwhile every store opened is `wrap(store)` (e.g. a `zarr.storage.WrapperStore` that fails at
    its Nth write): for fault injection; nothing else uses it."""
    global _wrapper
    previous, _wrapper = _wrapper, wrap
    try:
        yield
    finally:
        _wrapper = previous


def _merged(defaults: dict, options: dict) -> dict:
    merged = dict(defaults)
    for key, value in options.items():
        merged[key] = (
            _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _checked_url(text: str) -> str:
    """The URL without trailing slashes; one without a scheme, or an object store's without a bucket, is refused
    (stripping `s3://` to `s3:` would make it a local directory of that name)."""
    scheme, _, rest = text.partition("://")
    rest = rest.rstrip("/")
    if not scheme:
        raise StorageError(
            f"{text}: no scheme before :// ; write a local path, or a URL such as s3://BUCKET/store.zarr"
        )
    if scheme in BUCKETS:
        bucket = rest.split("/", 1)[0]
        if not bucket or bucket != bucket.strip():
            raise StorageError(
                f"{text} names no bucket: write {scheme}://BUCKET/path/store.zarr, e.g. "
                f"{scheme}://lab/features/store.zarr"
            )
    return f"{scheme}://{rest}"


@dataclass(frozen=True)
class Location:
    """A store's address: `url` as the user gave it, and the storage options it is opened with; and the interface
    every caller uses to reach the store's objects (module docstring). `Location(url)` is the implementation the
    address needs; `parse` also checks the address."""

    url: str
    options: dict = field(default_factory=dict)

    def __new__(cls, url: str = "", options: dict | None = None):
        if cls is Location:
            cls = ObjectLocation if is_url(str(url)) else LocalLocation
        return object.__new__(cls)

    @classmethod
    def parse(cls, url, options: dict | None = None) -> Location:
        if isinstance(url, Location):
            return url
        text = str(url)
        if is_url(text):
            text = _checked_url(text)
        elif options:
            raise StorageError(
                f"storage options apply to object stores (s3://, gs:// ...), not to the local path {text}"
            )
        return Location(text, dict(options or {}))

    def __str__(self) -> str:
        return self.url

    # -- the interface: keys are relative to the store -------------------------------------------------------
    @property
    def protocol(self) -> str:
        """ "file" for a directory, else the URL's scheme."""
        raise NotImplementedError

    def zarr_store(self, *, read_only: bool):
        """What `zarr.open_group` takes for this store (through `wrapped_stores`' wrapper, where one is set)."""
        raise NotImplementedError

    def exists(self, relative: str) -> bool:
        raise NotImplementedError

    def files_under(self, relative: str) -> set[str]:
        """Every object under a prefix, as keys relative to the store: one listing instead of a request each."""
        raise NotImplementedError

    def read_text(self, relative: str) -> str:
        raise NotImplementedError

    def children(self) -> list[str]:
        """Names directly under the store (files and prefixes), [] where it does not exist yet."""
        raise NotImplementedError

    def delete(self, relative: str) -> None:
        """Remove an object or everything under a prefix; nothing there is not an error."""
        raise NotImplementedError

    def write_bytes(self, relative: str, data: bytes) -> None:
        """One atomic write: a local temporary file renamed, or one PUT."""
        if _wrapper is not None:  # through the wrapped store, like every other write
            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.sync import sync

            sync(self.zarr_store(read_only=False).set(relative, default_buffer_prototype().buffer.from_bytes(data)))
            return
        self._put(relative, data)

    def _put(self, relative: str, data: bytes) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Make sure the store can be written before anything is: a directory made and writable, an object store
        reachable. A StoreError (or StorageError) names what is wrong."""
        raise NotImplementedError

    def remove_partial_writes(self) -> None:
        """Remove what writes killed before they completed left behind (nothing, on an object store)."""

    def free_bytes(self) -> int | None:
        """Space left where the store lives; None where it cannot run out (an object store)."""
        return None

    def stamp(self, relative: str):
        """Something that changes whenever the object is rewritten, or None where there is no cheap one."""
        return None

    def flock(self, relative: str, mode: int) -> int | None:
        """An `fcntl.flock` (`mode` | LOCK_NB) held on the directory `relative` of the store: its descriptor, or
        None where there is none to hold (an object store, or no such directory). BlockingIOError while another
        process holds it in a conflicting mode."""
        return None

    def hold_writer(self):
        """The one writer's flock on the store, where it has one (`cache.locks.WriterLock`; None: it takes a lease):
        `check()` raises once it is lost, `release()` gives it back, `may_be_lost` says whether another writer can
        take it meanwhile. BlockingIOError while another process holds it."""
        raise NotImplementedError


class _Flock:
    """An exclusive flock on a store's directory: the operating system releases it when its holder dies."""

    may_be_lost = False

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def check(self) -> None:
        pass

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LocalLocation(Location):
    """A store in a local directory (module docstring)."""

    @property
    def path(self) -> Path:
        return Path(self.url)

    @property
    def protocol(self) -> str:
        return "file"

    def zarr_store(self, *, read_only: bool):
        if _wrapper is None:
            return self.url
        from zarr.storage import LocalStore

        return _wrapper(LocalStore(self.url, read_only=read_only))

    def exists(self, relative: str) -> bool:
        return (self.path / relative).exists()

    def files_under(self, relative: str) -> set[str]:
        base = self.path / relative
        if not base.is_dir():
            return set()
        return {p.relative_to(self.path).as_posix() for p in base.rglob("*") if p.is_file()}

    def read_text(self, relative: str) -> str:
        return (self.path / relative).read_text()

    def children(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def delete(self, relative: str) -> None:
        target = self.path / relative
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def _put(self, relative: str, data: bytes) -> None:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)  # as an object store has no folders to make first
        partial = target.with_name(target.name + ".replacing.partial")
        partial.write_bytes(data)
        partial.replace(target)

    def prepare(self) -> None:
        directory = self.path
        if directory.exists() and not directory.is_dir():
            raise StoreError(
                f"{directory} is a file, not a directory: it cannot hold a store", store=self, remedy=ELSEWHERE
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(
                f"cannot make the store directory {directory}: {error.strerror}", store=self, remedy=ELSEWHERE
            ) from None
        if not os.access(directory, os.W_OK):
            raise StoreError(f"cannot write to {directory} (permission denied)", store=self, remedy=ELSEWHERE)

    def remove_partial_writes(self) -> None:
        # An atomic local write killed before its rename leaves "<key>.<uuid>.partial"; the key itself is intact.
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink()

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.path).free

    def stamp(self, relative: str):
        """(inode, mtime) of the file: an atomic rewrite changes both."""
        try:
            info = (self.path / relative).stat()
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def flock(self, relative: str, mode: int) -> int | None:
        try:
            fd = os.open(self.path / relative, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        return fd

    def hold_writer(self) -> _Flock:
        fd = os.open(self.path, os.O_RDONLY)  # the directory exists: `prepare` made it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        return _Flock(fd)


class ObjectLocation(Location):
    """A store at an fsspec URL (module docstring)."""

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    # -- the file system -------------------------------------------------------------------------------
    @cached_property
    def _fs_and_root(self):
        import fsspec

        if self.protocol in ("s3", "s3a"):
            require("s3fs", "s3", f"{self.url}: an S3 store")
        try:
            cls = fsspec.get_filesystem_class(self.protocol)
        except (ValueError, ImportError) as error:
            known = ", ".join(sorted(p for p in fsspec.available_protocols() if len(p) > 1)[:20])
            raise StorageError(
                f"{self.url}: no file system for {self.protocol}:// ({error}). Use a local path or "
                f"a URL fsspec knows ({known}, ...)"
            ) from None
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self._options)
        except TypeError as error:
            raise StorageError(
                f"{self.url}: the storage options {sorted(self.options)} are not accepted by {cls.__name__} ({error})"
            ) from None
        return fs, root.rstrip("/")

    @property
    def _options(self) -> dict:
        return _merged(S3_DEFAULTS, self.options) if self.protocol in ("s3", "s3a") else dict(self.options)

    @property
    def fs(self):
        return self._fs_and_root[0]

    @property
    def root(self) -> str:
        return self._fs_and_root[1]

    def key(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def zarr_store(self, *, read_only: bool):
        from zarr.storage import FsspecStore

        self._fs_and_root  # noqa: B018 -- an unknown scheme or bad options are named here, not deep inside zarr
        store = FsspecStore.from_url(self.url, storage_options=self._options or None, read_only=read_only)
        return store if _wrapper is None else _wrapper(store)

    def exists(self, relative: str) -> bool:
        return self._call("check", self.fs.exists, self.key(relative))

    def files_under(self, relative: str) -> set[str]:
        try:
            found = self._call("list", self.fs.find, self.key(relative))
        except FileNotFoundError:
            return set()
        root = self.root + "/"
        return {str(key)[len(root) :] for key in found if str(key).startswith(root)}

    def read_text(self, relative: str) -> str:
        return self._call("read", self.fs.cat_file, self.key(relative)).decode()

    def children(self) -> list[str]:
        try:
            entries = self._call("list", self.fs.ls, self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def delete(self, relative: str) -> None:
        try:
            self._call("delete", self.fs.rm, self.key(relative), recursive=True)
        except FileNotFoundError:
            pass

    def _put(self, relative: str, data: bytes) -> None:
        self._call("write", self.fs.pipe_file, self.key(relative), data)

    def hold_writer(self) -> None:
        return None  # no flock on an object store: the writer takes a lease (`cache.locks`, `cache.lease`)

    def prepare(self) -> None:
        if self.protocol in BUCKETS:
            self._call("reach", self.fs.ls, self._bucket_root(), detail=False)
        else:
            self._call("check", self.fs.exists, self.root)

    def _bucket_root(self) -> str:
        # The bucket (or container) itself: missing is an error, while a missing store under it is not.
        return self.root.split("/", 1)[0]

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FileNotFoundError as error:
            if what in ("reach", "list") and not self._bucket_exists():
                raise StorageError(self._no_bucket()) from None
            if what == "reach":
                raise StorageError(f"{self.url}: {error}") from None
            raise
        except PermissionError as error:
            raise StorageError(
                f"{self.url}: access denied ({error}). Check the credentials ({self._credential_hint()})"
            ) from None
        except Exception as error:  # the object store clients raise many types; name the usual causes
            raise StorageError(self._explain(error)) from None

    def _bucket_exists(self) -> bool:
        if self.protocol not in BUCKETS:
            return True
        try:
            return bool(self.fs.exists(self._bucket_root()))
        except Exception:  # noqa: BLE001 - the question is only whether it is there
            return False

    def _no_bucket(self) -> str:
        bucket = self._bucket_root()
        return (
            f"{self.url}: the bucket {bucket!r} does not exist{self._at_endpoint()}. Create it first "
            f"(e.g. `aws s3 mb {self.protocol}://{bucket}`) or check the URL"
        )

    def _at_endpoint(self) -> str:
        import os

        endpoint = self._endpoint() or os.environ.get("AWS_ENDPOINT_URL")
        return f" at {endpoint}" if endpoint and self.protocol.startswith("s3") else ""

    def _endpoint(self) -> str | None:
        return self.options.get("endpoint_url") or self.options.get("client_kwargs", {}).get("endpoint_url")

    def _credential_hint(self) -> str:
        if self.protocol.startswith("s3"):
            return (
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the storage options key and secret, or the "
                "storage option anon=true for a public bucket"
            )
        return f"the environment or storage options that {self.protocol}:// reads"

    def _explain(self, error: Exception) -> str:
        name = type(error).__name__
        text = str(error).splitlines()[0] if str(error) else name
        if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
            return f"{self.url}: no credentials for it ({text}). Set {self._credential_hint()}"
        if name in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ConnectionError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ConnectionRefusedError",
            "ReadTimeoutError",
            "TimeoutError",
        ):
            return (
                f"{self.url}: cannot reach the object store{self._at_endpoint()} ({text}). Check the endpoint "
                "(AWS_ENDPOINT_URL or the storage option endpoint_url) and the network"
            )
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return self._no_bucket()
        return f"{self.url}: the object store refused the request ({name}: {text})"
