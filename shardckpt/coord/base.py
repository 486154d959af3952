"""The Coordinator seam: begin -> report -> commit (or abort) of one save transaction.

A transaction has an id, a staging area in the store and a deadline. Every participant
``begin``s (all get the same transaction), writes its part into the staging area, and
``report``s the part's metadata; once all parts are in, the coordinator runs the committer
it was constructed with (``save.commit.commit``: a coordinator knows nothing above it) and
every ``wait`` returns; on a failure, an ``abort`` or the
deadline nothing is published, the staging area is discarded and every ``wait`` raises.

Implementations: one process (local.py), the Ray coordinator actor (ray_actor.py), and the
``jax.distributed`` protocol over the store itself (jax_shared.py). Any of them works with
any Store and any Executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from shardckpt.format import limits
from shardckpt.format.manifest import MANIFEST, Manifest
from shardckpt.format.parts import CommitArgs, PartReport
from shardckpt.store.base import DEFAULT_SAVE_TIMEOUT, Staging, Store

#: ``commit(staging, parts, args, transaction=txn_id)``: check the parts, publish (or raise).
Commit = Callable[..., None]


@dataclass
class Txn:
    id: str
    staging: Staging
    deadline: float        # time.time() by which the commit must have happened


def committed_by(store: Store, name: str, txn: str) -> bool:
    """Whether checkpoint ``name`` of ``store`` is the one transaction ``txn`` committed."""
    try:
        raw = store.read_bytes(f"{name}/{MANIFEST}", limits.MAX_MANIFEST_BYTES)
        return Manifest.loads(raw, store.where(name)).transaction == txn
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return False


class Coordinator(ABC):
    #: Seconds a save may take (``save_timeout``): its transaction's deadline is this from begin.
    timeout: float = DEFAULT_SAVE_TIMEOUT

    @abstractmethod
    def begin(self, participant: int) -> Txn:
        ...

    @abstractmethod
    def report(self, txn: Txn, participant: int, part: PartReport, commit_args: CommitArgs | None) -> None:
        """Hand in one part (participant 0 also hands the commit arguments)."""

    @abstractmethod
    def wait(self, txn: Txn) -> None:
        """Return once the save is committed; raise SaveAbortedError if it was not."""

    @abstractmethod
    def abort(self, txn: Txn, reason: str) -> None:
        """Call the save off (best effort, never raises); the staging area goes."""
