"""One process: the saver is its own coordinator (the common single-controller case)."""

from __future__ import annotations

import time
import uuid

from shardckpt.coord.base import Commit, Coordinator, Txn
from shardckpt.errors import SaveAbortedError
from shardckpt.format.parts import CommitArgs, PartReport
from shardckpt.store.base import DEFAULT_SAVE_TIMEOUT, Store


class LocalCoordinator(Coordinator):
    def __init__(self, store: Store, final: str, commit: Commit, save_timeout: float | None = None):
        self.store, self.final, self.commit = store, final, commit
        self.timeout = save_timeout or DEFAULT_SAVE_TIMEOUT

    def begin(self, participant: int) -> Txn:
        tid = uuid.uuid4().hex
        try:
            staging = self.store.stage(self.final, tid)
        except OSError as e:   # a full disk, a read-only or foreign directory
            raise SaveAbortedError(f"saving {self.store.where(self.final)}: cannot start the save: {e}") from e
        return Txn(tid, staging, time.time() + self.timeout)

    def report(self, txn: Txn, participant: int, part: PartReport, commit_args: CommitArgs | None) -> None:
        self.commit(txn.staging, [part], commit_args or CommitArgs(), transaction=txn.id)

    def wait(self, txn: Txn) -> None:
        pass

    def abort(self, txn: Txn, reason: str) -> None:
        try:
            txn.staging.discard()
        except Exception:  # noqa: BLE001 - best effort: what is left is invisible, gc removes it
            pass
