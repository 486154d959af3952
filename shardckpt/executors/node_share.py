"""Replica-aware restore on Ray: workers on one node read each chunk from storage once.

N data-parallel workers on a node restoring the same replicated state would read it N times
(N x the bytes from the store or the network). Here each node runs one ``NodeChunkCache``
actor (named per node, 0 CPUs, pinned to it). A worker's restore asks its node's cache for
the chunks it needs, file by file; the cache reads each (checkpoint version, file, chunk)
once — concurrent requests for the same chunk wait for that one read — verifies its CRC and
keeps it in Ray's object store. Every worker on the node maps the same bytes zero-copy and
copies only the part its devices need into its own buffers. Entries are dropped when a
newer version of the checkpoint is requested or after ``CACHE_SECONDS`` unused.

Entries are keyed by verification (unverified bytes never reach a ``verify=True``
restore), errors are never cached, every wait is bounded, and a worker whose cache cannot
serve it reads the store directly (#17.1).
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardckpt.errors import CheckpointError
from shardckpt.executors.base import Reader, ReadJob, run_read_job
from shardckpt.format.shard import ChunkRecord, ReadTarget
from shardckpt.store.base import read_stats
from shardckpt.workers import run_all

NAMESPACE = "shardckpt"
CACHE_SECONDS = 120.0
MAX_VERSIONS = 2                # checkpoint versions whose chunks a node keeps at once
FILL_WAIT_SECONDS = 300.0       # a request waits this long for another's read, then reads itself
CALL_SECONDS = 900.0            # a worker waits this long for its node's cache, then reads directly
_ACTOR_THREADS = 8


class _Fill:
    """One read in progress: requests for its chunks wait on ``done``; ``error`` is what the
    read raised (handed to them once, never kept as an entry)."""

    def __init__(self, verified: bool):
        self.verified = verified
        self.done = threading.Event()
        self.error: BaseException | None = None


class NodeChunkCache:
    """Actor body: reads chunks once per node and hands out object references to them.

    An entry is keyed by (version, file, member, offset, verified): bytes read with
    ``verify=False`` serve only unverified restores, a ``verify=True`` restore reads and
    checks them again (and its verified entry then serves both). Only bytes are kept: a read
    that fails releases the requests waiting on it with its error and leaves nothing
    behind, so the next restore reads again (#17.1)."""

    def __init__(self):
        self.entries: dict[tuple, Any] = {}        # (version, file, member, offset, verified) -> ObjectRef
        self.pending: dict[tuple, _Fill] = {}
        self.used: dict[str, float] = {}           # version -> last use
        self.waiting = 0                           # requests waiting for another's read now
        self.lock = threading.Lock()
        # drop idle versions even when no request comes (the bytes live in the object store)
        threading.Thread(target=self._evict_idle, daemon=True, name="chunk-cache-evict").start()

    def _evict_idle(self) -> None:
        while True:
            time.sleep(min(10.0, CACHE_SECONDS / 4))
            self._expire(None)

    def stats(self) -> dict:
        return {**read_stats(), "entries": len(self.entries), "pending": len(self.pending), "waiting": self.waiting}

    def _lookup(self, base: tuple, verify: bool) -> tuple[tuple | None, _Fill | None]:
        """(key of an entry that may serve this request, or a read in flight it may wait
        for); a verified entry or read serves any request, an unverified one only
        ``verify=False`` requests. Called under the lock."""
        for verified in ((True,) if verify else (True, False)):
            key = base + (verified,)
            if key in self.entries:
                return key, None
            if key in self.pending:
                return key, self.pending[key]
        return None, None

    def chunks(self, version: str, store, name: str, file_name: str, expected_size: int,
               wanted: list[tuple[ChunkRecord, str]], verify: bool) -> list:
        """``[refs]``: an object reference per ``wanted`` chunk (each a (chunk, stored
        dtype)) of one file, read from ``store`` only by the first request for each; None
        where waiting for another request's read timed out (the caller reads it itself).
        The error of a failed read is raised to every request that waited for it."""
        self._expire(version)
        mine, waits, out_keys = [], [], []
        with self.lock:
            for chunk, dtype in wanted:
                base = (version, file_name, chunk.member, chunk.offset)
                key, fill = self._lookup(base, verify)
                if key is None:
                    key, fill = base + (bool(verify),), _Fill(bool(verify))
                    self.pending[key] = fill
                    mine.append((key, chunk, dtype, fill))
                elif fill is not None:
                    waits.append(fill)
                out_keys.append(key)
        if mine:
            self._read(store, name, file_name, expected_size, mine, verify)
        deadline = time.time() + FILL_WAIT_SECONDS
        with self.lock:
            self.waiting += bool(waits)
        try:
            for fill in {id(f): f for f in waits + [m[3] for m in mine]}.values():
                fill.done.wait(max(0.0, deadline - time.time()))
                if fill.error is not None and not (fill.verified and not verify):
                    raise _fresh(fill.error)    # (a check this request did not ask for: it reads itself)
        finally:
            with self.lock:
                self.waiting -= bool(waits)
        with self.lock:
            refs = [self.entries.get(key) for key in out_keys]
        return [refs]          # a list around the refs: Ray hands them over, not their values

    def _read(self, store, name, file_name, expected_size, mine, verify) -> None:
        """Read ``mine`` (this request's share); whatever happens, every one of their fills
        is released (with the error if the read failed) and none stays pending."""
        refs: dict[tuple, Any] = {}
        error: BaseException | None = None
        try:
            targets = [ReadTarget(chunk, np.empty(chunk.shape, np.dtype(dtype))) for _, chunk, dtype, _ in mine]
            run_read_job(ReadJob(store, name, file_name, expected_size, targets), verify)
            for (key, _, _, _), t in zip(mine, targets):
                refs[key] = ray.put(t.dest)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter, then raised
            error = e
        finally:
            with self.lock:
                if error is None:
                    self.entries.update(refs)
                    self.used[mine[0][0][0]] = time.time()
                for key, _, _, fill in mine:
                    self.pending.pop(key, None)
                    fill.error = error
                    fill.done.set()

    def _expire(self, version: str | None) -> None:
        now = time.time()
        with self.lock:
            if version is not None:
                self.used[version] = now
            stale = {v for v, t in self.used.items() if now - t > CACHE_SECONDS}
            recent = sorted((v for v in self.used if v not in stale), key=self.used.get)
            stale |= set(recent[:-MAX_VERSIONS])          # the least recently used beyond the limit
            if stale:
                self.entries = {k: r for k, r in self.entries.items() if k[0] not in stale}
                for v in stale:
                    self.used.pop(v, None)


def _fresh(e: BaseException) -> BaseException:
    """A copy of ``e`` for one request to raise (one exception object raised by several
    threads at once would collect all their tracebacks)."""
    try:
        c = copy.copy(e)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied
        return e
    c.__traceback__ = None
    return c


def _cache_on_this_node():
    """The node's NodeChunkCache actor, created on first use."""
    node = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0, max_concurrency=64)(NodeChunkCache)
    return actor_cls.options(name=f"shardckpt-chunk-cache-{node[:16]}", namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class NodeSharedReader(Reader):
    """Reads through this node's chunk cache (see module doc); a Reader only.

    The cache is an optimisation, never a new way to fail: where it cannot serve a file (its
    actor died or cannot be reached, an object it held was lost, it failed with anything but
    one of our errors, it timed out), that file is read from the store directly, as the
    thread executor would (#17.1). Our own errors (a damaged or missing shard) are raised as
    they are, never wrapped in Ray's."""

    def __init__(self, num_workers: int = 4):
        self.num_workers = num_workers

    def read(self, jobs: list[ReadJob], *, verify: bool, progress=None) -> None:
        if not jobs:
            return
        try:
            cache = _cache_on_this_node()
        except ray.exceptions.RayError:
            cache = None
        version = jobs[0].version or _version_of(jobs)

        def one(job: ReadJob) -> None:
            arrays = None if cache is None else _through_cache(cache, version, job, verify)
            if arrays is None:
                run_read_job(job, verify, progress)
                return
            for t, src in zip(job.targets, arrays):
                t.dest[...] = src[t.sub] if t.sub is not None else src
                if progress is not None:
                    progress(t.dest.nbytes)

        run_all(one, jobs, self.num_workers)


def _through_cache(cache, version: str, job: ReadJob, verify: bool) -> list | None:
    """The source array of each of ``job``'s targets from the node's cache; None when the
    cache cannot serve this file (then it is read directly)."""
    wanted, seen = [], {}
    for t in job.targets:
        k = (t.chunk.member, t.chunk.offset)
        if k not in seen:
            seen[k] = len(wanted)
            wanted.append((t.chunk, t.dest.dtype.str))
    try:
        refs = ray.get(cache.chunks.remote(version, job.store, job.name, job.file_name, job.expected_size,
                                           wanted, verify), timeout=CALL_SECONDS)[0]
        if any(r is None for r in refs):
            return None                   # another request's read took too long: read it here
        arrays = ray.get(refs, timeout=CALL_SECONDS)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, CheckpointError):
            raise e.cause from None
        return None                       # the cache's read failed otherwise (an OSError): read here
    except ray.exceptions.RayError:
        return None                       # actor died or unreachable, object lost, timed out
    return [arrays[seen[(t.chunk.member, t.chunk.offset)]] for t in job.targets]


def _version_of(jobs: list[ReadJob]) -> str:
    """Jobs without a version (not from ``Checkpoint``): their files' names and sizes and
    their chunks' CRCs stand for it."""
    h = hashlib.sha1()
    for j in sorted(jobs, key=lambda j: j.name):
        h.update(f"{j.store.where(j.name)}:{j.expected_size}".encode())
        for t in j.targets:
            h.update(t.chunk.crc32.to_bytes(4, "little"))
    return h.hexdigest()
