"""Replica-aware restore on Ray: workers on one node read each chunk from storage once.

N data-parallel workers on a node restoring the same replicated state would read it N times
(N x the bytes from the store or the network). Here each node runs one ``NodeChunkCache``
actor (named per node, 0 CPUs, pinned to it). A worker's restore asks its node's cache for
the chunks it needs, file by file; the cache reads each (checkpoint version, file, chunk)
once — concurrent requests for the same chunk wait for that one read — verifies its CRC and
keeps it in Ray's object store. Every worker on the node maps the same bytes zero-copy and
copies only the part its devices need into its own buffers. Entries are dropped when a
newer version of the checkpoint is requested or after ``CACHE_SECONDS`` unused.
"""

from __future__ import annotations

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
_ACTOR_THREADS = 8


class NodeChunkCache:
    """Actor body: reads chunks once per node and hands out object references to them."""

    def __init__(self):
        self.entries: dict[tuple, Any] = {}        # (version, file, chunk) -> ObjectRef | Exception
        self.pending: dict[tuple, threading.Event] = {}
        self.used: dict[str, float] = {}           # version -> last use
        self.lock = threading.Lock()
        # drop idle versions even when no request comes (the bytes live in the object store)
        threading.Thread(target=self._evict_idle, daemon=True, name="chunk-cache-evict").start()

    def _evict_idle(self) -> None:
        while True:
            time.sleep(min(10.0, CACHE_SECONDS / 4))
            self._expire(None)

    def stats(self) -> dict:
        return {**read_stats(), "entries": len(self.entries)}

    def chunks(self, version: str, store, name: str, file_name: str, expected_size: int,
               wanted: list[tuple[ChunkRecord, str]], verify: bool) -> list:
        """Object references of ``wanted`` chunks (each a (chunk, stored dtype)) of one file,
        read from ``store`` only by the first request for each."""
        self._expire(version)
        mine, waits, out_keys = [], [], []
        with self.lock:
            for chunk, dtype in wanted:
                key = (version, file_name, chunk.member, chunk.offset)
                out_keys.append(key)
                if key in self.entries:
                    continue
                if key in self.pending:
                    waits.append(self.pending[key])
                else:
                    self.pending[key] = threading.Event()
                    mine.append((key, chunk, dtype))
        if mine:
            self._read(store, name, file_name, expected_size, mine, verify)
        for ev in waits:
            ev.wait(600)
        refs = []
        for key in out_keys:
            value = self.entries.get(key)
            if isinstance(value, BaseException):
                raise value
            if value is None:
                raise CheckpointError(f"{file_name}: chunk {key[2]} was not read (the read timed out)")
            refs.append(value)
        return [refs]          # a list around the refs: Ray hands them over, not their values

    def _read(self, store, name, file_name, expected_size, mine, verify) -> None:
        results: dict[tuple, Any] = {}
        try:
            targets = [ReadTarget(chunk, np.empty(chunk.shape, np.dtype(dtype))) for _, chunk, dtype in mine]
            run_read_job(ReadJob(store, name, file_name, expected_size, targets), verify)
            for (key, _, _), t in zip(mine, targets):
                results[key] = ray.put(t.dest)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            results.update({key: e for key, _, _ in mine if key not in results})
        with self.lock:
            for key, _, _ in mine:
                self.entries[key] = results[key]
                self.pending.pop(key).set()

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


def _cache_on_this_node():
    """The node's NodeChunkCache actor, created on first use."""
    node = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0, max_concurrency=64)(NodeChunkCache)
    return actor_cls.options(name=f"shardckpt-chunk-cache-{node[:16]}", namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class NodeSharedReader(Reader):
    """Reads through this node's chunk cache (see module doc); a Reader only."""

    def __init__(self, num_workers: int = 4):
        self.num_workers = num_workers

    def read(self, jobs: list[ReadJob], *, verify: bool, progress=None) -> None:
        if not jobs:
            return
        cache = _cache_on_this_node()
        version = jobs[0].version or _version_of(jobs)

        def one(job: ReadJob) -> None:
            wanted, seen = [], {}
            for t in job.targets:
                k = (t.chunk.member, t.chunk.offset)
                if k not in seen:
                    seen[k] = len(wanted)
                    wanted.append((t.chunk, t.dest.dtype.str))
            try:
                refs = ray.get(cache.chunks.remote(version, job.store, job.name, job.file_name, job.expected_size,
                                                   wanted, verify))[0]
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, CheckpointError):
                    raise e.cause from None
                raise
            arrays = ray.get(refs)
            for t in job.targets:
                src = arrays[seen[(t.chunk.member, t.chunk.offset)]]
                t.dest[...] = src[t.sub] if t.sub is not None else src
                if progress is not None:
                    progress(t.dest.nbytes)

        run_all(one, jobs, self.num_workers)


def _version_of(jobs: list[ReadJob]) -> str:
    """Jobs without a version (not from ``Checkpoint``): their files' names and sizes and
    their chunks' CRCs stand for it."""
    h = hashlib.sha1()
    for j in sorted(jobs, key=lambda j: j.name):
        h.update(f"{j.store.where(j.name)}:{j.expected_size}".encode())
        for t in j.targets:
            h.update(t.chunk.crc32.to_bytes(4, "little"))
    return h.hexdigest()
