"""Checkpoints on object stores and other remote filesystems (``s3://``, ``gs://``, any
pyarrow filesystem).

Object stores have no rename, so a remote checkpoint commits by writing its manifest last,
in one PUT. Every save writes its files under a fresh version prefix inside the step
directory and the manifest names them there::

    s3://bucket/run/step_100/manifest.json          <- the commit record (one PUT, last)
    s3://bucket/run/step_100/v3f9c2a1b/model-00000-of-00002.npz
    s3://bucket/run/step_100/v3f9c2a1b/config.json  ...

so re-saving a step uploads the new version beside the old one, switches the manifest, and
only then deletes the old version's objects: the old checkpoint stays whole until the new
one exists. Shards are written to a local staging directory with the normal writer and
uploaded in parallel; loads fetch only the byte ranges of the chunks a target needs.
URIs are resolved by ``pyarrow.fs.FileSystem.from_uri`` (for a local S3-compatible server:
``s3://bucket/dir?endpoint_override=127.0.0.1:9000&scheme=http``); pass ``filesystem=`` to
use an explicit pyarrow (or fsspec-wrapped) filesystem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format import MANIFEST, Manifest

UPLOAD_BLOCK = 16 << 20
IO_THREADS = 8          # remote I/O is latency-bound: more requests in flight than cores


def is_remote(path: Any) -> bool:
    """A URI with a scheme other than ``file``."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return urlsplit(path).scheme not in ("", "file")


class RemoteStore:
    """The few operations a checkpoint needs from a remote store; names are relative to
    the store's root ("step_7/manifest.json")."""

    base_uri: str
    uri: str

    def child(self, name: str) -> "RemoteStore":
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def read(self, name: str, limit: int) -> bytes:
        raise NotImplementedError

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Fetch one byte range straight into ``view`` (one ranged GET)."""
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        """One object in one PUT: how a manifest commits."""
        raise NotImplementedError

    def upload(self, local: Path, name: str) -> None:
        raise NotImplementedError

    def list(self) -> list[tuple[str, bool]]:
        """(name, is_directory) of the entries directly under the root."""
        raise NotImplementedError

    def delete(self, names: list[str]) -> None:
        raise NotImplementedError

    def delete_tree(self) -> None:
        raise NotImplementedError


def open_store(uri: str, filesystem: Any = None) -> RemoteStore:
    """S3 through boto3 (the reference client; endpoint from ``?endpoint_url=`` or
    ``AWS_ENDPOINT_URL``), anything else through a pyarrow filesystem."""
    if filesystem is None and urlsplit(uri).scheme in ("s3", "s3a"):
        return S3Store(uri)
    return ArrowStore(uri, filesystem)


class S3Store(RemoteStore):
    def __init__(self, uri: str, client: Any = None, bucket: str | None = None, prefix: str | None = None):
        parts = urlsplit(uri)
        self.uri = uri.rstrip("/")
        self.base_uri = self.uri.split("?", 1)[0]
        if client is None:
            try:
                import boto3
            except ImportError as e:
                raise CheckpointError("s3:// paths need boto3: pip install 'shardckpt[s3]'") from e
            from urllib.parse import parse_qs
            q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            client = boto3.client("s3", endpoint_url=q.get("endpoint_url"), region_name=q.get("region"))
        self.client = client
        self.bucket = bucket if bucket is not None else parts.netloc
        self.prefix = (prefix if prefix is not None else parts.path.strip("/"))
        if not self.bucket:
            raise CheckpointError(f"{uri}: no bucket in the URI")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> "S3Store":
        query = self.uri[len(self.base_uri):]
        return S3Store(f"{self.base_uri}/{name}{query}", self.client, self.bucket, self._key(name))

    def _missing(self, e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def size(self, name: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"]
        except Exception as e:  # noqa: BLE001 - botocore ClientError
            if self._missing(e):
                return None
            raise

    def read(self, name: str, limit: int) -> bytes:
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self._key(name))
        if size > limit:
            raise CorruptCheckpointError(f"{self.base_uri}: {name} is {size} bytes, over the {limit} limit")
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read(limit + 1)[:limit]

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(name),
                                      Range=f"bytes={offset}-{offset + len(view) - 1}")["Body"]
        pos = 0
        while pos < len(view):
            block = body.read(min(UPLOAD_BLOCK, len(view) - pos))
            if not block:
                raise CorruptCheckpointError(f"{self.base_uri}: {name} is truncated at byte {offset + pos}")
            view[pos:pos + len(block)] = block
            pos += len(block)

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def upload(self, local: Path, name: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(name))

    def list(self) -> list[tuple[str, bool]]:
        out = []
        prefix = self._key("") if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            out += [(p["Prefix"][len(prefix):].rstrip("/"), True) for p in page.get("CommonPrefixes", [])]
            out += [(o["Key"][len(prefix):], False) for o in page.get("Contents", [])]
        return out

    def delete(self, names: list[str]) -> None:
        keys = [self._key(n) for n in names]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def delete_tree(self) -> None:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key("")):
            keys += [o["Key"] for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


class ArrowStore(RemoteStore):
    """Any pyarrow filesystem (gs://, hdfs://, or fsspec wrapped in pyarrow.fs.PyFileSystem)."""

    def __init__(self, uri: str, filesystem: Any = None):
        import pyarrow.fs as pafs
        self.uri = uri.rstrip("/")
        parts = urlsplit(self.uri)
        self.base_uri = self.uri.split("?", 1)[0]
        if filesystem is not None:
            self.fs, self.root = filesystem, (parts.netloc + parts.path)
        else:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types
                raise CheckpointError(f"{self.base_uri}: cannot open remote filesystem ({e})") from e
        self.root = self.root.rstrip("/")

    def child(self, name: str) -> "ArrowStore":
        store = ArrowStore.__new__(ArrowStore)
        store.fs, store.root = self.fs, f"{self.root}/{name}"
        store.base_uri = f"{self.base_uri}/{name}"
        store.uri = store.base_uri + self.uri[len(self.base_uri):]
        return store

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def size(self, name: str) -> int | None:
        import pyarrow.fs as pafs
        info = self.fs.get_file_info(self._path(name))
        return None if info.type == pafs.FileType.NotFound else info.size

    def read(self, name: str, limit: int) -> bytes:
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self._path(name))
        if size > limit:
            raise CorruptCheckpointError(f"{self.base_uri}: {name} is {size} bytes, over the {limit} limit")
        with self.fs.open_input_file(self._path(name)) as f:
            return f.read()

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        with self.fs.open_input_file(self._path(name)) as f:
            got = f.read_at(len(view), offset)
        if len(got) != len(view):
            raise CorruptCheckpointError(f"{self.base_uri}: {name} is truncated at byte {offset + len(got)}")
        view[:] = memoryview(got)

    def put(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._path(name)) as out:
            out.write(data)

    def upload(self, local: Path, name: str) -> None:
        with open(local, "rb") as src, self.fs.open_output_stream(self._path(name)) as out:
            while block := src.read(UPLOAD_BLOCK):
                out.write(block)

    def list(self) -> list[tuple[str, bool]]:
        import pyarrow.fs as pafs
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                self.fs.delete_file(self._path(name))
            except FileNotFoundError:
                pass

    def delete_tree(self) -> None:
        try:
            self.fs.delete_dir(self.root)
        except FileNotFoundError:
            pass


def _parallel(fn, items) -> None:
    if not items:
        return
    with ThreadPoolExecutor(min(IO_THREADS, len(items)), thread_name_prefix="shardckpt-remote") as pool:
        for f in [pool.submit(fn, x) for x in items]:
            f.result()


def remote_checkpoint(uri: str, filesystem: Any = None) -> "RemoteCheckpoint | None":
    """The committed checkpoint at ``uri``, or None when nothing is committed there."""
    store = open_store(uri, filesystem)
    if store.size(MANIFEST) is None:
        return None
    return RemoteCheckpoint(store)


def save_remote(uri: str, entries, records, *, step, json_files, metrics, num_shards, compress,
                progress, keep_other_items, filesystem: Any = None) -> str:
    """Stage the shards locally with the normal writer, upload them and the metadata in
    parallel under a new version prefix, PUT the manifest last, then drop the objects of
    the version it replaced."""
    from .checkpoint import as_save_error, commit_parts, write_part
    from .executors.local import ThreadExecutor

    store = open_store(uri, filesystem)
    previous = remote_checkpoint(uri, filesystem)
    version = f"v{uuid.uuid4().hex[:8]}/"
    staging = Path(tempfile.mkdtemp(prefix="shardckpt-stage-", dir=os.environ.get("SHARDCKPT_STAGING")))
    tmp = staging / "ckpt"
    tmp.mkdir()
    try:
        part = write_part(tmp, entries, records, ThreadExecutor(), num_shards=num_shards, compress=compress,
                          progress=progress)

        def publish(tmp_dir: Path, _final) -> None:
            names = [n for n in os.listdir(tmp_dir) if n != MANIFEST]
            _parallel(lambda n: store.upload(tmp_dir / n, version + n), names)
            store.put(MANIFEST, (tmp_dir / MANIFEST).read_bytes())      # the commit

        commit_parts(Path(store.base_uri.split("://", 1)[-1]), tmp, [part], step=step, json_files=json_files, metrics=metrics,
                     keep_other_items=keep_other_items, name_prefix=version, publish=publish,
                     previous=previous)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        _drop_version(store, version)
        raise as_save_error(e, Path(store.base_uri)) from e
    shutil.rmtree(staging, ignore_errors=True)
    if previous is not None:
        now = Manifest.loads(store.read(MANIFEST, 256 << 20), store.base_uri)
        keep = set(now.files) | set(now.meta_files)
        stale = [n for n in list(previous.manifest.files) + list(previous.manifest.meta_files) if n not in keep]
        store.delete(stale)
    return store.uri


def _drop_version(store: RemoteStore, version: str) -> None:
    try:
        store.child(version.rstrip("/")).delete_tree()
    except Exception:  # noqa: BLE001 - best effort: an unreferenced version is invisible
        pass


def delete_remote_checkpoint(store: RemoteStore) -> None:
    """Manifest first (the checkpoint stops existing at once), then everything else."""
    store.delete([MANIFEST])
    store.delete_tree()


def list_remote_steps(store: RemoteStore, pattern) -> list[tuple[int, str]]:
    out = []
    for name, is_dir in store.list():
        m = pattern.match(name)
        if m and is_dir:
            out.append((int(m.group(1)), name))
    return sorted(out)


from .checkpoint import Checkpoint, _chunk_target  # noqa: E402  (cycle: checkpoint imports us lazily)


class RemoteCheckpoint(Checkpoint):
    """A committed checkpoint on a remote filesystem, read with ranged GETs."""

    def __init__(self, store: RemoteStore | str, filesystem: Any = None):
        self.store = store if isinstance(store, RemoteStore) else open_store(store, filesystem)
        self.path = Path(self.store.base_uri.split("://", 1)[-1])
        self.where = self.store.base_uri
        self._open()

    def _open(self) -> None:
        try:
            raw = self.store.read(MANIFEST, 256 << 20)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{self.where}: no {MANIFEST}; not a committed checkpoint") from e
        self.manifest = Manifest.loads(raw, self.where)
        self._index = None

    def _read_meta(self, name: str, limit: int) -> bytes:
        import xxhash
        from .format import check_file_name
        check_file_name(name, self.where)
        rec = self.manifest.meta_files.get(name)
        if rec is None:
            raise CorruptCheckpointError(f"{self.where}: {name} is not listed in the manifest")
        try:
            raw = self.store.read(name, limit)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{self.where}: {name} is missing") from e
        if len(raw) != rec.size or xxhash.xxh3_64(raw).hexdigest() != rec.xxh3_64:
            raise CorruptCheckpointError(f"{self.where}: {name} does not match its checksum in the manifest")
        return raw

    def _check_file_sizes(self, names: set[str], *, must_exist: bool) -> None:
        def check(name):
            size = self.store.size(name)
            if size is None:
                raise CorruptCheckpointError(f"{self.where}: shard file {name} is missing")
            if size != self.manifest.files[name].size:
                raise CorruptCheckpointError(f"{self.where}: {name} is {size} bytes, the manifest "
                                             f"says {self.manifest.files[name].size}")
        _parallel(check, sorted(names))

    def _read_boxes(self, item, specs, requests, verify, executor, progress):
        """Fetch only the chunks each requested box overlaps, each with one ranged GET."""
        from .checkpoint import aligned_empty
        from .shard_io import crc32, read_compressed_chunk
        if not specs:
            return {}
        index = self.index()[item]
        self._check_file_sizes({f for key in specs for f, _ in index[key]}, must_exist=True)
        out, work = {}, []
        for key, spec in specs.items():
            dtype = np.dtype(spec.stored_dtype)
            out[key] = {}
            for box in requests[key]:
                dest = aligned_empty(box[1], dtype)
                out[key][box] = dest
                for fname, chunk in index[key]:
                    target = _chunk_target(chunk, dest, box)
                    if target is not None:
                        work.append((fname, target))

        def fetch(job):
            fname, t = job
            c = t.chunk
            if c.data_offset is None:          # compressed member: fetch the file once
                with tempfile.NamedTemporaryFile() as f:
                    f.write(self.store.read(fname, 1 << 40))
                    f.flush()
                    buf = np.empty(c.shape, t.dest.dtype)
                    read_compressed_chunk(f.name, fname, c, buf, verify=verify)
            elif t.sub is None:
                view = memoryview(t.dest).cast("B") if t.dest.nbytes else memoryview(bytearray())
                if c.nbytes:
                    self.store.read_into(fname, c.data_offset, view)
                if verify and crc32(view) != c.crc32:
                    raise CorruptCheckpointError(f"{self.where}: checksum mismatch in {fname} chunk of {c.key!r}")
                return
            else:
                raw = bytearray(c.nbytes)
                if c.nbytes:
                    self.store.read_into(fname, c.data_offset, memoryview(raw))
                if verify and crc32(raw) != c.crc32:
                    raise CorruptCheckpointError(f"{self.where}: checksum mismatch in {fname} chunk of {c.key!r}")
                buf = np.frombuffer(raw, t.dest.dtype).reshape(c.shape)
            t.dest[...] = buf[t.sub] if t.sub is not None else buf

        _parallel(fetch, work)
        self.last_read = (len(work), sum(t.dest.nbytes for _, t in work))
        return out
