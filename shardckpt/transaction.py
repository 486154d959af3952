"""The one save pipeline: prepare -> plan -> write parts -> commit, for every Store,
Coordinator and Executor.

``run_save`` is what every save runs, whether one process writes a local directory or a
thousand Ray Train ranks write to S3::

    txn  = coordinator.begin(participant)           # a transaction id, a staging area, a deadline
    part = write_part(txn.staging, ...)             # this participant's shards, by the executor
    coordinator.report(txn, participant, part, ...) # only metadata travels
    coordinator.wait(txn)                           # the coordinator ran ``commit`` once all reported

``commit`` is the committer the coordinators run: it checks that the parts agree, writes the
metadata files and the chunk index into the staging area, and publishes it with the
manifest, atomically (the Store decides how). Nothing here knows which store it writes to.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import __version__
from .errors import CheckpointError, SaveAbortedError
from .executors.base import Executor
from .index_fragments import dump_directory, dump_fragment, fragment_name, is_fragment_name, plan_fragments
from .format import no_cyclic_gc, INDEX, MANIFEST, FileRecord, ItemRecord, Manifest, check_index, dump_index, index_columns
from .plan import default_num_shards, plan_save
from .progress import byte_progress
from .shard_io import ChunkRecord, ShardReport
from .store import Staging, Store
from .store.base import VersionChanged
from .store.base import VERSION_DIR
from .tree import FlatTree, split_values

REPLICATED_SHARDS_PER_PARTICIPANT = 2


@dataclass
class PartReport:
    """One participant's contribution to a save: what its items hold (specs and scalar
    leaves, the same on every participant) and the reports of the shards it wrote."""

    participant: int
    items: dict[str, ItemRecord]
    reports: list[ShardReport]
    item_of_file: dict[str, str]
    digests: dict[str, str] | None = None    # item -> digest of its record, made by the participant

    def digest(self, item: str) -> str:
        """A checksum of what ``item`` holds (its record's canonical JSON): computed once, by
        the participant that wrote the part, so a committer of 1,024 parts compares short
        strings instead of 1,024 structures of thousands of arrays."""
        if self.digests is None:
            self.digests = {}
        if item not in self.digests:
            self.digests[item] = record_digest(self.items[item])
        return self.digests[item]


def record_digest(rec: ItemRecord) -> str:
    import xxhash
    return xxhash.xxh3_128(json.dumps(rec.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class CommitArgs:
    """What participant 0 hands the committer besides the parts."""

    step: int | None = None
    json_files: dict[str, Any] | None = None
    metrics: dict | None = None
    keep_other_items: bool = False


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


def write_part(staging: Staging, entries: dict[str, list], records: dict[str, ItemRecord], executor: Executor,
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


# --- commit ----------------------------------------------------------------------------------

def writer_versions() -> dict[str, str]:
    import flax
    return {"shardckpt": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__}


def json_bytes(obj: Any, name: str) -> bytes:
    try:
        return json.dumps(obj, indent=1, default=_json_default, allow_nan=True).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: value is not JSON-serialisable ({e})") from e


def _json_default(o: Any):
    if isinstance(o, (np.generic, jax.Array)) and np.ndim(o) == 0:
        return np.asarray(o).item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def commit(staging: Staging, parts: list[PartReport], args: CommitArgs, *, transaction: str = "") -> None:
    """The committer: check the parts agree, write metadata and index into ``staging``, then
    publish it with the manifest, atomically. Raises (and publishes nothing) on any problem."""
    with no_cyclic_gc():      # 10^6 chunk records from 1,024 parts: no quadratic gen-2 passes
        _commit(staging, parts, args, transaction)


def _commit(staging: Staging, parts: list[PartReport], args: CommitArgs, transaction: str) -> None:
    from .reader import ReplacedWhileReadingError, existing_checkpoint
    where = staging.store.where(staging.final)
    records: dict[str, ItemRecord] = {}
    digests: dict[str, str] = {}
    for part in sorted(parts, key=lambda p: p.participant):
        for name, rec in part.items.items():
            if name not in records:
                records[name], digests[name] = rec, part.digest(name)
            elif rec is not records[name] and part.digest(name) != digests[name]:
                raise SaveAbortedError(f"saving {where}: participants disagree on the structure of "
                                       f"{name!r} (participant {part.participant} differs)")
    chunks_by_item: dict[str, dict[str, list[tuple[str, ChunkRecord]]]] = {n: defaultdict(list) for n in records}
    files: dict[str, FileRecord] = {}
    for part in sorted(parts, key=lambda p: p.participant):   # files numbered by writer: see index_fragments
        for r in part.reports:
            if r.file in files:
                raise SaveAbortedError(f"saving {where}: shard {r.file} was reported twice")
            item = part.item_of_file[r.file]
            files[r.file] = FileRecord(r.size, r.xxh3_64, item, r.writer)
            for c in r.chunks:
                chunks_by_item[item][c.key].append((r.file, c))
    if not args.keep_other_items:
        _publish(staging, parts, args, records, chunks_by_item, files, {}, args.step, args.metrics,
                 dict(args.json_files or {}), transaction)
        return
    # Adding items to a checkpoint (save_model + save_optimizer): the items this save does
    # not write come from the newest version. Two such saves racing on one checkpoint must
    # not each carry over the version before the other's (a lost update): on a local disk
    # they take turns under a lock file beside the checkpoint, and every store re-reads the
    # current version right before publishing and carries over again if it changed.
    with staging.store.lock(staging.final):
        for _ in range(CARRY_OVER_ATTEMPTS):
            token = staging.version_token()
            previous = existing_checkpoint(staging.store, staging.final)
            step, metrics, json_files = args.step, args.metrics, dict(args.json_files or {})
            t_records, t_chunks = dict(records), {n: defaultdict(list, v) for n, v in chunks_by_item.items()}
            t_files, meta_files, adopted = dict(files), {}, []
            if previous is not None:
                try:
                    adopted = _carry_over(previous, staging, set(records), json_files, t_records, t_chunks,
                                          t_files, meta_files)
                except ReplacedWhileReadingError:
                    continue          # replaced while its index was read: carry over the new one
                # Adding an item keeps what the checkpoint is listed by (its step and metrics).
                step = previous.step if step is None else step
                metrics = previous.metrics if metrics is None else metrics
            if _publish(staging, parts, args, t_records, t_chunks, t_files, meta_files, step, metrics, json_files,
                        transaction, expect=_version_of(previous), token=token):
                return
            # the outdated version's links and this attempt's metadata files go before the retry
            staging.forget({*adopted, *meta_files})
    raise SaveAbortedError(f"saving {where}: the checkpoint was replaced {CARRY_OVER_ATTEMPTS} times by "
                           "other saves while this one carried its other items over; nothing was committed")


CARRY_OVER_ATTEMPTS = 20
_NO_VERSION = "-"


def _version_of(ck) -> str:
    """What identifies one committed version of a checkpoint (its manifest, which names
    the transaction, the creation time and every file's checksum)."""
    if ck is None:
        return _NO_VERSION
    m = ck.manifest
    return json.dumps([m.transaction, m.created, m.step, sorted(m.items),
                       sorted((k, r.size, r.xxh3_64) for k, r in [*m.files.items(), *m.meta_files.items()])])


def _publish(staging: Staging, parts: list[PartReport], args: CommitArgs, records, chunks_by_item, files,
             meta_files, step, metrics, json_files, transaction: str, expect: str | None = None,
             token: Any = None) -> bool:
    """Write the metadata files and the index, then publish with the manifest. With
    ``expect``: only if the checkpoint is still that version (else return False, nothing
    published); ``token`` (``staging.version_token()``) makes the store check it atomically
    where it can (a conditional PUT on object stores)."""
    from .reader import existing_checkpoint
    where = staging.store.where(staging.final)
    for fname, obj in json_files.items():
        _add_meta(staging, meta_files, fname, json_bytes(obj, fname))
    structure = {item: {k: {"shape": list(s.shape), "dtype": s.dtype} for k, s in rec.arrays.items()}
                 for item, rec in records.items()}
    _add_meta(staging, meta_files, "structure.json", json_bytes(structure, "structure.json"))
    index_cols = index_columns(chunks_by_item)     # one pass over the chunk records
    plan = plan_fragments(index_cols, writer_order=[r.file for p in sorted(parts, key=lambda p: p.participant)
                                                    for r in p.reports])
    if plan is None:
        index_rec = _add_meta(staging, meta_files, INDEX, dump_index(index_cols))
    else:   # too big for every reader to read whole: fragments by writer, and their directory
        names = [_add_meta(staging, meta_files, fragment_name(k), dump_fragment(index_cols, plan, k))
                 for k in range(plan.count)]
        index_rec = _add_meta(staging, meta_files, INDEX, dump_directory(index_cols, plan, names))
    writers = {(r.writer.get("node_id") or r.writer.get("host")) for p in parts for r in p.reports}
    manifest = Manifest(step=step, items=records, files=files, meta_files=meta_files,
                        metrics=plain_metrics(metrics or {}), writers=writer_versions(),
                        host_count=len(writers) or 1, transaction=transaction, index_file=index_rec)
    # The index validator is the loader's (the same checks on the columns just serialised):
    # a commit never publishes what a load would refuse.
    check_index(index_cols, manifest, where)
    if expect is not None and _version_of(existing_checkpoint(staging.store, staging.final)) != expect:
        return False
    try:
        staging.publish(manifest.dumps(), expect=token)
    except VersionChanged:
        return False
    return True


def _add_meta(staging: Staging, meta_files: dict, name: str, data: bytes) -> str:
    written = staging.write_bytes(name, data)
    meta_files[written.name] = FileRecord(written.size, written.xxh3_64)
    return written.name


def _carry_over(previous, staging: Staging, items: set, json_files: dict, manifest_items,
                chunks_by_item, files, meta_files) -> list[str]:
    """Bring the previous checkpoint's other items and metadata files into this save
    (``staging.adopt``: a hard link on local disks, the same object on object stores).
    Returns the names adopted."""
    old = previous.manifest
    adopted = []
    for name, rec in old.items.items():
        if name in items:
            continue
        manifest_items[name] = rec
        renamed = {}
        for fname, frec in old.files.items():
            if frec.item == name:
                renamed[fname] = staging.adopt(staging.final, fname)
                adopted.append(renamed[fname])
                files[renamed[fname]] = frec
        rows = previous.index().get(name, {})
        chunks_by_item[name] = defaultdict(list, {k: [(renamed.get(f, f), c) for f, c in v] for k, v in rows.items()})
    for fname, frec in old.meta_files.items():
        base = fname.rsplit("/", 1)[-1]
        if base in json_files or base in (INDEX, "structure.json") or is_fragment_name(base):
            continue
        meta_files[staging.adopt(staging.final, fname)] = frec
        adopted.append(fname)
    return adopted


MAX_METRIC_DEPTH = 32


def check_metrics(metrics: Any, where: str = "metrics") -> None:
    """Refuse, before anything is written, metrics that a checkpoint could not hold or that
    its readers could not rank: a dict with string keys whose values are JSON values
    (numbers, strings, booleans, None, lists and dicts with string keys; NumPy / JAX
    scalars and arrays as their values), numbers within float range, nesting at most
    ``MAX_METRIC_DEPTH`` deep. NaN and infinities are accepted (a diverged loss must not
    fail a save): they are stored as "nan" / "inf"."""
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{where}: expected a dict of name -> value, got {type(metrics).__name__}")
    stack: list[tuple[Any, str, int]] = []
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: metric name {k!r:.80} is a {type(k).__name__}; names must be strings")
        stack.append((v, k, 1))
    while stack:
        v, name, depth = stack.pop()
        if depth > MAX_METRIC_DEPTH:
            raise CheckpointError(f"{where}: metric {name[:200]!r} is nested more than {MAX_METRIC_DEPTH} deep")
        if isinstance(v, (np.generic, jax.Array, np.ndarray)):
            try:
                v = np.asarray(v)
                if v.dtype.kind not in "biufU":
                    raise TypeError(f"dtype {v.dtype}")
                v = v.tolist() if v.ndim else v.item()
            except Exception as e:  # a typed PRNG key, a deleted buffer, ...
                raise CheckpointError(f"{where}: metric {name[:200]!r} is not JSON-serialisable ({e})") from e
        if v is None or isinstance(v, (bool, str)):
            continue
        if isinstance(v, int):
            try:
                float(v)
            except OverflowError:
                raise CheckpointError(f"{where}: metric {name[:200]!r} is an integer of {v.bit_length()} bits, "
                                      "outside float range (readers rank metrics as floats)") from None
            continue
        if isinstance(v, float):
            continue
        if isinstance(v, (list, tuple)):
            stack.extend((x, f"{name}[{i}]", depth + 1) for i, x in enumerate(v))
            continue
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise CheckpointError(f"{where}: metric {name[:200]!r} has the key {k!r:.80}; keys must be strings")
                stack.append((x, f"{name}.{k}", depth + 1))
            continue
        raise CheckpointError(f"{where}: metric {name[:200]!r} is a {type(v).__name__}, not JSON-serialisable "
                              "(use numbers, strings, booleans, lists or dicts)")


def plain_metrics(metrics: dict) -> dict:
    """The metrics as the manifest stores them (strict JSON). ``check_metrics`` ran on
    every save's metrics; metrics carried over from a previous version are as it read them
    (a hostile one is made safe here: anything unstorable becomes its bounded repr)."""
    out = {}
    for k, v in metrics.items():
        try:
            check_metrics({str(k): v})
            out[str(k)] = _finite_json(json.loads(json_bytes(v, "metrics")))
        except (CheckpointError, RecursionError, ValueError):
            out[str(k)] = _short_repr(v)
    return out


def _short_repr(v: Any) -> str:
    try:
        return reprlib.repr(v)
    except Exception:  # noqa: BLE001
        return f"<{type(v).__name__}>"


def _finite_json(v: Any) -> Any:
    """The manifest is strict JSON: a NaN or infinite metric (a diverged loss) is kept as
    its repr string ("nan", "inf") instead of failing the save."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {k: _finite_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite_json(x) for x in v]
    return v


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
    foreign = [e.name for e in listing if not (e.is_dir and VERSION_DIR.match(e.name))]
    if foreign:
        raise CheckpointError(f"{where} exists and is not a shardckpt checkpoint (no {MANIFEST}; it holds "
                              f"{', '.join(sorted(foreign)[:5])}); refusing to overwrite it: choose an empty "
                              "or new directory")


def as_save_error(e: BaseException, where: str) -> BaseException:
    """Our error for a failed save (KeyboardInterrupt and friends pass through)."""
    if isinstance(e, CheckpointError) or not isinstance(e, Exception):
        return e
    return SaveAbortedError(f"saving {where} failed, nothing was committed: {type(e).__name__}: {e}")


# --- the pipeline ----------------------------------------------------------------------------

def run_save(store: Store, final: str, prepared: tuple, *, coordinator, executor: Executor,
             participant: int = 0, participants: int = 1, replicated: bool = False,
             num_shards: int | None = None, compress: bool = False, progress: bool | None = None,
             commit_args: CommitArgs | None = None) -> Any:
    """Save ``prepared`` (``prepare_items`` output) as checkpoint ``final`` of ``store``;
    returns its location once committed. Every participant of a save calls this."""
    where = store.where(final)
    if participant == 0:
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
