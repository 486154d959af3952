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
import weakref
from dataclasses import dataclass, replace
from typing import Any

import jax

from shardckpt.coord.base import Coordinator
from shardckpt.errors import CheckpointError, SaveAbortedError
from shardckpt.executors.base import Writer
from shardckpt.format import limits
from shardckpt.format.manifest import MANIFEST, ItemRecord
from shardckpt.format.names import is_version_dir
from shardckpt.format.parts import Carry, CommitArgs, PartReport
from shardckpt.progress import byte_progress, size_text
from shardckpt.saving.commit import recent_version
from shardckpt.saving.incremental import BaseChanged, digest_of, plan_carry, without_carried
from shardckpt.saving.plan import default_num_shards, plan_save
from shardckpt.store.base import Staging, Store
from shardckpt.tree import FlatTree, split_values
from shardckpt.workers import run_all

REPLICATED_SHARDS_PER_PARTICIPANT = 2
DIGEST_THREADS = 2             # arrays hashed at once (xxh3 runs at memory speed: ~25 GB/s a thread here)


def prepare_items(items: dict[str, Any], *, snapshot: bool = False) -> tuple[dict[str, list], dict[str, ItemRecord]]:
    """Flatten each item into array entries (with this process's host pieces) and records.

    The host pieces of ``jax.Array`` leaves are a consistent snapshot already: on CPU they
    are views that hold a reference to the buffer (XLA then refuses to donate it to the next
    step and copies instead), elsewhere device-to-host copies. ``snapshot`` also copies
    NumPy leaves, which their owner could change in place while an async save runs.
    """
    entries, records = {}, {}
    for name, tree in items.items():
        values = FlatTree.of(tree).values()
        arrays, scalars = split_values(values, copy_numpy=snapshot)
        for e in arrays:
            check_storable(name, e.key, e.spec)
            if isinstance(values[e.key], jax.Array):
                e.leaf_ref = weakref.ref(values[e.key])    # known by identity to the next incremental save
        entries[name] = arrays
        records[name] = ItemRecord({e.key: e.spec for e in arrays}, scalars)
    check_manifest_size(records)
    return entries, records


def check_storable(item: str, key: str, spec) -> None:
    """Refuse, before anything is written, an array every load would refuse (the reader's
    caps, ``format.limits``): more than ``MAX_NDIM`` dimensions, more than
    ``MAX_ELEMENTS`` elements, a key longer than the manifest allows."""
    if len(spec.stored_shape) > limits.MAX_NDIM:
        raise CheckpointError(f"item {item!r}: array {key[:200]!r} has {len(spec.stored_shape)} dimensions; a "
                              f"checkpoint holds at most {limits.MAX_NDIM} (every load refuses more)")
    if math.prod(spec.stored_shape) > limits.MAX_ELEMENTS:
        raise CheckpointError(f"item {item!r}: array {key[:200]!r} of shape {spec.shape} has more than "
                              f"{limits.MAX_ELEMENTS} elements")


def check_manifest_size(records: dict[str, ItemRecord]) -> None:
    """Refuse, before anything is written, items whose description alone would make the
    manifest larger than every load reads (the committer checks the exact manifest again)."""
    estimate = sum(len(key) + 200 for rec in records.values() for key in [*rec.arrays, *rec.scalars])
    if estimate > limits.MAX_MANIFEST_BYTES:
        raise CheckpointError(f"items {sorted(records)}: {sum(len(r.arrays) + len(r.scalars) for r in records.values())} "
                              f"leaves need a manifest of about {estimate} bytes, over the {limits.MAX_MANIFEST_BYTES} "
                              "every load reads: use shorter key names or fewer leaves")


def plan_part(entries: dict[str, list], num_shards: int | None, workers: int, *, participant: int = 0,
              participants: int = 1, replicated: bool = False, shard_cap: int | None = None,
              tag: str | None = None) -> list[tuple[str, Any]]:
    """The shards this participant writes, as (item, ShardPlan).

    ``replicated``: every participant holds the same full state (data parallel). All of them
    compute the same global plan over ``participants`` x ``num_shards`` files and each writes
    every ``participants``-th file, so each writes ~1/N and nothing crosses the network.
    Otherwise each participant plans only the pieces it holds (its addressable shards).
    """
    out = []
    for name, arrays in entries.items():
        if tag and not arrays:
            continue                    # every array of the item carried: no file to write
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
            plans = plan_save(name, arrays, n, process_index=participant, process_count=participants, tag=tag)
            out.extend((name, plan) for plan in plans)
    return out


def write_part(staging: Staging, entries: dict[str, list], records: dict[str, ItemRecord], executor: Writer,
               *, num_shards: int | None = None, compress: bool = False, progress: bool | None = None,
               participant: int = 0, participants: int = 1, replicated: bool = False,
               deadline: float | None = None, carry: Carry | None = None) -> PartReport:
    """Plan this participant's shards and have ``executor`` write them into ``staging``
    (with ``carry``: only what is not carried, into files named after this save)."""
    total = sum(p.data.nbytes for arrays in entries.values() for e in arrays for p in e.pieces)
    tag = staging.txn[:8] if carry else None
    caps = [c for c in (executor.shard_bytes_cap(total), staging.store.max_file_bytes) if c]
    planned = plan_part(entries, num_shards, executor.num_workers or 1, participant=participant,
                        participants=participants, replicated=replicated,
                        shard_cap=min(caps) if caps else None, tag=tag)
    total = sum(plan.nbytes for _, plan in planned)
    staging.expect_bytes(total)
    done = f"saved {staging.final}" + (f" ({size_text(carry.nbytes)} carried from {carry.base})" if carry else "")
    with byte_progress(f"saving {staging.final}", total, progress, done=done) as advance:
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


@dataclass
class SaveReport:
    """What a save did: where the checkpoint is, and the bytes and files it wrote and carried
    (from ``base``, an incremental save's base checkpoint)."""

    location: Any
    bytes_written: int = 0
    files_written: int = 0
    bytes_carried: int = 0
    files_carried: int = 0
    base: str | None = None
    seconds: float = 0.0


def run_save(store: Store, final: str, prepared: tuple, *, coordinator: Coordinator, executor: Writer,
             participant: int = 0, participants: int = 1, replicated: bool = False,
             num_shards: int | None = None, compress: bool = False, progress: bool | None = None,
             commit_args: CommitArgs | None = None, base: str | None = None) -> SaveReport:
    """Save ``prepared`` (``prepare_items`` output) as checkpoint ``final`` of ``store``;
    returns what it did once committed. Every participant of a save calls this.

    A save of one participant records each array's content digest; with ``base`` (a
    checkpoint of the same store) it carries the arrays that base holds unchanged instead of
    writing them (``incremental.py``). A base replaced or deleted meanwhile makes the save
    run again without it. (A save of several participants records no digests and carries
    nothing: each holds only pieces of the arrays.)"""
    where = store.where(final)
    start = time.perf_counter()
    if participant == 0:
        store.deadline = time.time() + coordinator.timeout   # its requests, too, retry within save_timeout
        check_replaceable(store, final)
    entries, records = prepared
    commit_args = commit_args or CommitArgs()
    carry = None
    if participants == 1:
        if base is not None and commit_args.keep_other_items:
            raise CheckpointError(f"saving {where}: an incremental save replaces the whole checkpoint; it cannot "
                                  "also keep the checkpoint's other items")
        pairs = [(item, e) for item, arrays in entries.items() for e in arrays]
        for (item, e), digest in zip(pairs, run_all(lambda ie: digest_of(ie[1]), pairs, DIGEST_THREADS)):
            records[item].digests[e.key] = digest
        carry = plan_base(store, base, entries, records) if base is not None else None
    try:
        part = _attempt(store, final, entries, records, coordinator, executor, participant, participants,
                        replicated, num_shards, compress, progress, commit_args, carry)
    except BaseChanged:
        carry = None            # the base changed under the carry: write everything, from the host copies
        part = _attempt(store, final, entries, records, coordinator, executor, participant, participants,
                        replicated, num_shards, compress, progress, commit_args, None)
    return SaveReport(store.location(final), sum(r.size for r in part.reports), len(part.reports),
                      carry.nbytes if carry else 0, len(carry.files) if carry else 0, carry.base if carry else None,
                      time.perf_counter() - start)


def plan_base(store: Store, base: str, entries: dict[str, list], records: dict[str, ItemRecord]) -> Carry | None:
    """What to carry from checkpoint ``base``; None where it is gone, damaged or replaced
    while its index is read (another process re-saving it): the save then writes it all."""
    try:
        version = recent_version(store, base)
        return (plan_carry(base, version, entries, records) or None) if version is not None else None
    except (CheckpointError, OSError):
        return None


def _attempt(store, final, entries, records, coordinator, executor, participant, participants, replicated,
             num_shards, compress, progress, commit_args: CommitArgs, carry: Carry | None) -> PartReport:
    """One transaction of ``run_save``: begin, write this participant's part, report, wait."""
    where = store.where(final)
    txn = coordinator.begin(participant)
    txn.staging.store.deadline = txn.deadline      # retries of transient errors stop at the deadline
    to_write = without_carried(entries, carry) if carry else entries
    try:
        part = write_part(txn.staging, to_write, records, executor, num_shards=num_shards, compress=compress,
                          progress=progress, participant=participant, participants=participants,
                          replicated=replicated, deadline=txn.deadline, carry=carry)
        args = replace(commit_args, carry=carry)
        coordinator.report(txn, participant, part, args if participant == 0 else None)
        coordinator.wait(txn)
    except BaseChanged as e:
        coordinator.abort(txn, f"participant {participant}: {_first_line(e)}")
        raise
    except BaseException as e:
        if isinstance(e, SaveAbortedError) and "BaseChanged:" in str(e) and carry is not None:
            coordinator.abort(txn, f"participant {participant}: {_first_line(e)}")
            raise BaseChanged(str(e)) from e      # a coordinator hands a committer's error back as its own
        coordinator.abort(txn, f"participant {participant}: {type(e).__name__}: {_first_line(e)}")
        raise as_save_error(e, where) from e
    return part


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
