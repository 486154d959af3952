"""The one save pipeline: prepare -> plan -> write parts -> commit, for every Store,
Coordinator and Executor.

``run_save`` is what every save runs, whether one process writes a local directory or a
thousand Ray Train ranks write to S3::

    txn  = coordinator.begin(participant)           # a transaction id, a staging area, a deadline
    part = write_part(txn.staging, ...)             # this participant's shards, by the executor
    coordinator.report(txn, participant, part, ...) # only metadata travels
    coordinator.wait(txn)                           # the coordinator ran ``commit`` once all reported

The coordinator runs the committer (``commit.py``) once every part is in. Nothing here knows
which store it writes to, which coordinator agrees or which executor writes.
"""

from __future__ import annotations

import math
import time
from typing import Any

from shardckpt.errors import CheckpointError, SaveAbortedError
from shardckpt.executors.base import Writer
from shardckpt.format.manifest import MANIFEST, ItemRecord
from shardckpt.format.names import is_version_dir
from shardckpt.format.parts import CommitArgs, PartReport
from shardckpt.progress import byte_progress
from shardckpt.saving.plan import default_num_shards, plan_save
from shardckpt.store.base import Staging, Store
from shardckpt.tree import FlatTree, split_values

REPLICATED_SHARDS_PER_PARTICIPANT = 2


def prepare_items(items: dict[str, Any], *, snapshot: bool = False) -> tuple[dict[str, list], dict[str, ItemRecord]]:
    """Flatten each item into array entries (with this process's host pieces) and records.

    The host pieces of ``jax.Array`` leaves are a consistent snapshot already: on CPU they
    are views that hold a reference to the buffer (XLA then refuses to donate it to the next
    step and copies instead), elsewhere device-to-host copies. ``snapshot`` also copies
    NumPy leaves, which their owner could change in place while an async save runs.
    """
    entries, records = {}, {}
    for name, tree in items.items():
        arrays, scalars = split_values(FlatTree.of(tree).values(), copy_numpy=snapshot)
        entries[name] = arrays
        records[name] = ItemRecord({e.key: e.spec for e in arrays}, scalars)
    return entries, records


def plan_part(entries: dict[str, list], num_shards: int | None, workers: int, *, participant: int = 0,
              participants: int = 1, replicated: bool = False, shard_cap: int | None = None) -> list[tuple[str, Any]]:
    """The shards this participant writes, as (item, ShardPlan).

    ``replicated``: every participant holds the same full state (data parallel). All of them
    compute the same global plan over ``participants`` x ``num_shards`` files and each writes
    every ``participants``-th file, so each writes ~1/N and nothing crosses the network.
    Otherwise each participant plans only the pieces it holds (its addressable shards).
    """
    out = []
    for name, arrays in entries.items():
        nbytes = sum(p.data.nbytes for e in arrays for p in e.pieces)
        # replicated: every participant must compute the same global plan, so the default
        # may not depend on this machine's thread count
        n = num_shards or default_num_shards(nbytes, REPLICATED_SHARDS_PER_PARTICIPANT if replicated else workers)
        if not num_shards and shard_cap:
            n = max(n, math.ceil(nbytes / shard_cap))
        if replicated and participants > 1:
            plans = plan_save(name, arrays, n * participants)
            out.extend((name, plan) for i, plan in enumerate(plans) if i % participants == participant)
        else:
            plans = plan_save(name, arrays, n, process_index=participant, process_count=participants)
            out.extend((name, plan) for plan in plans)
    return out


def write_part(staging: Staging, entries: dict[str, list], records: dict[str, ItemRecord], executor: Writer,
               *, num_shards: int | None = None, compress: bool = False, progress: bool | None = None,
               participant: int = 0, participants: int = 1, replicated: bool = False,
               deadline: float | None = None) -> PartReport:
    """Plan this participant's shards and have ``executor`` write them into ``staging``."""
    total = sum(p.data.nbytes for arrays in entries.values() for e in arrays for p in e.pieces)
    planned = plan_part(entries, num_shards, executor.num_workers or 1, participant=participant,
                        participants=participants, replicated=replicated,
                        shard_cap=executor.shard_bytes_cap(total))
    total = sum(plan.nbytes for _, plan in planned)
    with byte_progress(f"saving {staging.final}", total, progress) as advance:
        reports = executor.write_shards(staging, [plan for _, plan in planned], compress=compress,
                                        progress=advance, deadline=deadline)
    expected = {staging.stored_name(plan.file) for _, plan in planned}
    got = [r.file for r in reports]
    if sorted(got) != sorted(expected):
        raise SaveAbortedError(f"saving {staging.final}: writers did not report "
                               f"{sorted(expected - set(got)) or 'as planned'}")
    part = PartReport(participant, records,
                      reports, {staging.stored_name(plan.file): item for item, plan in planned})
    for item in records:
        part.digest(item)          # here, in parallel across participants, not in the committer
    return part


def check_replaceable(store: Store, final: str) -> None:
    """Refuse early to save over something that is not ours: a file, or a directory holding
    anything but a checkpoint (or the invisible leftovers of our own aborted saves)."""
    where = store.where(final)
    if store.size(final) is not None:
        raise CheckpointError(f"{where} exists and is not a directory; refusing to overwrite it")
    if store.exists(f"{final}/{MANIFEST}"):
        return
    listing = store.list(final)
    if any(e.name == MANIFEST for e in listing):
        return   # a concurrent save published between the two looks (a rename pair is not atomic)
    foreign = [e.name for e in listing if not (e.is_dir and is_version_dir(e.name))]
    if foreign:
        raise CheckpointError(f"{where} exists and is not a shardckpt checkpoint (no {MANIFEST}; it holds "
                              f"{', '.join(sorted(foreign)[:5])}); refusing to overwrite it: choose an empty "
                              "or new directory")


def as_save_error(e: BaseException, where: str) -> BaseException:
    """Our error for a failed save (KeyboardInterrupt and friends pass through)."""
    if isinstance(e, CheckpointError) or not isinstance(e, Exception):
        return e
    return SaveAbortedError(f"saving {where} failed, nothing was committed: {type(e).__name__}: {e}")


def run_save(store: Store, final: str, prepared: tuple, *, coordinator, executor: Writer,
             participant: int = 0, participants: int = 1, replicated: bool = False,
             num_shards: int | None = None, compress: bool = False, progress: bool | None = None,
             commit_args: CommitArgs | None = None) -> Any:
    """Save ``prepared`` (``prepare_items`` output) as checkpoint ``final`` of ``store``;
    returns its location once committed. Every participant of a save calls this."""
    where = store.where(final)
    if participant == 0:
        store.deadline = time.time() + coordinator.timeout   # its requests, too, retry within save_timeout
        check_replaceable(store, final)
    entries, records = prepared
    txn = coordinator.begin(participant)
    txn.staging.store.deadline = txn.deadline      # retries of transient errors stop at the deadline
    try:
        part = write_part(txn.staging, entries, records, executor, num_shards=num_shards, compress=compress,
                          progress=progress, participant=participant, participants=participants,
                          replicated=replicated, deadline=txn.deadline)
        coordinator.report(txn, participant, part, (commit_args or CommitArgs()) if participant == 0 else None)
        coordinator.wait(txn)
    except BaseException as e:
        coordinator.abort(txn, f"participant {participant}: {type(e).__name__}: {_first_line(e)}")
        raise as_save_error(e, where) from e
    return store.location(final)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
