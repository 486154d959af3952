"""Test hooks: what the tests need of the package that production code must not carry.

- ``FaultPlan`` / ``Fault``: make the local store's POSIX operations fail as a failing disk
  would (ENOSPC, EIO, a failed fsync or rename), through ``FaultyPosix``, the ``Posix`` that
  local stores commit through while a plan is active;
- ``dump_index_v1``: the chunk index layout shardckpt wrote before version 2, so tests can
  prove that readers still read it;
- ``MemoryStore``: a Store held in this process's memory (``memory://``), for contract tests;
- ``save_items``: write any items and metadata files as one checkpoint;
- ``read_stats``: bytes and reads this process took from stores.

Nothing in the package imports this module.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from shardckpt.api.core import save_checkpoint
from shardckpt.api.session import SaveOptions
from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.manifest import MANIFEST
from shardckpt.format.shard import ChunkRecord
from shardckpt.store.base import Entry, Sink, Source, T, Written, count_read, read_stats
from shardckpt.store.local import LocalStore
from shardckpt.store.posix import POSIX, Posix
from shardckpt.store.registry import register_store
from shardckpt.store.versioned import VersionedStaging, VersionedStore

__all__ = ["Fault", "FaultPlan", "FaultyPosix", "MemoryStore", "dump_index_v1", "read_stats", "save_items"]


@dataclass
class Fault:
    """One injected failure: the ``after``+1-th to ``after``+``times``-th calls of ``point``
    on a path whose name matches ``match`` (fnmatch) fail with ``OSError(errno)``.

    Points: ``"write"`` (a data write into a shard or metadata file), ``"fsync"`` (of a file
    or a directory), ``"rename"`` (publishing or retiring a checkpoint directory; the name
    matched is the checkpoint's final name), ``"exchange"`` (``renameat2`` exchange; EINVAL
    makes the store publish as on a filesystem without it) and ``"remove"`` (deleting a
    directory tree).
    """

    point: str
    match: str = "*"
    errno: int = errno.EIO
    after: int = 0
    times: int = 1


class FaultPlan:
    """Makes named storage operations of every local store fail as a failing disk would,
    while the plan is active (one at a time)::

        with FaultPlan(Fault("fsync", "manifest.json")) as plan:
            ...                      # the manifest's fsync raises EIO
        assert plan.fired
    """

    def __init__(self, *faults: Fault):
        self.faults = list(faults)
        self.seen: dict[int, int] = {}
        self.fired: list[tuple[str, str, int]] = []   # (point, path, errno) of each injected failure
        self.calls: list[tuple[str, str]] = []        # every (point, path) consulted
        self.lock = threading.Lock()

    def check(self, point: str, path) -> None:
        name = os.path.basename(os.fspath(path))
        with self.lock:
            self.calls.append((point, os.fspath(path)))
            for i, f in enumerate(self.faults):
                if f.point != point or not fnmatch.fnmatchcase(name, f.match):
                    continue
                n = self.seen.get(i, 0)
                self.seen[i] = n + 1
                if f.after <= n < f.after + f.times:
                    self.fired.append((point, os.fspath(path), f.errno))
                    raise OSError(f.errno, f"{os.strerror(f.errno)} (injected at {point})", os.fspath(path))

    def __enter__(self) -> FaultPlan:
        if LocalStore.default_posix is not POSIX:
            raise RuntimeError("another FaultPlan is active")
        LocalStore.default_posix = FaultyPosix(self)
        return self

    def __exit__(self, *exc) -> None:
        LocalStore.default_posix = POSIX


class FaultyPosix(Posix):
    """The POSIX operations, failing where ``plan`` says."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan

    def check(self, point: str, path) -> None:
        self.plan.check(point, path)


def dump_index_v1(chunks_by_item: dict[str, dict[str, list[tuple[str, ChunkRecord]]]]) -> bytes:
    """The version-1 layout (one row per chunk) that shardckpt wrote before version 2: for
    tests and tools; ``load_index`` reads both."""
    files: dict[str, int] = {}
    items: dict[str, dict[str, list]] = {}
    for item, by_key in chunks_by_item.items():
        out = items.setdefault(item, {})
        for key, rows in by_key.items():
            out[key] = [[files.setdefault(f, len(files)), c.member, list(c.offset), list(c.shape),
                         -1 if c.data_offset is None else c.data_offset, c.nbytes, c.crc32] for f, c in rows]
    return msgpack.packb({"version": 1, "files": list(files), "items": items}, use_bin_type=True)


def save_items(path: Any, items: dict[str, Any], *, step: int | None = None, json_files: dict | None = None,
               metrics: dict | None = None, keep_other_items: bool = False, executor: Any = None,
               filesystem: Any = None, prepared: tuple | None = None, **options: Any) -> Any:
    """Write ``items`` (name -> pytree) and the metadata files ``json_files`` (name -> JSON
    value) as one committed checkpoint, as the API's functions do underneath: for tests that
    build checkpoints the public functions would not write as such (any item names, a
    ``config.json`` of their choosing, an Executor of their own). ``options`` are
    ``SaveOptions`` fields (``num_shards``, ``compress``, ``backend``...)."""
    if executor is not None:
        options["backend"] = executor
    return save_checkpoint(path, items, SaveOptions(**options), step=step, json_files=json_files,
                           metrics=metrics, keep_other_items=keep_other_items, prepared=prepared,
                           filesystem=filesystem)


# --- an in-memory store -----------------------------------------------------------------------

class MemorySink(Sink):
    def __init__(self):
        self.buf, self.pos, self.hasher = bytearray(), 0, xxhash.xxh3_64()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.buf += view
        self.pos += len(view)


class MemorySource(Source):
    def __init__(self, data: bytes, name: str):
        self.data, self.size, self.name = data, len(data), name.rsplit("/", 1)[-1]

    def readinto(self, offset: int, view: memoryview) -> None:
        if offset < 0 or offset + len(view) > self.size:
            raise CorruptCheckpointError(f"{self.name}: bytes {offset}..{offset + len(view)} lie outside "
                                         f"the object ({self.size} bytes)")
        view[:] = self.data[offset:offset + len(view)]
        count_read(len(view))


class MemoryStore(VersionedStore):
    """A store held in this process's memory (``memory://NAME/prefix``; stores of one NAME
    share their objects), laid out like an object store (``versioned.py``): the cheapest
    Store that keeps the whole contract, for contract tests. Registered with the store
    registry when this module is imported."""

    buckets: dict[str, dict[str, bytes]] = {}
    lock = threading.Lock()

    def __init__(self, uri: str):
        bucket, _, prefix = uri[len("memory://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"memory://{self.bucket}/{self.prefix}".rstrip("/")
        self.deadline = None
        with MemoryStore.lock:
            self.objects = MemoryStore.buckets.setdefault(self.bucket, {})

    @classmethod
    def claims(cls, uri: str) -> bool:
        return uri.startswith("memory://")

    def key(self, name: str) -> str:
        return "/".join(p for p in (self.prefix, name) if p)

    def read_bytes(self, name: str, limit: int) -> bytes:
        data = self.objects.get(self.key(name))
        if data is None:
            raise FileNotFoundError(self.where(name))
        if len(data) > limit:
            raise CorruptCheckpointError(f"{self.where(name)} is {len(data)} bytes, over the {limit} limit")
        return data

    def open(self, name: str) -> Source:
        return MemorySource(self.read_bytes(name, 1 << 62), name)

    def size(self, name: str) -> int | None:
        data = self.objects.get(self.key(name))
        return None if data is None else len(data)

    def list(self, prefix: str = "") -> list[Entry]:
        base = self.key(prefix)
        base = base + "/" if base else ""
        dirs, files = set(), []
        with MemoryStore.lock:
            items = list(self.objects.items())
        for k, v in items:
            if not k.startswith(base):
                continue
            rest = k[len(base):]
            if "/" in rest:
                dirs.add(rest.split("/", 1)[0])
            else:
                files.append(Entry(rest, False, len(v)))
        return [Entry(d, True) for d in sorted(dirs)] + sorted(files, key=lambda e: e.name)

    def put(self, name: str, data: bytes) -> None:
        with MemoryStore.lock:
            self.objects[self.key(name)] = bytes(data)

    def copy(self, src: str, dst: str) -> None:
        with MemoryStore.lock:
            data = self.objects.get(self.key(src))
            if data is None:
                raise FileNotFoundError(self.where(src))
            self.objects[self.key(dst)] = data

    def delete(self, names: list[str]) -> None:
        with MemoryStore.lock:
            for n in names:
                self.objects.pop(self.key(n), None)

    def stage(self, final: str, txn: str, owner: tuple[str, int] | None = None) -> MemoryStaging:
        return MemoryStaging(self, final, txn)


class MemoryStaging(VersionedStaging):
    """Staged objects under the version prefix; the manifest switched in one assignment."""

    store: MemoryStore

    def write_stream(self, name: str, fill: Callable[[Sink], T]) -> tuple[T, Written]:
        sink = MemorySink()
        result = fill(sink)
        self.store.put(self.staged_path(name), bytes(sink.buf))
        return result, Written(self.stored_name(name), sink.pos, sink.hasher.hexdigest())

    def switch_manifest(self, manifest: bytes, expect: Any) -> bytes | None:
        key = self.store.key(f"{self.final}/{MANIFEST}")
        with MemoryStore.lock:
            previous = self.store.objects.get(key)
            self.store.objects[key] = bytes(manifest)
        return previous


register_store(MemoryStore)
