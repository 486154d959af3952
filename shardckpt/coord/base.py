"""The Coordinator seam: begin -> report -> commit (or abort) of one save transaction.

A transaction has an id, a staging area in the store and a deadline. Every participant
``begin``s (all get the same transaction), writes its part into the staging area, and
``report``s the part's metadata; once all parts are in, the coordinator runs the committer
(``transaction.commit``) and every ``wait`` returns; on a failure, an ``abort`` or the
deadline nothing is published, the staging area is discarded and every ``wait`` raises.

Implementations: one process (local.py), the Ray coordinator actor (ray_actor.py), and the
``jax.distributed`` protocol over the store itself (jax_shared.py). Any of them works with
any Store and any Executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

DEFAULT_SAVE_TIMEOUT = 600.0


@dataclass
class Txn:
    id: str
    staging: Any           # store.Staging
    deadline: float        # time.time() by which the commit must have happened


class Coordinator(ABC):
    @abstractmethod
    def begin(self, participant: int) -> Txn:
        ...

    @abstractmethod
    def report(self, txn: Txn, participant: int, part: Any, commit_args: Any | None) -> None:
        """Hand in one part (participant 0 also hands the commit arguments)."""

    @abstractmethod
    def wait(self, txn: Txn) -> None:
        """Return once the save is committed; raise SaveAbortedError if it was not."""

    @abstractmethod
    def abort(self, txn: Txn, reason: str) -> None:
        """Call the save off (best effort, never raises); the staging area goes."""
