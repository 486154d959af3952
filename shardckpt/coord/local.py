"""One process: the saver is its own coordinator (the common single-controller case)."""

from __future__ import annotations

import time
import uuid

from ..errors import SaveAbortedError
from ..store import Store
from .base import DEFAULT_SAVE_TIMEOUT, Coordinator, Txn


class LocalCoordinator(Coordinator):
    def __init__(self, store: Store, final: str, save_timeout: float | None = None):
        self.store, self.final = store, final
        self.timeout = save_timeout or DEFAULT_SAVE_TIMEOUT

    def begin(self, participant: int) -> Txn:
        tid = uuid.uuid4().hex
        try:
            staging = self.store.stage(self.final, tid)
        except OSError as e:   # a full disk, a read-only or foreign directory
            raise SaveAbortedError(f"saving {self.store.where(self.final)}: cannot start the save: {e}") from e
        return Txn(tid, staging, time.time() + self.timeout)

    def report(self, txn: Txn, participant: int, part, commit_args) -> None:
        from ..transaction import commit
        commit(txn.staging, [part], commit_args, transaction=txn.id)

    def wait(self, txn: Txn) -> None:
        pass

    def abort(self, txn: Txn, reason: str) -> None:
        try:
            txn.staging.discard()
        except Exception:  # noqa: BLE001 - best effort: what is left is invisible, gc removes it
            pass
