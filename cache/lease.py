"""The single-writer lease of a store on object storage, where there is no flock.

    <store>/_writer.lease    {"holder": {"host", "pid", "since"}, "expires": <unix s>, "ttl": <s>}

A writer creates the lease object with a create-only conditional write (S3's `If-None-Match: *`):
of two writers racing for a store exactly one succeeds. While it runs, a background thread renews
the lease every `ttl / 3` seconds with `If-Match` on the ETag it last wrote, so nobody else can have
changed it in between. A lease whose `expires` has passed (its writer was killed, or lost the
network) may be taken over, again with `If-Match` on the expired lease's ETag, so two writers
taking over the same expired lease cannot both succeed.

A writer proves that it still holds the lease before every write (`check`): it renews the lease
there and then, with `If-Match` on its ETag. A writer that cannot (someone took its lease over after
it stalled past `expires`, or took it over and has since released it, so that there is no lease at
all) stops before that write, however long it was stalled and whatever its renewal thread did.

Time comes from `now` (the lease clock, `time.time` by default): tests replace it to see a lease
expire without waiting for it.

Expiry compares the writer's clock with the taker's: hosts sharing a store need clocks within a few
seconds of each other (NTP), which `ttl` (60 s by default) leaves ample room for.

S3 (and S3-compatible servers with conditional writes) gives the guarantee above. Other fsspec file
systems get the same protocol without the conditions (create-if-absent is checked, then written):
enough to refuse a second writer that starts later, not two that start in the same instant.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from cache.errors import StoreLockedError
from cache.storage import Location, StorageError

log = logging.getLogger(__name__)

LEASE = "_writer.lease"
TTL_SECONDS = float(os.environ.get("FEATURE_STORE_LEASE_TTL", "60"))
now = time.time  # the lease clock (unix seconds), read at each use so that tests can move it


class LeaseLostError(StoreLockedError):
    """Another writer took this writer's lease over (it had expired): this writer must stop."""


@dataclass
class _Held:
    etag: str | None
    body: dict


class Lease:
    """Held by the one writer of an object store; `release` (or the context manager) gives it back."""

    may_be_lost = True  # taken over by another writer once it expired in a stall (`check` proves it is held)

    def __init__(self, location: Location, *, ttl: float | None = None, clock=None):
        self.location = location
        self.ttl = float(TTL_SECONDS if ttl is None else ttl)
        self._clock = clock  # None: the module's `now`
        self._held: _Held | None = None
        self._lost: str | None = None
        self._guard = threading.Lock()  # one conditional renewal at a time: two on one ETag would fail each other
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._s3 = location.protocol in ("s3", "s3a")

    # -- taking and giving back --------------------------------------------------------------------------
    def acquire(self) -> Lease:
        body = self._body(since=self._now())
        etag = self._create(body)
        if etag is None:  # someone holds, or held, the lease
            current, current_etag = self._read()
            if current is not None and current.get("expires", 0) > self._now():
                raise StoreLockedError(
                    f"{self.location} is being written by another process ({describe(current)})", store=self.location
                )
            holder = describe(current) if current else "a lease that could not be read"
            log.warning("%s: taking over the expired lease of %s", self.location, holder)
            etag = self._replace(body, current_etag)
            if etag is None:
                raise StoreLockedError(
                    f"{self.location}: another process took over its expired writer lease at the same moment",
                    store=self.location,
                )
        self._held = _Held(etag, body)
        self._thread = threading.Thread(target=self._renew_loop, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._held is not None and self._lost is None:
            try:
                self._delete(self._held.etag)
            except Exception as error:  # noqa: BLE001 - an unreleased lease only expires later
                log.warning(
                    "%s: could not release the writer lease (%s); it expires in %.0f s", self.location, error, self.ttl
                )
        self._held = None

    def check(self) -> None:
        """Prove that this writer still holds the lease by renewing it now; raise LeaseLostError if it was
        taken over (or taken over and released). Writers call it before each write."""
        self.renew()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- renewal -----------------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as error:  # noqa: BLE001 - a missed renewal is retried; the lease outlives two
                log.warning("%s: renewing the writer lease failed (%s); trying again", self.location, error)

    def renew(self) -> None:
        with self._guard:
            if self._lost is not None:
                raise LeaseLostError(self._lost)
            held = self._held
            if held is None:
                return
            body = {**held.body, "expires": self._now() + self.ttl}
            try:
                etag = self._replace(body, held.etag)
            except FileNotFoundError:  # no lease at all: another writer took it over and has released it
                etag = None
            if etag is None:
                current, _ = self._read()
                taker = (
                    f"is held by another process ({describe(current)})"
                    if current
                    else "was taken over by another process, which has finished and released it"
                )
                self._lost = (
                    f"{self.location}: this writer stalled past its lease's expiry and the lease {taker}; "
                    "this run stops before writing again (finished shards are kept). Run the same "
                    "command again to finish the store"
                )
                raise LeaseLostError(self._lost)
            self._held = _Held(etag, body)

    def _now(self) -> float:
        return (self._clock or now)()

    # -- the object store's conditional writes ----------------------------------------------------------
    def _body(self, *, since: float) -> dict:
        return {
            "holder": {"host": socket.gethostname(), "pid": os.getpid(), "since": since},
            "expires": self._now() + self.ttl,
            "ttl": self.ttl,
        }

    def _key(self) -> str:
        return self.location.key(LEASE)

    def _create(self, body: dict) -> str | None:
        """Write the lease only if there is none: its ETag, or None if one exists."""
        data = json.dumps(body).encode()
        if self._s3:
            return self._s3_put(data, IfNoneMatch="*")
        try:
            self.location.fs.pipe_file(self._key(), data, mode="create")
        except FileExistsError:
            return None
        return None if self._read()[0] != body else "-"

    def _replace(self, body: dict, etag: str | None) -> str | None:
        """Write the lease only if it still is the one with `etag`: the new ETag, or None if it changed."""
        data = json.dumps(body).encode()
        if self._s3:
            return self._s3_put(data, IfMatch=etag) if etag else self._s3_put(data, IfNoneMatch="*")
        # Without conditional writes: still ours only if the holder written there is this writer.
        current, _ = self._read()
        if current is None or (self._held is not None and current.get("holder") != self._held.body["holder"]):
            return None
        self.location.fs.pipe_file(self._key(), data)
        return "-"

    def _delete(self, etag: str | None) -> None:
        if self._s3:
            bucket, key, _ = self.location.fs.split_path(self._key())
            self._s3_call("delete_object", Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
        else:
            self.location.delete(LEASE)

    def _read(self) -> tuple[dict | None, str | None]:
        if self._s3:
            bucket, key, _ = self.location.fs.split_path(self._key())
            try:
                response = self._s3_call("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None, None
            body = response["Body"]
            data = self.location.fs.loop and _read_body(self.location.fs, body)
            return _parse(data), response.get("ETag")
        try:
            return _parse(self.location.fs.cat_file(self._key())), "-"
        except FileNotFoundError:
            return None, None

    def _s3_put(self, data: bytes, **condition) -> str | None:
        bucket, key, _ = self.location.fs.split_path(self._key())
        try:
            response = self._s3_call("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except _PreconditionFailed:
            return None
        return response.get("ETag")

    def _s3_call(self, method: str, **kwargs):
        fs = self.location.fs
        try:
            return fs.call_s3(method, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:  # botocore's ClientError, as s3fs hands it on
            code = _error_code(error)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _PreconditionFailed from None
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(kwargs.get("Key")) from None
            raise StorageError(self.location._explain(error)) from None


class _PreconditionFailed(Exception):
    pass


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or getattr(getattr(error, "__cause__", None), "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    if code:
        return code
    text = str(error)
    for marker in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
        if marker in text:
            return marker
    return ""


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


def _parse(data) -> dict | None:
    try:
        value = json.loads(data)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def describe(lease: dict) -> str:
    holder = lease.get("holder", {})
    since = holder.get("since")
    when = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if since else "unknown"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, writing since {when}"
