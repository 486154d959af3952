"""The committer: what a coordinator runs once every participant has reported its part.

It checks that the parts agree (each participant describes the same items), gathers their
shard files and chunk records, writes the metadata files and the chunk index (or its
fragments) into the staging area, validates the index with the loader's own validator and
publishes the staging area with the manifest, atomically (the Store decides how). A save
that adds items to a checkpoint (``save_model`` then ``save_optimizer``) carries the
checkpoint's other items over from its newest version, and never loses a concurrent update.
Coordinators receive ``commit`` as a value; they do not import this module.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, defaultdict
from typing import Any

import flax
import jax
import numpy as np

from shardckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, ReplacedWhileReadingError, SaveAbortedError
from shardckpt.format import limits
from shardckpt.format.fragments import dump_directory, dump_fragment, plan_fragments
from shardckpt.format.index import ValidatedRows, check_index, dump_index, index_columns, no_cyclic_gc
from shardckpt.format.manifest import INDEX, MANIFEST, FileRecord, ItemRecord, Manifest
from shardckpt.format.names import fragment_name, is_fragment_name
from shardckpt.format.parts import Carry, CommitArgs, PartReport
from shardckpt.format.shard import ChunkRecord
from shardckpt.format.version import Version, version_id
from shardckpt.release import __version__
from shardckpt.saving.incremental import BaseChanged
from shardckpt.saving.metrics import json_bytes, plain_metrics
from shardckpt.store.base import Staging, Store, VersionChanged

CARRY_OVER_ATTEMPTS = 20
NO_VERSION = "-"


def writer_versions() -> dict[str, str]:
    return {"shardckpt": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__}


def commit(staging: Staging, parts: list[PartReport], args: CommitArgs, *, transaction: str = "") -> None:
    """The committer: check the parts agree, write metadata and index into ``staging``, then
    publish it with the manifest, atomically. Raises (and publishes nothing) on any problem."""
    with no_cyclic_gc():      # 10^6 chunk records from 1,024 parts: no quadratic gen-2 passes
        _commit(staging, parts, args, transaction)


def _commit(staging: Staging, parts: list[PartReport], args: CommitArgs, transaction: str) -> None:
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
    if args.carry:
        carry_files(staging, args.carry, chunks_by_item, files)
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
            previous = committed_version(staging.store, staging.final)
            step, metrics, json_files = args.step, args.metrics, dict(args.json_files or {})
            t_records, t_chunks = dict(records), {n: defaultdict(list, v) for n, v in chunks_by_item.items()}
            t_files, meta_files, adopted = dict(files), {}, []
            if previous is not None:
                try:
                    adopted = carry_over(previous, staging, set(records), json_files, t_records, t_chunks,
                                          t_files, meta_files)
                except ReplacedWhileReadingError:
                    continue          # replaced while its index was read: carry over the new one
                # Adding an item keeps what the checkpoint is listed by (its step and metrics).
                step = previous.manifest.step if step is None else step
                metrics = previous.manifest.metrics if metrics is None else metrics
            if _publish(staging, parts, args, t_records, t_chunks, t_files, meta_files, step, metrics, json_files,
                        transaction, expect=_version_of(previous), token=token):
                return
            # the outdated version's links and this attempt's metadata files go before the retry
            staging.forget({*adopted, *meta_files})
    raise SaveAbortedError(f"saving {where}: the checkpoint was replaced {CARRY_OVER_ATTEMPTS} times by "
                           "other saves while this one carried its other items over; nothing was committed")


def carry_files(staging: Staging, carry: Carry, chunks_by_item: dict, files: dict[str, FileRecord]) -> None:
    """Adopt the files an incremental save carries from its base (a hard link, a server-side
    copy) and add their rows to the index. The base must still be the version whose rows
    were planned once its files are adopted, else ``BaseChanged`` (nothing is committed and
    the save is done again without a base): a replaced base's files are another version's."""
    where = staging.store.where(staging.final)
    renamed = {}
    try:
        for fname, rec in carry.files.items():
            size = staging.store.size(f"{carry.base}/{fname}")
            if size != rec.size:
                raise CorruptCheckpointError(f"{carry.base}/{fname} has {size} bytes, its manifest says {rec.size}")
            renamed[fname] = staging.adopt(carry.base, fname)
    except (OSError, CheckpointError) as e:
        raise BaseChanged(f"saving {where}: the base checkpoint {carry.base} changed while its files were "
                          f"carried ({type(e).__name__}: {e})") from e
    if committed_id(staging.store, carry.base) != carry.base_id:
        raise BaseChanged(f"saving {where}: the base checkpoint {carry.base} was replaced or deleted while its "
                          "files were carried")
    for fname, new in renamed.items():
        if new in files:
            raise SaveAbortedError(f"saving {where}: carried file {new} clashes with a file this save wrote")
        files[new] = carry.files[fname]
    own = _validated_rows(staging.store, carry, renamed)
    for item, by_key in carry.rows.items():
        for key, rows in by_key.items():
            mine = own(item, key)
            chunks_by_item[item][key] = mine if mine is not None else [(renamed[f], c) for f, c in rows]


def _validated_rows(store: Store, carry: Carry, renamed: dict[str, str]):
    """``(item, key) -> ValidatedRows`` of the carried array, or None: the rows of the base
    as this process validated them when it published the base itself (the remembered
    version of id ``carry.base_id``), their files renamed as carried. Only files carried
    with the very size that validation saw take part; the rows planned elsewhere (another
    process's ``Carry``) are never trusted, only used to name the arrays."""
    with _RECENT_LOCK:
        mine = _RECENT.get(store.where(carry.base))
    if mine is None or mine.id != carry.base_id or mine.fragments() is not None:
        return lambda item, key: None
    index, known = mine.index(), mine.manifest
    same = {f for f, new in renamed.items() if f in known.files and carry.files[f].size == known.files[f].size}
    renamed_lists: dict[int, tuple] = {}

    def rows(item: str, key: str) -> ValidatedRows | None:
        table, spec = index.get(item, {}).get(key), known.items[item].arrays.get(key) if item in known.items else None
        if table is None or spec is None:
            return None
        known_list = renamed_lists.get(id(table.files))
        if known_list is None or known_list[0] is not table.files:
            files = [renamed[f] if f in same else None for f in table.files]
            known_list = renamed_lists[id(table.files)] = (table.files, files,
                                                           np.array([f is not None for f in files], dtype=bool))
        _, files, carried = known_list
        if len(table) and not carried[table.fidx].all():
            return None          # a row in a file not carried as validated: checked in full instead
        return ValidatedRows(table, spec, files)
    return rows


def version_reader(store: Store, name: str):
    """How a ``Version`` of checkpoint ``name`` reads the files inside it."""
    return lambda n, limit: store.read_bytes(f"{name}/{n}", limit)


def committed_id(store: Store, name: str) -> str | None:
    """The id of checkpoint ``name``'s committed version (``Version.id``: of its manifest's
    bytes), None if it has none; nothing is parsed (a caller that knows the id of a version
    it validated only asks whether that version is still the one stored)."""
    try:
        return version_id(store.read_bytes(f"{name}/{MANIFEST}", limits.MAX_MANIFEST_BYTES))
    except (OSError, CheckpointError):
        return None


def committed_version(store: Store, name: str) -> Version | None:
    """The committed version of checkpoint ``name`` of ``store``, None if there is none or it
    is ours but damaged (not a checkpoint anyone can load: replaceable)."""
    try:
        return Version(version_reader(store, name), store.where(name))
    except (CheckpointNotFoundError, CorruptCheckpointError):
        return None


#: The versions this process committed last (where -> Version, its index parsed): the base
#: of an incremental save is usually the step committed just before, whose manifest and
#: index need not be read and validated again while its manifest's bytes are unchanged.
_RECENT: OrderedDict[str, Version] = OrderedDict()
_RECENT_LOCK = threading.Lock()
RECENT_VERSIONS = 4


def recent_version(store: Store, name: str) -> Version | None:
    """``committed_version``, served from the versions this process committed when the
    manifest stored now is byte for byte the one it published."""
    with _RECENT_LOCK:
        cached = _RECENT.get(store.where(name))
    if cached is not None:
        try:
            if store.read_bytes(f"{name}/{MANIFEST}", limits.MAX_MANIFEST_BYTES) == cached.raw_manifest:
                return cached
        except (OSError, CheckpointError):
            return None
    return committed_version(store, name)


def remembered_version(store: Store, name: str) -> Version | None:
    """The version this process committed as checkpoint ``name``, if the manifest stored now
    is byte for byte the one it published (the same bytes parse to the same manifest: a
    listing need not parse them again); None otherwise. Reads only the manifest's bytes."""
    with _RECENT_LOCK:
        cached = _RECENT.get(store.where(name))
    if cached is None:
        return None
    try:
        same = store.read_bytes(f"{name}/{MANIFEST}", limits.MAX_MANIFEST_BYTES) == cached.raw_manifest
    except (OSError, CheckpointError):
        return None
    return cached if same else None


def forget_versions() -> None:
    """Forget the versions this process committed (what a fresh process knows)."""
    with _RECENT_LOCK:
        _RECENT.clear()


def _remember(store: Store, name: str, version: Version) -> None:
    with _RECENT_LOCK:
        _RECENT[store.where(name)] = version
        _RECENT.move_to_end(store.where(name))
        while len(_RECENT) > RECENT_VERSIONS:
            _RECENT.popitem(last=False)


def _version_of(version: Version | None) -> str:
    """What identifies one committed version of a checkpoint (its manifest, which names
    the transaction, the creation time and every file's checksum)."""
    if version is None:
        return NO_VERSION
    m = version.manifest
    return json.dumps([m.transaction, m.created, m.step, sorted(m.items),
                       sorted((k, r.size, r.xxh3_64) for k, r in [*m.files.items(), *m.meta_files.items()])])


def _publish(staging: Staging, parts: list[PartReport], args: CommitArgs, records, chunks_by_item, files,
             meta_files, step, metrics, json_files, transaction: str, expect: str | None = None,
             token: Any = None) -> bool:
    """Write the metadata files and the index, then publish with the manifest. With
    ``expect``: only if the checkpoint is still that version (else return False, nothing
    published); ``token`` (``staging.version_token()``) makes the store check it atomically
    where it can (a conditional PUT on object stores)."""
    where = staging.store.where(staging.final)
    for fname, obj in json_files.items():
        data = json_bytes(obj, fname)
        if len(data) > limits.MAX_JSON_BYTES:
            raise SaveAbortedError(f"saving {where}: {fname} would be {len(data)} bytes, over the "
                                   f"{limits.MAX_JSON_BYTES} every load reads; nothing was committed")
        _add_meta(staging, meta_files, fname, data)
    structure = {item: {k: {"shape": list(s.shape), "dtype": s.dtype} for k, s in rec.arrays.items()}
                 for item, rec in records.items()}
    _add_meta(staging, meta_files, "structure.json", json_bytes(structure, "structure.json"))
    index_cols = index_columns(chunks_by_item)     # one pass over the chunk records
    plan = plan_fragments(index_cols, writer_order=[r.file for p in sorted(parts, key=lambda p: p.participant)
                                                    for r in p.reports])
    if plan is None:
        index_rec = _add_meta(staging, meta_files, INDEX, _bounded(dump_index(index_cols), INDEX, where))
    else:   # too big for every reader to read whole: fragments by writer, and their directory
        names = [_add_meta(staging, meta_files, fragment_name(k),
                           _bounded(dump_fragment(index_cols, plan, k), fragment_name(k), where))
                 for k in range(plan.count)]
        index_rec = _add_meta(staging, meta_files, INDEX, _bounded(dump_directory(index_cols, plan, names), INDEX, where))
    writers = {(r.writer.get("node_id") or r.writer.get("host")) for p in parts for r in p.reports}
    manifest = Manifest(step=step, items=records, files=files, meta_files=meta_files,
                        metrics=plain_metrics(metrics or {}), writers=writer_versions(),
                        host_count=len(writers) or 1, transaction=transaction, index_file=index_rec)
    # The index validator is the loader's (the same checks on the columns just serialised):
    # a commit never publishes what a load would refuse.
    tables = check_index(index_cols, manifest, where)
    # ... nor a manifest it would refuse: checked here by the reader's own checks (its size,
    # depth, schema, every shape and name), before anything becomes visible.
    try:
        raw, published = manifest.encode(where)
    except CorruptCheckpointError as e:
        raise SaveAbortedError(f"saving {where}: every load would refuse this checkpoint ({e}); nothing was "
                               "committed (keep metrics and key names small)") from None
    if expect is not None and _version_of(committed_version(staging.store, staging.final)) != expect:
        return False
    try:
        staging.publish(raw, expect=token)
    except VersionChanged:
        return False
    if plan is None:     # the next incremental save's base, most likely
        _remember(staging.store, staging.final, Version(version_reader(staging.store, staging.final), where,
                                                        known=(raw, published, tables)))
    return True


def _bounded(data: bytes, name: str, where: str) -> bytes:
    """An index file no larger than every load reads (``limits.MAX_INDEX_BYTES``)."""
    if len(data) > limits.MAX_INDEX_BYTES:
        raise SaveAbortedError(f"saving {where}: {name} would be {len(data)} bytes, over the "
                               f"{limits.MAX_INDEX_BYTES} every load reads; nothing was committed")
    return data


def _add_meta(staging: Staging, meta_files: dict, name: str, data: bytes) -> str:
    written = staging.write_bytes(name, data)
    meta_files[written.name] = FileRecord(written.size, written.xxh3_64)
    return written.name


def carry_over(previous: Version, staging: Staging, items: set, json_files: dict, manifest_items,
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
