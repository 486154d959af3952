"""The save coordinator: one Ray actor per checkpoint directory owning save transactions.

A transaction has an id, a tmp directory, the number of participants expected, and a
deadline. Participants (the driver of a single-controller save, or every rank of a
multi-controller one) ``begin`` to get the tmp directory, write their shards, and ``report``
their PartReport. When all have reported the coordinator commits (index, manifest last,
atomic rename) and every ``wait`` returns the path; on a failure, an ``abort`` or the
deadline it removes the tmp directory and every ``wait`` raises. Transactions on one
directory run one at a time, from any number of processes.

The actor keeps nothing that storage does not: a new coordinator (after a crash) removes
in-progress directories whose owner is dead and starts afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE = "shardckpt"
DEFAULT_SAVE_TIMEOUT = 600.0
WATCH_SECONDS = 2.0        # how often an open multi-participant save checks its participants
LIVENESS_TIMEOUT = 5.0


@dataclass
class _Txn:
    id: str
    final: str
    tmp: str
    participants: int
    deadline: float
    claimed: set = field(default_factory=set)
    owners: dict = field(default_factory=dict)     # participant -> actor handle (None: a plain process)
    parts: dict = field(default_factory=dict)
    commit_args: dict | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: str | None = None
    error: str | None = None


class SaveCoordinator:
    """Ray actor body (wrapped with ``ray.remote`` in ``get_coordinator``)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.txns: dict[str, _Txn] = {}
        self.open_by_final: dict[str, str] = {}
        self.active: str | None = None          # the one transaction running in this directory
        self.changed = asyncio.Event()
        self._cleanup_dead_leftovers()

    def _cleanup_dead_leftovers(self) -> None:
        from .storage import owner_alive, parse_hidden, recover_replacements
        d = Path(self.directory)
        if not d.is_dir():
            return
        recover_replacements(d)
        for entry in os.scandir(d):
            info = parse_hidden(entry.name)
            if info and info["kind"] in ("tmp", "del") and not owner_alive(info):
                shutil.rmtree(entry.path, ignore_errors=True)

    def ping(self) -> dict:
        return {"pid": os.getpid(), "directory": self.directory}

    async def begin(self, final: str, participants: int, participant: int, timeout: float,
                    owner: Any = None) -> dict:
        """Join the open transaction for ``final``, or start one once the directory's
        running transaction (if any) has ended. Waiters re-check on every change, so all
        participants of a save that had to queue join the same transaction."""
        while True:
            tid = self.open_by_final.get(final)
            txn = self.txns.get(tid) if tid else None
            if txn and not txn.done.is_set() and await self._abort_if_orphaned(txn):
                continue
            if txn and not txn.done.is_set() and participant not in txn.claimed:
                if txn.participants != participants:
                    raise ValueError(f"saving {final}: participant {participant} expects "
                                     f"{participants} participants, the open save has {txn.participants}")
                txn.claimed.add(participant)
                txn.owners[participant] = owner
                return {"txn": txn.id, "tmp": txn.tmp, "deadline": txn.deadline}
            active = self.txns.get(self.active) if self.active else None
            if active is not None and not active.done.is_set() and await self._abort_if_orphaned(active):
                continue
            if active is None or active.done.is_set():
                info = self._open(final, participants, participant, timeout, owner)
                self._changed()
                return info
            await self.changed.wait()

    def _changed(self) -> None:
        """Wake every waiting ``begin`` (works from callbacks, not only coroutines)."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    async def _abort_if_orphaned(self, txn: _Txn) -> bool:
        """Abort ``txn`` if a participant that joined it has died (a crashed worker whose
        group was restarted must not leave the save open until its deadline, nor have the
        restarted workers join it). Only participants running in Ray actors can be checked."""
        import ray
        for p, handle in list(txn.owners.items()):
            if handle is None:
                continue
            try:
                await asyncio.wait_for(asyncio.wrap_future(handle.__ray_ready__.remote().future()), LIVENESS_TIMEOUT)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self._finish(txn, error=f"participant {p} died before the save was committed")
                return True
            except (asyncio.TimeoutError, ray.exceptions.RayError):
                continue  # busy or unreachable for a moment: the deadline still applies
        return False

    async def _watch(self, tid: str) -> None:
        """While a transaction is open, notice dead participants within a few seconds."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            txn = self.txns.get(tid)
            if txn is None or txn.done.is_set() or await self._abort_if_orphaned(txn):
                return

    def _open(self, final: str, participants: int, participant: int, timeout: float, owner: Any = None) -> dict:
        from .storage import hidden_name
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        tmp = hidden_name(Path(final), "tmp")
        os.mkdir(tmp)
        txn = _Txn(uuid.uuid4().hex, final, str(tmp), participants, time.time() + timeout)
        txn.claimed.add(participant)
        txn.owners[participant] = owner
        self.txns[txn.id] = txn
        self.open_by_final[final] = txn.id
        self.active = txn.id
        asyncio.get_running_loop().call_later(timeout, self._expire, txn.id)
        if participants > 1:
            asyncio.get_running_loop().create_task(self._watch(txn.id))
        return {"txn": txn.id, "tmp": txn.tmp, "deadline": txn.deadline}

    def _expire(self, tid: str) -> None:
        txn = self.txns.get(tid)
        if txn and not txn.done.is_set():
            missing = sorted(set(range(txn.participants)) - set(txn.parts))
            self._finish(txn, error=f"deadline passed with participants {missing} not reported")

    def _finish(self, txn: _Txn, result: str | None = None, error: str | None = None) -> None:
        if txn.done.is_set():
            return
        txn.result, txn.error = result, error
        if error is not None:
            _remove_tmp(txn.tmp)
        txn.done.set()
        if self.open_by_final.get(txn.final) == txn.id:
            del self.open_by_final[txn.final]
        if self.active == txn.id:
            self.active = None
        self._changed()
        # keep finished transactions a while so late waiters get their answer
        for tid in [t for t, x in self.txns.items() if x.done.is_set() and x.deadline < time.time() - 600]:
            del self.txns[tid]

    async def report(self, tid: str, participant: int, part: Any, commit_args: dict | None) -> None:
        """Hand in one participant's part; the last one triggers the commit."""
        from .checkpoint import commit_parts
        txn = self.txns.get(tid)
        if txn is None or txn.done.is_set():
            raise ValueError(f"save transaction {tid} is no longer open"
                             + (f": {txn.error}" if txn and txn.error else ""))
        txn.parts[participant] = part
        if commit_args is not None:
            txn.commit_args = commit_args
        if len(txn.parts) < txn.participants:
            return
        args = txn.commit_args or {}
        try:
            path = await asyncio.to_thread(
                commit_parts, Path(txn.final), Path(txn.tmp), list(txn.parts.values()),
                step=args.get("step"), json_files=args.get("json_files"), metrics=args.get("metrics"),
                keep_other_items=args.get("keep_other_items", False), transaction=txn.id)
            self._finish(txn, result=str(path))
        except BaseException as e:  # noqa: BLE001 - every failure aborts the transaction
            self._finish(txn, error=f"commit failed: {type(e).__name__}: {e}")

    async def abort(self, tid: str, reason: str) -> None:
        txn = self.txns.get(tid)
        if txn is not None:
            self._finish(txn, error=reason)

    async def wait(self, tid: str) -> str:
        txn = self.txns.get(tid)
        if txn is None:
            raise ValueError(f"unknown save transaction {tid}")
        await txn.done.wait()
        if txn.error is not None:
            raise RuntimeError(txn.error)
        return txn.result


def _remove_tmp(tmp: str) -> None:
    """Remove an aborted save's directory, again if a writer that was being stopped still
    created a file in it meanwhile."""
    for _ in range(5):
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(tmp):
            return
        time.sleep(0.2)


def coordinator_name(directory: Path) -> str:
    return "shardckpt-coordinator-" + hashlib.sha1(str(Path(directory).absolute()).encode()).hexdigest()[:16]


def get_coordinator(directory: Path):
    """The directory's coordinator actor, created on first use (named, detached, 0 CPUs)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    actor_cls = ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)(SaveCoordinator)
    options = dict(name=coordinator_name(directory), namespace=NAMESPACE, lifetime="detached",
                   get_if_exists=True)
    head = _head_node_id()
    if head:  # the head node lives as long as the cluster: the coordinator should too
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    return actor_cls.options(**options).remote(str(Path(directory).absolute()))


def _head_node_id() -> str | None:
    import ray
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None
