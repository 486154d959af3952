"""The Ray coordinator: one actor per checkpoint directory owning save transactions.

Participants (the driver of a single-controller save, or every rank of a multi-controller
one) ``begin`` to get the transaction's staging area, write their shards straight into the
store, and ``report`` their part's metadata. When all have reported the actor runs the
committer; on a failure, an ``abort``, a dead participant or the deadline it discards the
staging area and every ``wait`` raises. Transactions on one directory run one at a time,
from any number of processes; whole multi-participant saves queue.

The actor keeps nothing that storage does not: a new coordinator (after a crash) removes
the leftovers of dead saves (best effort) and starts afresh. It holds the Store, so the
same actor commits a local directory (a shared filesystem) or an object store.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardckpt.coord.base import Commit, Coordinator, Txn, committed_by
from shardckpt.errors import CheckpointError, SaveAbortedError
from shardckpt.format.parts import CommitArgs, PartReport
from shardckpt.store.base import DEFAULT_SAVE_TIMEOUT, Staging, Store
from shardckpt.store.posix import this_host

NAMESPACE = "shardckpt"
WATCH_SECONDS = 2.0        # how often an open multi-participant save checks its participants
LIVENESS_TIMEOUT = 5.0


@dataclass
class _Txn:
    id: str
    final: str
    staging: Staging
    participants: int
    deadline: float
    claimed: set = field(default_factory=set)
    owners: dict = field(default_factory=dict)     # participant -> actor handle (None: a plain process)
    parts: dict = field(default_factory=dict)
    commit_args: CommitArgs | None = None
    finishing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


class SaveCoordinator:
    """Ray actor body (wrapped with ``ray.remote`` in ``get_coordinator``)."""

    def __init__(self, store: Store, commit: Commit, cleanup: Callable[[], Any] | None = None):
        self.store, self.commit = store, commit
        self.txns: dict[str, _Txn] = {}
        self.open_by_final: dict[str, str] = {}
        self.active: str | None = None          # the one transaction running in this directory
        self.changed = asyncio.Event()
        try:
            if cleanup is not None:
                cleanup()               # leftovers of dead saves (the Catalog's plan)
        except Exception:  # noqa: BLE001 - cleanup is best effort, never required
            pass

    def ping(self) -> dict:
        return {"pid": os.getpid(), "directory": self.store.uri}

    async def begin(self, final: str, participants: int, participant: int, timeout: float,
                    owner: Any = None, join_timeout: float | None = None) -> dict:
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
                    raise CheckpointError(f"saving {final}: participant {participant} expects {participants} "
                                          f"participants, the open save has {txn.participants}; every "
                                          "participant must pass the same process_count=")
                txn.claimed.add(participant)
                txn.owners[participant] = owner
                return self._info(txn)
            active = self.txns.get(self.active) if self.active else None
            if active is not None and not active.done.is_set() and await self._abort_if_orphaned(active):
                continue
            if active is None or active.done.is_set():
                info = self._open(final, participants, participant, timeout, owner, join_timeout)
                self._changed()
                return info
            await self.changed.wait()

    @staticmethod
    def _info(txn: _Txn) -> dict:
        return {"txn": txn.id, "staging": txn.staging, "deadline": txn.deadline}

    def _changed(self) -> None:
        """Wake every waiting ``begin`` (works from callbacks, not only coroutines)."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    async def _abort_if_orphaned(self, txn: _Txn) -> bool:
        """Abort ``txn`` if a participant that joined it has died (a crashed worker whose
        group was restarted must not leave the save open until its deadline, nor have the
        restarted workers join it). Only participants running in Ray actors can be checked."""
        for p, handle in list(txn.owners.items()):
            if handle is None:
                continue
            try:
                await asyncio.wait_for(asyncio.wrap_future(handle.__ray_ready__.remote().future()), LIVENESS_TIMEOUT)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                await self._finish(txn, error=f"participant {p} died before the save was committed")
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

    def _open(self, final: str, participants: int, participant: int, timeout: float, owner: Any,
              join_timeout: float | None = None) -> dict:
        """Synchronous on purpose: no other ``begin`` may run between deciding to open and
        registering the transaction (staging creation is a mkdir or nothing at all)."""
        tid = uuid.uuid4().hex
        staging = self.store.stage(final, tid, (this_host(), os.getpid()))
        txn = _Txn(tid, final, staging, participants, time.time() + timeout)
        staging.store.deadline = txn.deadline      # the commit's retries stop at the deadline too
        txn.claimed.add(participant)
        txn.owners[participant] = owner
        self.txns[txn.id] = txn
        self.open_by_final[final] = txn.id
        self.active = txn.id
        loop = asyncio.get_running_loop()
        loop.call_later(timeout, lambda: loop.create_task(self._expire(txn.id)))
        if participants > 1:
            loop.create_task(self._watch(txn.id))
            if join_timeout is not None and join_timeout < timeout:
                loop.call_later(join_timeout, lambda: loop.create_task(self._check_joined(txn.id, join_timeout)))
        return self._info(txn)

    async def _check_joined(self, tid: str, join_timeout: float) -> None:
        """Abort a save that some participants never began (e.g. only rank 0 called save)."""
        txn = self.txns.get(tid)
        missing = sorted(set(range(txn.participants)) - txn.claimed) if txn else []
        if txn and missing and not txn.done.is_set():
            await self._finish(txn, error=(
                f"participants {missing} of {txn.participants} never began this save within "
                f"join_timeout={join_timeout:g}s (only {sorted(txn.claimed)} did): call save on every "
                "participant for the same step, or save from one process alone with process_count=1"))

    async def _expire(self, tid: str) -> None:
        txn = self.txns.get(tid)
        if txn and not txn.done.is_set():
            missing = sorted(set(range(txn.participants)) - set(txn.parts))
            await self._finish(txn, error=f"deadline passed with participants {missing} not reported")

    async def _finish(self, txn: _Txn, error: str | None = None) -> None:
        if txn.done.is_set() or txn.finishing:
            return
        txn.finishing = True
        txn.error = error
        if error is not None:
            await asyncio.to_thread(_discard, txn.staging, error)
        txn.done.set()
        if self.open_by_final.get(txn.final) == txn.id:
            del self.open_by_final[txn.final]
        if self.active == txn.id:
            self.active = None
        self._changed()
        # keep finished transactions a while so late waiters get their answer
        for tid in [t for t, x in self.txns.items() if x.done.is_set() and x.deadline < time.time() - 600]:
            del self.txns[tid]

    async def report(self, tid: str, participant: int, part: PartReport, commit_args: CommitArgs | None) -> None:
        """Hand in one participant's part; the last one triggers the commit."""
        txn = self.txns.get(tid)
        if txn is None or txn.done.is_set():
            raise CheckpointError(f"save transaction {tid} is no longer open"
                                  + (f": {txn.error}" if txn and txn.error else ""))
        txn.parts[participant] = part
        if commit_args is not None:
            txn.commit_args = commit_args
        if len(txn.parts) < txn.participants:
            return
        try:
            await asyncio.to_thread(self.commit, txn.staging, list(txn.parts.values()),
                                    txn.commit_args or CommitArgs(), transaction=txn.id)
        except BaseException as e:  # noqa: BLE001 - every failure aborts the transaction
            await self._finish(txn, error=f"commit failed: {type(e).__name__}: {e}")
            return
        await self._finish(txn)

    async def abort(self, tid: str, reason: str) -> None:
        txn = self.txns.get(tid)
        if txn is not None:
            await self._finish(txn, error=reason)

    async def wait(self, tid: str) -> None:
        txn = self.txns.get(tid)
        if txn is None:
            raise CheckpointError(f"unknown save transaction {tid}")
        await txn.done.wait()
        if txn.error is not None:
            raise SaveAbortedError(txn.error)


def _discard(staging, reason: str) -> None:
    try:
        staging.mark_aborted(reason)
    except Exception:  # noqa: BLE001 - best effort: an unpublished staging area is invisible
        pass


def coordinator_name(store: Store) -> str:
    return "shardckpt-coordinator-" + hashlib.sha1(store.uri.encode()).hexdigest()[:16]


def get_coordinator(store: Store, commit: Commit, cleanup: Callable[[], Any] | None = None):
    """The directory's coordinator actor, created on first use (named, detached, 0 CPUs,
    on the head node, which lives as long as the cluster) with the committer it runs and the
    cleanup it does when it starts."""
    actor_cls = ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)(SaveCoordinator)
    options = dict(name=coordinator_name(store), namespace=NAMESPACE, lifetime="detached",
                   get_if_exists=True)
    head = _head_node_id()
    if head:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    return actor_cls.options(**options).remote(store, commit, cleanup)


def _head_node_id() -> str | None:
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def current_actor():
    """This process's actor handle when it runs in a Ray actor (a Ray Train worker), else None."""
    try:
        ctx = ray.get_runtime_context()
        return ctx.current_actor if ctx.get_actor_id() else None
    except Exception:  # noqa: BLE001 - driver or task
        return None


def first_line(e: BaseException) -> str:
    s = str(getattr(e, "cause", None) or e).strip()
    return s.splitlines()[0] if s else type(e).__name__


class RayCoordinator(Coordinator):
    """The client side: one participant talking to the directory's coordinator actor."""

    def __init__(self, store: Store, final: str, commit: Commit, participants: int = 1,
                 save_timeout: float | None = None, join_timeout: float | None = None,
                 cleanup: Callable[[], Any] | None = None):
        self.store, self.final, self.participants = store, final, participants
        self.timeout = save_timeout or DEFAULT_SAVE_TIMEOUT
        self.join_timeout = join_timeout
        self.actor = get_coordinator(store, commit, cleanup)

    def begin(self, participant: int) -> Txn:
        owner = current_actor() if self.participants > 1 else None   # the coordinator notices if we die
        try:
            info = ray.get(self.actor.begin.remote(self.final, self.participants, participant, self.timeout, owner,
                                                   self.join_timeout), timeout=self.timeout)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, CheckpointError):
                raise e.cause from None
            raise SaveAbortedError(f"saving {self.store.where(self.final)}: the coordinator failed to open the "
                                   f"save: {first_line(e)}") from e
        except ray.exceptions.RayError as e:
            raise SaveAbortedError(f"saving {self.store.where(self.final)}: the coordinator failed to open the "
                                   f"save: {first_line(e)}") from e
        return Txn(info["txn"], info["staging"], info["deadline"])

    def report(self, txn: Txn, participant: int, part: PartReport, commit_args: CommitArgs | None) -> None:
        self._get(self.actor.report.remote(txn.id, participant, part, commit_args), txn, max(0.1, txn.deadline - time.time()))

    def wait(self, txn: Txn) -> None:
        self._get(self.actor.wait.remote(txn.id), txn, max(0.1, txn.deadline - time.time()) + 30)

    def _get(self, ref, txn: Txn, timeout: float) -> None:
        where = self.store.where(self.final)
        try:
            ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, CheckpointError):
                raise SaveAbortedError(f"saving {where}: {e.cause}") from None
            raise SaveAbortedError(f"saving {where} failed, nothing was committed: {first_line(e)}") from e
        except ray.exceptions.RayActorError as e:
            if committed_by(self.store, self.final, txn.id):   # it died after publishing: committed
                return
            raise SaveAbortedError(f"saving {where}: the coordinator died; nothing was committed") from e
        except ray.exceptions.GetTimeoutError as e:
            raise SaveAbortedError(f"saving {where}: not committed within the deadline "
                                   f"(save_timeout={self.timeout}s)") from e

    def abort(self, txn: Txn, reason: str) -> None:
        try:  # synchronous, so the staging area is gone when the error reaches the caller
            ray.get(self.actor.abort.remote(txn.id, reason), timeout=30)
        except Exception:  # noqa: BLE001 - the coordinator is gone: nobody can commit it now
            _discard(txn.staging, reason)
