"""Multi-process saves without Ray: a commit protocol over the store itself.

For ``jax.distributed`` process groups (every process calls ``save`` for the same step,
SPMD style) when no Ray cluster is available. The processes agree on a transaction id with
one ``broadcast_one_to_all``; each writes its own shards and then its part's metadata
(``part-NNNNN.msgpack``) into the shared staging area; process 0 waits for all parts (until
the deadline), commits, and names the transaction in the manifest; the others wait until
the manifest with their transaction id appears, or the save is marked aborted. No
collective runs after the first, so a dead process makes the others fail at the deadline
instead of hanging. Works on a shared filesystem and on an object store alike.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import numpy as np
from jax.experimental import multihost_utils

from shardckpt.coord.base import Commit, Coordinator, Txn, committed_by
from shardckpt.errors import SaveAbortedError
from shardckpt.format.parts import CommitArgs, PartReport, part_body, part_from_bytes, part_to_bytes
from shardckpt.store.base import DEFAULT_SAVE_TIMEOUT, Store

POLL_SECONDS = 0.05
MAX_PART_BYTES = 1 << 30


def agree_on_transaction() -> tuple[str, str, int]:
    """(transaction id, host, pid) of process 0, known to every process."""
    host = socket.gethostname().encode()[:48].ljust(48, b"\0")
    mine = np.frombuffer(uuid.uuid4().bytes + host, np.uint8).copy()
    mine = np.concatenate([mine, np.frombuffer(np.int64(os.getpid()).tobytes(), np.uint8)])
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(mine))
    txn = bytes(agreed[:16]).hex()
    host0 = bytes(agreed[16:64]).rstrip(b"\0").decode(errors="replace")
    pid0 = int(np.frombuffer(bytes(agreed[64:72]), np.int64)[0])
    return txn, host0, pid0


def _part_name(p: int) -> str:
    return f"part-{p:05d}.msgpack"


class SharedStorageCoordinator(Coordinator):
    def __init__(self, store: Store, final: str, commit: Commit, participants: int,
                 save_timeout: float | None = None):
        self.store, self.final, self.participants, self.commit = store, final, participants, commit
        self.timeout = save_timeout or DEFAULT_SAVE_TIMEOUT
        self.commit_args = None

    def begin(self, participant: int) -> Txn:
        tid, host0, pid0 = agree_on_transaction()
        staging = self.store.stage(self.final, tid, owner=(host0, pid0))
        return Txn(tid, staging, time.time() + self.timeout)

    def report(self, txn: Txn, participant: int, part: PartReport, commit_args: CommitArgs | None) -> None:
        txn.staging.write_bytes(_part_name(participant), part_to_bytes(part))
        if participant == 0:
            self.commit_args = commit_args
        self.participant = participant

    def wait(self, txn: Txn) -> None:
        if self.participant == 0:
            self._commit(txn)
        else:
            self._await_commit(txn)

    def _commit(self, txn: Txn) -> None:
        where = self.store.where(self.final)
        raws: dict[int, bytes] = {}
        while len(raws) < self.participants:
            for p in range(self.participants):
                if p not in raws:
                    raw = txn.staging.read_staged(_part_name(p), MAX_PART_BYTES)
                    body = part_body(raw) if raw is not None else None
                    if body is not None:            # None: not there, or not whole yet
                        raws[p] = body
            if len(raws) == self.participants:
                break
            if txn.staging.aborted():
                raise SaveAbortedError(f"saving {where}: another participant aborted the save")
            if time.time() > txn.deadline:
                missing = sorted(set(range(self.participants)) - set(raws))
                raise SaveAbortedError(f"saving {where}: participants {missing} did not report within "
                                       f"save_timeout={self.timeout}s; nothing was committed (every "
                                       f"process of the group must call save; or pass process_count=1 "
                                       "to save from one process alone)")
            time.sleep(POLL_SECONDS)
        parts = [part_from_bytes(raws[p], where) for p in range(self.participants)]
        for p in range(self.participants):
            txn.staging.remove_staged(_part_name(p))
        self.commit(txn.staging, parts, self.commit_args or CommitArgs(), transaction=txn.id)

    def _await_commit(self, txn: Txn) -> None:
        where = self.store.where(self.final)
        while True:
            if committed_by(self.store, self.final, txn.id):
                return
            if txn.staging.aborted():
                if committed_by(self.store, self.final, txn.id):
                    return
                raise SaveAbortedError(f"saving {where}: the save was aborted (see process 0); nothing was committed")
            if time.time() > txn.deadline + 30:
                raise SaveAbortedError(f"saving {where}: no commit within save_timeout={self.timeout}s")
            time.sleep(POLL_SECONDS)

    def abort(self, txn: Txn, reason: str) -> None:
        try:
            txn.staging.mark_aborted(reason)
        except Exception:  # noqa: BLE001 - the others stop at the deadline anyway
            pass
