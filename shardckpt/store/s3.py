"""S3 (and S3-compatible servers) through boto3.

A save streams every shard as a multipart upload from memory through a few part buffers (no
local staging, no local disk) under the step's version prefix, and commits with one
conditional PUT of the manifest (``versioned.py`` has the layout). Reads are ranged GETs of
just the chunks a target needs. Transient errors (HTTP 5xx, throttling, dropped
connections) are retried with exponential backoff, bounded by the save's deadline. boto3
rather than pyarrow's S3 client: pyarrow 26's fails CompleteMultipartUpload against
S3-compatible servers (moto), boto3 is the reference client and honours AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit

import xxhash

from shardckpt.errors import CheckpointError, CorruptCheckpointError
from shardckpt.format.manifest import MANIFEST
from shardckpt.store.base import Entry, Sink, Source, T, VersionChanged, Written, count_read
from shardckpt.store.s3_errors import CONFLICT_CODES, MISSING_CODES, UNREACHABLE_SECONDS, as_ours, unreachable
from shardckpt.store.s3_errors import code as _code
from shardckpt.store.s3_errors import transient as _transient
from shardckpt.store.versioned import VersionedStaging, VersionedStore
from shardckpt.workers import WorkerPool

PART_BYTES = int(os.environ.get("SHARDCKPT_S3_PART_BYTES", 8 << 20))   # >= 5 MiB (S3's minimum)
PARTS_IN_FLIGHT = 2             # uploads running per file while the next part fills
RETRY_SECONDS = 120.0
COPY_OBJECT_MAX = 5 << 30        # S3's limit of one CopyObject
COPY_PART_BYTES = 512 << 20      # parts of a larger server-side copy
PUBLISH_ATTEMPTS = 50           # retry budget of a request outside a save (loads, listing)
_MISSING_CODES = MISSING_CODES    # which failures mean what: s3_errors.py


# Counters of what this process asked of object stores (tests and benchmarks read them).
STATS = {"get_bytes": 0, "gets": 0, "put_bytes": 0, "puts": 0, "retries": 0, "copies": 0, "copy_bytes": 0}
_STATS_LOCK = threading.Lock()


def _count(**kw) -> None:
    with _STATS_LOCK:
        for k, v in kw.items():
            STATS[k] += v


def retrying(call: Callable[[], T], what: str, deadline: float | None = None) -> T:
    """``call()``, again after transient failures with exponential backoff and jitter,
    until ``deadline`` (or RETRY_SECONDS from now; an endpoint refusing every connection
    UNREACHABLE_SECONDS); then the last error is raised."""
    start = time.time()
    end = deadline if deadline is not None else start + RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified below
            stop = end
            if deadline is None and unreachable(e):
                stop = min(end, start + UNREACHABLE_SECONDS)
            left = stop - time.time()
            if not _transient(e) or left <= 0.01:
                raise
        _count(retries=1)
        # The last wait is cut to the time left, so one more try lands just before the
        # deadline: a save given 3 s keeps trying for 3 s, not for the ~1.5 s that whole
        # doubling waits fit into.
        time.sleep(min(delay * (0.5 + random.random()), left))
        delay = min(delay * 2, 5.0)


class S3Store(VersionedStore):
    """``s3://bucket/prefix``; the endpoint comes from ``?endpoint_url=`` in the URI or
    ``AWS_ENDPOINT_URL`` (boto3's own rule), credentials the usual boto3 way."""

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        if not self.bucket:
            raise CheckpointError(f"{uri}: no bucket in the URI")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._query = ("?" + parts.query) if parts.query else ""
        self.deadline: float | None = None
        self._client = None
        self._lock = threading.Lock()

    @classmethod
    def claims(cls, uri: str) -> bool:
        return urlsplit(uri).scheme in ("s3", "s3a")

    @classmethod
    def of_arrow_filesystem(cls, fs: Any, path: str) -> S3Store:
        """The S3 location a ``pyarrow.fs.S3FileSystem`` and a ``bucket/prefix`` path name,
        served through boto3 with that filesystem's endpoint and region (credentials come
        the usual boto3 way)."""
        try:
            options = fs.__reduce__()[1][0]        # the filesystem's constructor arguments
        except Exception:  # noqa: BLE001 - another pyarrow: environment settings apply
            options = {}
        query = {}
        if options.get("endpoint_override"):
            endpoint = options["endpoint_override"]
            if "://" not in endpoint:
                endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
            query["endpoint_url"] = endpoint
        if options.get("region"):
            query["region"] = options["region"]
        return cls(f"s3://{path.strip('/')}" + (f"?{urlencode(query)}" if query else ""))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"], state["_lock"] = None, None     # rebuilt in the receiving process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        import boto3
                        from botocore.config import Config
                    except ImportError as e:
                        raise CheckpointError("s3:// paths need boto3: pip install 'shardckpt[s3]'") from e
                    config = Config(retries={"total_max_attempts": 1}, max_pool_connections=64,
                                    connect_timeout=10, read_timeout=120)
                    try:
                        self._client = boto3.client("s3", endpoint_url=self.query.get("endpoint_url"),
                                                    region_name=self.query.get("region"), config=config)
                    except Exception as e:  # noqa: BLE001 - botocore: a malformed endpoint, no region...
                        raise CheckpointError(f"{self.uri}: cannot make an S3 client ({type(e).__name__}: {e}); "
                                              "check ?endpoint_url= / AWS_ENDPOINT_URL and ?region=") from e
        return self._client

    def endpoint(self) -> str:
        """The endpoint requests go to, for messages."""
        try:
            return self.client.meta.endpoint_url
        except CheckpointError:
            return self.query.get("endpoint_url") or "the default AWS endpoint"

    def prepare_parent(self) -> None:
        """Check, once, that the bucket exists and the endpoint answers (a manager fails at
        construction, not at its first save hours later): CheckpointError naming them. A
        403 passes: a reader may lack ListBucket, and its reads report their own errors."""
        start = time.time()
        try:
            retrying(lambda: self.client.head_bucket(Bucket=self.bucket), "HEAD bucket", self.deadline)
        except Exception as e:  # noqa: BLE001 - classified here and by as_ours
            if _code(e) in ("404", "NoSuchBucket"):
                raise CheckpointError(f"s3://{self.bucket}: no such bucket at {self.endpoint()}; create the bucket "
                                      "or correct the URI") from e
            if _code(e) in ("403", "AccessDenied"):
                return
            ours = as_ours(e, what="HEAD bucket", where=self.where(), bucket=self.bucket, endpoint=self.endpoint(),
                           waited=time.time() - start)
            raise ours from (None if ours is e else e)

    def where(self, name: str = "") -> str:
        return (f"{self.uri}/{name}" if name else self.uri) + self._query

    def child_store(self, name: str) -> "S3Store":
        return S3Store(self.where(name))

    def key(self, name: str) -> str:
        if not name:
            return self.prefix
        return f"{self.prefix}/{name}" if self.prefix else name

    def request(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` with retries; what fails for good is raised as our error naming the
        bucket or endpoint (``s3_errors.as_ours``), except the answers callers act on."""
        start = time.time()
        try:
            return retrying(call, what, self.deadline)
        except Exception as e:  # noqa: BLE001 - classified by as_ours
            ours = as_ours(e, what=what, where=self.where(), bucket=self.bucket, endpoint=self.endpoint(),
                           waited=time.time() - start)
            if ours is e:
                raise
            raise ours from e

    # --- reading ---------------------------------------------------------------------------
    def _head(self, name: str) -> dict | None:
        """The object's HEAD response, None if it does not exist."""
        try:
            return self.request("HEAD", lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(name)))
        except Exception as e:  # noqa: BLE001 - botocore ClientError
            if _code(e) in _MISSING_CODES:
                return None
            raise

    def size(self, name: str) -> int | None:
        head = self._head(name)
        return None if head is None else head["ContentLength"]

    def read_bytes(self, name: str, limit: int) -> bytes:
        data, _ = self.read_with_etag(name, limit)
        if data is None:
            raise FileNotFoundError(self.where(name))
        return data

    def open(self, name: str) -> "S3Source":
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self.where(name))
        return S3Source(self, name, size)

    def read_range(self, name: str, offset: int, view: memoryview) -> None:
        if not len(view):
            return

        def get() -> None:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                          Range=f"bytes={offset}-{offset + len(view) - 1}")["Body"]
            pos = 0
            while pos < len(view):
                block = body.read(min(PART_BYTES, len(view) - pos))
                if not block:
                    raise CorruptCheckpointError(f"{self.where(name)} is truncated at byte {offset + pos}")
                view[pos:pos + len(block)] = block
                pos += len(block)
        try:
            self.request("ranged GET", get)
        except Exception as e:  # noqa: BLE001 - botocore ClientError
            if _code(e) in _MISSING_CODES:   # deleted meanwhile (a re-save or retention)
                raise CorruptCheckpointError(f"{self.where(name)} is missing") from e
            raise
        _count(gets=1, get_bytes=len(view))
        count_read(len(view))

    def list(self, prefix: str = "") -> list[Entry]:
        base = self.key(prefix).rstrip("/")
        base = base + "/" if base else ""
        out: list[Entry] = []
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": base, "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            page = self.request("LIST", lambda: self.client.list_objects_v2(**kw))
            out += [Entry(p["Prefix"][len(base):].rstrip("/"), True) for p in page.get("CommonPrefixes", [])]
            out += [Entry(o["Key"][len(base):], False, o["Size"], o["LastModified"].timestamp())
                    for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def _keys_under(self, name: str) -> list[str]:
        base = self.key(name).rstrip("/")
        base = base + "/" if base else ""
        keys, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": base}
            if token:
                kw["ContinuationToken"] = token
            page = self.request("LIST", lambda: self.client.list_objects_v2(**kw))
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    # --- writing ---------------------------------------------------------------------------
    def put(self, name: str, data: bytes) -> None:
        self.put_key(self.key(name), data)

    def etag(self, name: str) -> str | None:
        head = self._head(name)
        return None if head is None else head["ETag"]

    def read_with_etag(self, name: str, limit: int) -> tuple[bytes | None, str | None]:
        """(contents, ETag) of one small object read in one GET, (None, None) if absent. A
        transient failure retries the whole GET (never a half-read body)."""
        def get() -> tuple[bytes, str]:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            if resp["ContentLength"] > limit:
                resp["Body"].close()
                raise CorruptCheckpointError(f"{self.where(name)} is {resp['ContentLength']} bytes, over the "
                                             f"{limit} limit")
            data = resp["Body"].read()        # whole: botocore checks it against Content-Length
            if len(data) != resp["ContentLength"]:   # a body cut short: retried, never parsed
                raise ConnectionError(f"{self.where(name)}: got {len(data)} of {resp['ContentLength']} bytes")
            return data, resp["ETag"]
        try:
            data, etag = self.request("GET", get)
        except Exception as e:  # noqa: BLE001 - botocore ClientError
            if _code(e) in _MISSING_CODES:
                return None, None
            raise
        _count(gets=1, get_bytes=len(data))
        return data, etag

    def put_conditional(self, name: str, data: bytes, etag: str | None) -> None:
        """PUT only if the object is still version ``etag`` (absent when None); else
        ``VersionChanged``. S3 and S3-compatible servers with conditional writes."""
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.request("conditional PUT", lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(name),
                                                                        Body=data, **cond))
        except Exception as e:  # noqa: BLE001
            if _code(e) in CONFLICT_CODES:
                raise VersionChanged(f"{self.where(name)} changed meanwhile") from e
            raise
        _count(puts=1, put_bytes=len(data))

    def put_key(self, key: str, data: bytes) -> None:
        self.request("PUT", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))
        _count(puts=1, put_bytes=len(data))

    def delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            self.request("DELETE", lambda: self.client.delete_objects(Bucket=self.bucket, Delete=batch))

    def delete(self, names: list[str]) -> None:
        self.delete_keys([self.key(n) for n in names])

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy: CopyObject up to 5 GiB, UploadPartCopy in parts above (no byte
        goes through this process). A missing source is FileNotFoundError."""
        size = self.size(src)
        if size is None:
            raise FileNotFoundError(self.where(src))
        source = {"Bucket": self.bucket, "Key": self.key(src)}
        if size <= COPY_OBJECT_MAX:
            self.request("CopyObject", lambda: self.client.copy_object(Bucket=self.bucket, Key=self.key(dst),
                                                                        CopySource=source))
            _count(copies=1, copy_bytes=size)
            return
        upload = self.request("CreateMultipartUpload", lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=self.key(dst)))["UploadId"]
        parts = []
        try:
            for number, start in enumerate(range(0, size, COPY_PART_BYTES), 1):
                end = min(size, start + COPY_PART_BYTES) - 1
                resp = self.request("UploadPartCopy", lambda: self.client.upload_part_copy(
                    Bucket=self.bucket, Key=self.key(dst), UploadId=upload, PartNumber=number,
                    CopySource=source, CopySourceRange=f"bytes={start}-{end}"))
                parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            self.request("CompleteMultipartUpload", lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key(dst), UploadId=upload, MultipartUpload={"Parts": parts}))
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key(dst), UploadId=upload)
            except Exception:  # noqa: BLE001 - gc aborts what is left
                pass
            raise
        _count(copies=1, copy_bytes=size)

    def abort_uploads(self, name: str, older_than: float | None = None) -> int:
        """Abort unfinished multipart uploads under ``name`` (invisible, but they cost
        storage); with ``older_than`` only those started before that time."""
        base = self.key(name).rstrip("/")
        base = base + "/" if base else ""
        n = 0
        page = self.request("LIST uploads", lambda: self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=base))
        for up in page.get("Uploads", []):
            if older_than is not None and up["Initiated"].timestamp() > older_than:
                continue
            try:
                self.request("ABORT", lambda: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]))
                n += 1
            except Exception as e:  # noqa: BLE001
                if _code(e) not in _MISSING_CODES:
                    raise
        return n

    def stage(self, final: str, txn: str, owner: tuple[str, int] | None = None) -> S3Staging:
        return S3Staging(self, final, txn)

    def sink(self, name: str) -> "MultipartSink":
        return MultipartSink(self, self.key(name))


class S3Source(Source):
    def __init__(self, store: S3Store, name: str, size: int):
        self.store, self.path, self.size = store, name, size
        self.name = name.rsplit("/", 1)[-1]

    def readinto(self, offset: int, view: memoryview) -> None:
        if offset < 0 or offset + len(view) > self.size:
            raise CorruptCheckpointError(f"{self.name}: bytes {offset}..{offset + len(view)} lie outside "
                                         f"the object ({self.size} bytes)")
        self.store.read_range(self.path, offset, view)


#: The threads that upload parts (PARTS_IN_FLIGHT per file at most).
PART_POOL = WorkerPool(16, "shardckpt-s3-part")


class MultipartSink(Sink):
    """Streams one object as a multipart upload: bytes fill a part buffer; a full part is
    uploaded in the background while the next fills, at most ``PARTS_IN_FLIGHT`` at a time,
    so a file costs at most ``PARTS_IN_FLIGHT + 1`` part buffers of memory whatever its
    size. A file smaller than one part is a single PUT. The xxh3-64 is computed in file order
    as bytes arrive."""

    def __init__(self, store: S3Store, key: str, part_bytes: int = PART_BYTES):
        self.store, self.key, self.part_bytes = store, key, part_bytes
        self.pos = 0
        self.hasher = xxhash.xxh3_64()
        self.buf = bytearray(part_bytes)
        self.fill = 0
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.in_flight: list = []
        self.spare: list[bytearray] = []

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.pos += len(view)
        pos = 0
        while pos < len(view):
            n = min(len(view) - pos, self.part_bytes - self.fill)
            self.buf[self.fill:self.fill + n] = view[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == self.part_bytes:
                self._ship()

    def _ship(self) -> None:
        s = self.store
        if self.upload_id is None:
            self.upload_id = s.request("CreateMultipartUpload", lambda: s.client.create_multipart_upload(
                Bucket=s.bucket, Key=self.key))["UploadId"]
        while len(self.in_flight) >= PARTS_IN_FLIGHT:
            self._reap(block=True)
        number = len(self.parts) + len(self.in_flight) + 1
        body = self.buf if self.fill == len(self.buf) else bytes(memoryview(self.buf)[:self.fill])

        def upload(body=body, number=number):
            resp = s.request("UploadPart", lambda: s.client.upload_part(
                Bucket=s.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body))
            _count(puts=1, put_bytes=len(body))
            return {"PartNumber": number, "ETag": resp["ETag"]}, body
        self.in_flight.append(PART_POOL.submit(upload))
        self.buf = self.spare.pop() if self.spare else bytearray(self.part_bytes)
        self.fill = 0

    def _reap(self, block: bool) -> None:
        first = self.in_flight.pop(0)
        part, body = first.result()
        self.parts.append(part)
        if isinstance(body, bytearray) and len(body) == self.part_bytes and not self.spare:
            self.spare.append(body)

    def finish(self) -> None:
        s = self.store
        if self.upload_id is None:                  # small file: one PUT
            s.put_key(self.key, bytes(memoryview(self.buf)[:self.fill]))
            return
        if self.fill:
            self._ship()
        while self.in_flight:
            self._reap(block=True)
        parts = sorted(self.parts, key=lambda p: p["PartNumber"])
        s.request("CompleteMultipartUpload", lambda: s.client.complete_multipart_upload(
            Bucket=s.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}))
        self.buf = bytearray()
        self.spare.clear()

    def abort(self) -> None:
        for f in self.in_flight:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - aborting anyway
                pass
        self.in_flight.clear()
        if self.upload_id is not None:
            s = self.store
            try:
                s.request("AbortMultipartUpload", lambda: s.client.abort_multipart_upload(
                    Bucket=s.bucket, Key=self.key, UploadId=self.upload_id))
            except Exception:  # noqa: BLE001 - gc aborts what is left
                pass
        self.buf = bytearray()


class S3Staging(VersionedStaging):
    """A version prefix inside the step directory, published by one conditional PUT."""

    store: S3Store

    def write_stream(self, name: str, fill: Callable[[Sink], T]) -> tuple[T, Written]:
        sink = self.store.sink(self.staged_path(name))
        try:
            result = fill(sink)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        return result, Written(self.stored_name(name), sink.pos, sink.hasher.hexdigest())

    def version_token(self) -> str:
        """The manifest's ETag ("" when there is none)."""
        return self.store.etag(f"{self.final}/{MANIFEST}") or ""

    def switch_manifest(self, manifest: bytes, expect: str | None) -> bytes | None:
        """One conditional PUT of the manifest: it replaces exactly the version read just
        before (If-Match its ETag, or If-None-Match when there was none), so the objects
        deleted afterwards are those of the version actually replaced. With ``expect``, a
        version other than that one raises ``VersionChanged``; without it, a publish that
        lost a race to another save reads again and replaces the newer version (the last
        save to publish wins, as on a local disk)."""
        where = self.store.where(self.final)
        for _ in range(PUBLISH_ATTEMPTS):
            raw, etag = self.store.read_with_etag(f"{self.final}/{MANIFEST}", self.manifest_limit())
            if expect is not None and (etag or "") != expect:
                raise VersionChanged(f"{where} was replaced meanwhile")
            try:
                self.store.put_conditional(f"{self.final}/{MANIFEST}", manifest, etag)     # the commit
                return raw
            except VersionChanged:
                if expect is not None:
                    raise
        raise CheckpointError(f"{where}: kept being replaced by other saves while publishing")
