"""Ray executor: writer and reader actors pinned to nodes, writing straight into the store.

Per save the driver puts each shard's host arrays into the object store once (one object
per shard); a writer actor on some node maps them zero-copy and writes the shard into the
save's staging area (a local tmp directory, or multipart uploads to an object store) with
the same ``write_shard`` the thread executor uses, so files are identical whoever wrote them.
Each writer reports its node id, pid and name, which the manifest keeps. By default there
is one writer per alive node (each writing several shards with its own threads); a writer
or node that dies makes the save abort with the writer and node named, and the next save
builds fresh writers.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardckpt.errors import CheckpointError, SaveAbortedError
from shardckpt.executors.base import Executor, ReadJob, run_read_job
from shardckpt.format.shard import MemberToWrite, ReadTarget, ShardPlan, ShardReport, write_shard, writer_identity
from shardckpt.store.base import DEFAULT_SAVE_TIMEOUT
from shardckpt.store.holder import ensure_ray
from shardckpt.workers import run_all

_ACTOR_THREADS = 4


class ShardWriter:
    """Actor body: writes shards into a staging area and reads chunks, on its node, with a
    few threads."""

    def __init__(self, name: str):
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()

    def identity(self) -> dict:
        return writer_identity(writer=self.name, node_id=self.node_id, backend="ray")

    def write(self, staging, files: list[str], metas: list[list[tuple]], *datas, compress: bool,
              delay: float = 0.0) -> list[dict]:
        ident = self.identity()
        if delay:  # fault-injection seam for tests: widens the window in which a writer can die
            time.sleep(delay)

        def one(i):
            members = [MemberToWrite(key, member, tuple(offset), arr)
                       for (key, member, offset), arr in zip(metas[i], datas[i])]
            return write_shard(staging, files[i], members, compress=compress, writer=ident)

        reports = run_all(one, list(range(len(files))), _ACTOR_THREADS)
        return [r.__dict__ for r in reports]

    def read(self, jobs: list[dict], verify: bool) -> list[list[np.ndarray]]:
        """Read each job's targets into fresh arrays and return them (through the object
        store, where the driver maps them without a copy)."""
        built = []
        for j in jobs:
            targets = [ReadTarget(chunk, np.empty(shape, np.dtype(dtype)), sub)
                       for chunk, shape, dtype, sub in j["targets"]]
            built.append(ReadJob(j["store"], j["name"], j["file_name"], j["expected_size"], targets))
        run_all(lambda job: run_read_job(job, verify), built, _ACTOR_THREADS)
        return [[t.dest for t in job.targets] for job in built]


def _alive_nodes() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


class RayExecutor(Executor):
    _instances: dict = {}
    _lock = threading.Lock()

    def __init__(self, num_writers: int | None = None, save_timeout: float | None = None):
        self.requested = num_writers
        self.save_timeout = save_timeout or DEFAULT_SAVE_TIMEOUT
        self._actors: list[tuple[Any, str, str]] = []   # (handle, name, node id)
        self._nodes: tuple = ()
        self.max_inflight_bytes = int(os.environ.get("SHARDCKPT_RAY_INFLIGHT_BYTES", 0))
        self.peak_inflight_bytes = 0
        self.test_write_delay = 0.0   # seconds each writer waits before writing (tests only)

    @classmethod
    def get(cls, num_writers: int | None = None, save_timeout: float | None = None) -> "RayExecutor":
        """A process-wide executor per configuration (actors are reused across saves)."""
        ensure_ray()
        with cls._lock:
            key = (num_writers, save_timeout)
            if key not in cls._instances:
                cls._instances[key] = cls(num_writers, save_timeout)
            return cls._instances[key]

    @classmethod
    def forget_all(cls) -> None:
        """Drop the process-wide executors (after ``ray.shutdown()``: their actors are gone)."""
        with cls._lock:
            cls._instances.clear()

    @property
    def num_workers(self) -> int:
        return max(1, len(self.actors()) * _ACTOR_THREADS // 2)

    # --- actors ---------------------------------------------------------------------------
    def actors(self) -> list[tuple[Any, str, str]]:
        nodes = tuple(sorted(_alive_nodes()))
        if nodes != self._nodes or not self._actors:
            self.reset()
            count = self.requested or len(nodes)
            actor_cls = ray.remote(num_cpus=0, max_restarts=0)(ShardWriter)
            for i in range(count):
                node = nodes[i % len(nodes)]
                name = f"writer-{i}@{node[:8]}"
                handle = actor_cls.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(name)
                self._actors.append((handle, name, node))
            self._nodes = nodes
        return self._actors

    def reset(self) -> None:
        """Drop the writers (after a failure the next save builds fresh ones)."""
        for handle, _, _ in self._actors:
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self._actors, self._nodes = [], ()

    def _gather(self, refs: list, owners: list[tuple[str, str]], deadline: float, what: str) -> list:
        try:
            return ray.get(refs, timeout=max(0.1, deadline - time.time()))
        except ray.exceptions.GetTimeoutError as e:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = [f"{name} on node {node}" for ref, (name, node) in zip(refs, owners) if ref not in ready]
            self.reset()
            raise SaveAbortedError(f"{what}: not finished within the deadline: {', '.join(late)}") from e
        except ray.exceptions.RayError as e:
            bad = []
            for ref, (name, node) in zip(refs, owners):
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    try:
                        ray.get(ref)
                        continue
                    except ray.exceptions.RayError as err:
                        bad.append(f"{name} on node {node} ({type(err).__name__})")
                else:
                    bad.append(f"{name} on node {node} (unfinished)")
            self.reset()
            raise SaveAbortedError(f"{what}: {', '.join(bad) or 'a writer'} failed: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    # --- Executor interface -----------------------------------------------------------------
    def inflight_budget(self, total_bytes: int) -> int:
        """Bytes of host copies the driver keeps in Ray's object store at once while a save
        streams to the writers: a tenth of the state (at least 8 MiB, at most 1 GiB), so a
        save never holds a second copy of the whole state in memory."""
        if self.max_inflight_bytes:
            return self.max_inflight_bytes
        return int(min(1 << 30, max(8 << 20, total_bytes // 10)))

    def shard_bytes_cap(self, total_bytes: int) -> int:
        """Shards small enough that every writer has one in flight within the budget."""
        return max(1 << 20, self.inflight_budget(total_bytes) // max(1, len(self.actors())))

    def write_shards(self, staging, plans: list[ShardPlan], *, compress: bool, progress=None,
                     deadline: float | None = None, writer: dict | None = None) -> list[ShardReport]:
        """Stream the shards to the writers, largest first onto the least busy writer, with at
        most ``inflight_budget`` bytes put into the object store and not yet written (a
        shard's object is dropped as soon as it is written)."""
        if not plans:
            return []
        actors = self.actors()
        deadline = deadline or time.time() + self.save_timeout
        queue = sorted(plans, key=lambda p: -p.nbytes)
        budget = max(self.inflight_budget(sum(p.nbytes for p in plans)), queue[0].nbytes)
        busy = [0] * len(actors)
        given = [0] * len(actors)      # bytes handed to each writer so far: spread the work
        inflight: dict = {}            # ref -> (writer index, plan, object ref of its arrays)
        used = 0
        reports: list[ShardReport] = []
        self.peak_inflight_bytes = 0
        while queue or inflight:
            while queue and (not inflight or used + queue[0].nbytes <= budget):
                plan = queue.pop(0)
                i = min(range(len(actors)), key=lambda j: (busy[j], given[j]))
                given[i] += plan.nbytes
                handle = actors[i][0]
                data = ray.put([m.data for m in plan.members])
                meta = [(m.key, m.member, tuple(m.offset)) for m in plan.members]
                ref = handle.write.remote(staging, [plan.file], [meta], data, compress=compress,
                                          delay=self.test_write_delay)
                inflight[ref] = (i, plan, data)
                busy[i] += 1
                used += plan.nbytes
                self.peak_inflight_bytes = max(self.peak_inflight_bytes, used)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.1, deadline - time.time()))
            if not ready:
                late = sorted({f"{actors[i][1]} on node {actors[i][2]}" for i, _, _ in inflight.values()})
                self.reset()
                raise SaveAbortedError(f"saving {staging.final}: not finished within the deadline: {', '.join(late)}")
            for ref in ready:
                i, plan, data = inflight.pop(ref)
                busy[i] -= 1
                used -= plan.nbytes
                try:
                    reports += [ShardReport(**d) for d in ray.get(ref)]
                except ray.exceptions.RayError as e:
                    name, node = actors[i][1], actors[i][2]
                    self.reset()
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, CheckpointError):
                        raise cause from None
                    raise SaveAbortedError(f"saving {staging.final}: {name} on node {node} failed "
                                           f"({type(e).__name__}): {str(e).splitlines()[0] if str(e) else ''}") from e
                if progress is not None:
                    progress(plan.nbytes)
        return reports

    def read(self, jobs: list[ReadJob], *, verify: bool, progress=None) -> None:
        if not jobs:
            return
        actors = self.actors()
        loads = [0] * len(actors)
        assigned: list[list[ReadJob]] = [[] for _ in actors]
        for job in sorted(jobs, key=lambda j: -j.nbytes):
            i = loads.index(min(loads))
            assigned[i].append(job)
            loads[i] += job.nbytes
        refs, owners, groups = [], [], []
        for (handle, name, node), group in zip(actors, assigned):
            if not group:
                continue
            descs = [{"store": j.store, "name": j.name, "file_name": j.file_name, "expected_size": j.expected_size,
                      "targets": [(t.chunk, t.dest.shape, t.dest.dtype.str, t.sub) for t in j.targets]}
                     for j in group]
            refs.append(handle.read.remote(descs, verify))
            owners.append((name, node))
            groups.append(group)
        try:
            results = self._gather(refs, owners, time.time() + self.save_timeout, f"loading {jobs[0].store.where(jobs[0].name).rsplit('/', 1)[0]}")
        except SaveAbortedError as e:
            cause = e.__cause__
            if isinstance(cause, ray.exceptions.RayTaskError) and isinstance(cause.cause, CheckpointError):
                raise cause.cause from None
            raise CheckpointError(str(e)) from cause
        for group, arrays in zip(groups, results):
            for job, job_arrays in zip(group, arrays):
                for t, arr in zip(job.targets, job_arrays):
                    t.dest[...] = arr
        if progress is not None:
            progress(sum(j.nbytes for j in jobs))
