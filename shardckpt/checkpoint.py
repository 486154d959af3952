"""One checkpoint directory: the save transaction and the validated reader.

``save_checkpoint`` runs the data flow of the design: flatten -> plan -> executor writes
shards -> commit (index, manifest last, fsync, rename). ``Checkpoint`` opens a committed
directory, validates its manifest and index as untrusted input and restores items into
targets (abstract or concrete trees), reading only the chunks the target needs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from . import __version__
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                     SaveAbortedError, StructureMismatchError)
from .executors.base import Executor, ReadJob, ReadTarget
from .format import (INDEX, MANIFEST, FileRecord, ItemRecord, Manifest, check_file_name,
                     dump_index, load_index)
from .plan import box_overlap, default_num_shards, plan_save
from .progress import byte_progress
from .shard_io import ChunkRecord, ShardReport
from .storage import (fsync_path, hidden_name, open_data_file, publish_dir, read_small_file,
                      remove_tree, write_file_durable)
from .tree import ArraySpec, FlatTree, decode_scalar, decode_stored, is_prng_key, split_values

MAX_JSON_BYTES = 64 << 20
READ_ATTEMPTS = 10


class ReplacedWhileReadingError(CheckpointNotFoundError):
    """The checkpoint being read was replaced by another save of the same path, or deleted
    by retention, in another process meanwhile. The version that was opened is gone;
    nothing read from it is returned. The load functions retry on it (``read_consistently``)."""


def read_consistently(load: Callable[[], Any]) -> Any:
    """Run ``load`` (open a checkpoint path and read from it) again when another process
    replaced the checkpoint while it ran: the caller gets one whole version, the old one or
    the new one, never a mix; CheckpointNotFoundError if it was deleted."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return load()
        except ReplacedWhileReadingError:
            if attempt + 1 == READ_ATTEMPTS:
                raise
REPLICATED_SHARDS_PER_PARTICIPANT = 2


def _writer_versions() -> dict[str, str]:
    import flax
    return {"shardckpt": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__}


def _json_bytes(obj: Any, name: str) -> bytes:
    try:
        return json.dumps(obj, indent=1, default=_json_default, allow_nan=True).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: value is not JSON-serialisable ({e})") from e


def _json_default(o: Any):
    if isinstance(o, (np.generic, jax.Array)) and np.ndim(o) == 0:
        return np.asarray(o).item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def default_executor() -> Executor:
    from .executors.local import ThreadExecutor
    return ThreadExecutor()


# --- save ----------------------------------------------------------------------------------

@dataclass
class PartReport:
    """One participant's contribution to a save: what its items hold (specs and scalar
    leaves, the same on every participant) and the reports of the shards it wrote."""

    participant: int
    items: dict[str, ItemRecord]
    reports: list[ShardReport]
    item_of_file: dict[str, str]


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
              participants: int = 1, replicated: bool = False) -> list[tuple[str, Any]]:
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
        if replicated and participants > 1:
            plans = plan_save(name, arrays, n * participants)
            out.extend((name, plan) for i, plan in enumerate(plans) if i % participants == participant)
        else:
            plans = plan_save(name, arrays, n, process_index=participant, process_count=participants)
            out.extend((name, plan) for plan in plans)
    return out


def write_part(tmp: Path, entries: dict[str, list], records: dict[str, ItemRecord], executor: Executor,
               *, num_shards: int | None = None, compress: bool = False, progress: bool | None = None,
               participant: int = 0, participants: int = 1, replicated: bool = False) -> PartReport:
    workers = getattr(executor, "num_workers", 1) or 1
    planned = plan_part(entries, num_shards, workers, participant=participant,
                        participants=participants, replicated=replicated)
    total = sum(plan.nbytes for _, plan in planned)
    with byte_progress(f"saving {tmp.name}", total, progress) as advance:
        reports = executor.write_shards(tmp, [plan for _, plan in planned], compress=compress,
                                        progress=advance)
    expected = {plan.file for _, plan in planned}
    got = [r.file for r in reports]
    if sorted(got) != sorted(expected):
        raise SaveAbortedError(f"saving {tmp}: writers did not report "
                               f"{sorted(expected - set(got)) or 'as planned'}")
    return PartReport(participant, records, reports, {plan.file: item for item, plan in planned})


_UNSET = object()


def commit_parts(final: Path, tmp: Path, parts: list[PartReport], *, step: int | None,
                 json_files: dict[str, Any] | None, metrics: dict | None,
                 keep_other_items: bool = False, transaction: str = "", name_prefix: str = "",
                 publish: Callable[[Path, Path], None] = publish_dir, previous: Any = _UNSET) -> Path:
    """The committer: check the parts agree, write metadata, index and manifest last, then
    publish ``tmp`` as ``final`` atomically. Raises (and publishes nothing) on any problem.

    ``name_prefix`` and ``publish`` serve remote checkpoints: the manifest names files under
    a version prefix and ``publish`` uploads them, the manifest last (remote.py).
    """
    if previous is _UNSET:
        previous = _existing_checkpoint(final)
    records: dict[str, ItemRecord] = {}
    for part in sorted(parts, key=lambda p: p.participant):
        for name, rec in part.items.items():
            if name not in records:
                records[name] = rec
            elif records[name].to_json() != rec.to_json():
                raise SaveAbortedError(f"saving {final}: participants disagree on the structure of "
                                       f"{name!r} (participant {part.participant} differs)")
    chunks_by_item: dict[str, dict[str, list[tuple[str, ChunkRecord]]]] = {n: defaultdict(list) for n in records}
    files: dict[str, FileRecord] = {}
    for part in parts:
        for r in part.reports:
            if r.file in files:
                raise SaveAbortedError(f"saving {final}: shard {r.file} was reported twice")
            item = part.item_of_file[r.file]
            files[name_prefix + r.file] = FileRecord(r.size, r.xxh3_64, item, r.writer)
            for c in r.chunks:
                chunks_by_item[item][c.key].append((name_prefix + r.file, c))
    meta_files: dict[str, FileRecord] = {}
    if keep_other_items and previous is not None:
        _carry_over(previous, tmp, set(records), json_files or {}, records, chunks_by_item, files, meta_files,
                    link=not name_prefix)
        # Adding an item keeps what the checkpoint is listed by (its step and metrics).
        step = previous.step if step is None else step
        metrics = previous.metrics if metrics is None else metrics
    for fname, obj in (json_files or {}).items():
        data = _json_bytes(obj, fname)
        write_file_durable(tmp / fname, data)
        meta_files[name_prefix + fname] = _record_of(data)
    structure = {item: {k: {"shape": list(s.shape), "dtype": s.dtype} for k, s in rec.arrays.items()}
                 for item, rec in records.items()}
    data = _json_bytes(structure, "structure.json")
    write_file_durable(tmp / "structure.json", data)
    meta_files[name_prefix + "structure.json"] = _record_of(data)
    index = dump_index({k: dict(v) for k, v in chunks_by_item.items()})
    # The index validator is the loader's: a commit never publishes what a load would refuse.
    write_file_durable(tmp / INDEX, index)
    meta_files[name_prefix + INDEX] = _record_of(index)
    manifest = Manifest(step=step, items=records, files=files, meta_files=meta_files,
                        metrics=_plain_metrics(metrics or {}), writers=_writer_versions(),
                        host_count=len({(r.writer.get("node_id") or r.writer.get("host")) for p in parts for r in p.reports}) or 1,
                        transaction=transaction, index_file=name_prefix + INDEX)
    load_index(index, manifest, str(final))
    write_file_durable(tmp / MANIFEST, manifest.dumps())
    publish(tmp, final)
    return final


def save_checkpoint(final: os.PathLike | str, items: dict[str, Any], *, step: int | None = None,
                    json_files: dict[str, Any] | None = None, metrics: dict | None = None,
                    num_shards: int | None = None, compress: bool = False,
                    executor: Executor | None = None, progress: bool | None = None,
                    keep_other_items: bool = False, prepared: tuple | None = None) -> Path:
    """Write ``items`` (name -> pytree) as a committed checkpoint at ``final``.

    The checkpoint appears atomically, complete or not at all. An existing checkpoint at
    ``final`` is replaced only once the new one is durable; with ``keep_other_items`` its
    items and metadata files that this save does not rewrite are carried over (hard links,
    no data copied), which is how ``save_model`` + ``save_optimizer`` build one checkpoint.
    Executors with a coordinator (Ray) run the same phases as a distributed transaction.
    ``prepared`` is ``prepare_items(items)`` taken earlier (async saves).
    """
    entries, records = prepared if prepared is not None else prepare_items(items)
    from .remote import is_remote, save_remote
    if is_remote(final):
        return save_remote(str(final), entries, records, step=step, json_files=json_files, metrics=metrics,
                           num_shards=num_shards, compress=compress, progress=progress,
                           keep_other_items=keep_other_items)
    final = Path(final).absolute()
    _existing_checkpoint(final)  # refuse early to replace a directory that is not ours
    executor = executor or default_executor()
    if hasattr(executor, "save_transaction"):
        return executor.save_transaction(final, entries, records, step=step, json_files=json_files,
                                         metrics=metrics, num_shards=num_shards, compress=compress,
                                         progress=progress, keep_other_items=keep_other_items)
    tmp = hidden_name(final, "tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:   # a full disk, a read-only or foreign directory
        raise as_save_error(e, final) from e
    try:
        part = write_part(tmp, entries, records, executor, num_shards=num_shards, compress=compress,
                          progress=progress)
        return commit_parts(final, tmp, [part], step=step, json_files=json_files, metrics=metrics,
                            keep_other_items=keep_other_items)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_save_error(e, final) from e


def as_save_error(e: BaseException, final: Path) -> BaseException:
    """Our error for a failed save (KeyboardInterrupt and friends pass through)."""
    if isinstance(e, CheckpointError) or not isinstance(e, Exception):
        return e
    return SaveAbortedError(f"saving {final} failed, nothing was committed: {type(e).__name__}: {e}")


def _record_of(data: bytes) -> FileRecord:
    import xxhash
    return FileRecord(len(data), xxhash.xxh3_64(data).hexdigest())


def _plain_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = _finite_json(json.loads(_json_bytes(v, "metrics")))
        except CheckpointError:
            out[str(k)] = repr(v)
    return out


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


def _existing_checkpoint(final: Path) -> "Checkpoint | None":
    """The committed checkpoint at ``final``, None if nothing is there; refuses to replace a
    directory that holds something other than a checkpoint (user files are never lost)."""
    if not final.exists():
        return None
    if not final.is_dir():
        raise CheckpointError(f"{final} exists and is not a directory; refusing to overwrite it")
    if (final / MANIFEST).exists():
        try:
            return Checkpoint(final)
        except CorruptCheckpointError:
            return None   # ours, but damaged: not a checkpoint anyone can load; replaceable
    if any(final.iterdir()):
        raise CheckpointError(f"{final} exists and is not a shardckpt checkpoint (no {MANIFEST}); "
                              "refusing to overwrite it: choose an empty or new directory")
    return None


def _carry_over(previous: "Checkpoint", tmp: Path, items: dict, json_files: dict, manifest_items,
                chunks_by_item, files, meta_files, *, link: bool = True) -> None:
    """Hard-link the previous checkpoint's other items and metadata into ``tmp`` (remote
    checkpoints, ``link=False``: keep referring to the previous version's objects)."""
    old = previous.manifest
    for name, rec in old.items.items():
        if name in items:
            continue
        manifest_items[name] = rec
        rows = previous.index().get(name, {})
        chunks_by_item[name] = defaultdict(list, {k: list(v) for k, v in rows.items()})
        for fname, frec in old.files.items():
            if frec.item == name:
                if link:
                    _link_or_copy(previous.path / fname, tmp / fname)
                files[fname] = frec
    for fname, frec in old.meta_files.items():
        base = fname.rsplit("/", 1)[-1]
        if base in json_files or base == INDEX or base == "structure.json":
            continue
        if link:
            _link_or_copy(previous.path / fname, tmp / fname)
        meta_files[fname] = frec


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        fsync_path(dst)


# --- restore ---------------------------------------------------------------------------------

@dataclass
class RestoreReport:
    """What a restore did with each key of the target."""

    restored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # in the target, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint, not in the target
    mismatched: list[str] = field(default_factory=list)   # shape/dtype differ ("key: why")
    chunks_read: int = 0                                    # chunk reads (whole or partial)
    bytes_read: int = 0                                     # bytes copied out of the files

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, keys in (("missing from the checkpoint", self.missing),
                            ("not in the target", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


Box = tuple[tuple[int, ...], tuple[int, ...]]   # (offset, shape) in stored coordinates
HOST_ALIGN = 64     # XLA's CPU client adopts host buffers aligned to this without copying


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data is HOST_ALIGN-aligned, so ``jax.device_put(...,
    may_alias=True)`` on CPU wraps it instead of copying: restore copies each byte once
    (file -> this buffer) and peaks at the state's size, not twice it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGN, np.uint8)
    start = (-raw.ctypes.data) % HOST_ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _target_sharding(value: Any):
    sharding = getattr(value, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.Sharding) else None


def concrete_sharding(sharding: Any, key: str, where: str):
    """A sharding on real devices: an abstract target from ``nnx.eval_shape`` under
    ``jax.sharding.set_mesh`` names an AbstractMesh, bound here to the mesh in force."""
    if sharding is None or not isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
        return sharding
    mesh = jax.sharding.get_mesh()
    if mesh is None or getattr(mesh, "empty", False) or dict(mesh.shape) != dict(sharding.mesh.shape):
        raise StructureMismatchError(
            f"{where}: {key!r} targets an abstract mesh {dict(sharding.mesh.shape)}; restore under "
            "`with jax.sharding.set_mesh(mesh):` with that mesh, or pass shardings=")
    return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def sharding_resolver(shardings: Any) -> Callable[[str], Any]:
    """``shardings=`` as key -> Sharding: one Sharding for all, a dict by dotted key, a
    callable, or a pytree shaped like the target (e.g. ``nnx.get_named_sharding``)."""
    if shardings is None:
        return lambda key: None
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda key: shardings
    if callable(shardings) and not isinstance(shardings, dict):
        return shardings
    if isinstance(shardings, dict) and all(isinstance(k, str) and "." in k for k in shardings):
        return shardings.get
    by_key = {k: v for k, v in FlatTree.of(shardings).values().items()
              if isinstance(v, jax.sharding.Sharding)}
    return by_key.get


def _full_box(spec: ArraySpec) -> Box:
    return (0,) * len(spec.stored_shape), tuple(spec.stored_shape)


def device_boxes(spec: ArraySpec, sharding) -> dict[Any, Box]:
    """The stored-coordinate box each addressable device of ``sharding`` needs (key data
    arrays carry their trailing key dimension whole)."""
    extra = tuple(spec.stored_shape[len(spec.shape):])
    out = {}
    for device, index in sharding.addressable_devices_indices_map(spec.shape).items():
        starts, sizes = [], []
        for sl, dim in zip(index, spec.shape):
            start, stop, _ = sl.indices(dim)
            starts.append(start)
            sizes.append(stop - start)
        out[device] = (tuple(starts) + (0,) * len(extra), tuple(sizes) + extra)
    return out


def _to_real(spec: ArraySpec, stored: np.ndarray, target: Any, what: str = ""):
    """Stored bits -> the real dtype, then the target's dtype if it differs."""
    value = decode_stored(spec, stored, what)
    tdtype = getattr(target, "dtype", None)
    if spec.key_impl is None and tdtype is not None and np.dtype(tdtype) != value.dtype:
        tdtype = np.dtype(tdtype)
        untyped = value.dtype.kind == "V" and value.dtype.itemsize == tdtype.itemsize
        value = value.view(tdtype) if untyped else value.astype(tdtype)
    return value


class Checkpoint:
    """A committed checkpoint directory, opened and validated for reading."""

    legacy = False

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.where = str(self.path)
        if not self.path.is_dir():
            raise CheckpointNotFoundError(f"{self.path}: no such checkpoint directory")
        self._open()

    def _open(self) -> None:
        try:
            raw = read_small_file(self.path / MANIFEST, 256 << 20, self.where)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{self.path}: no {MANIFEST}; this directory is not a "
                                          "committed checkpoint") from e
        self.manifest = Manifest.loads(raw, self.where)
        self._manifest_raw = raw     # what this object reads; see _raise_if_replaced
        self._index = None
        nested = [n for n in list(self.manifest.files) + list(self.manifest.meta_files) if "/" in n]
        if nested:  # version prefixes belong to remote checkpoints only
            raise CorruptCheckpointError(f"{self.where}: file name {nested[0]!r} is not a plain name in "
                                         "the checkpoint directory; refusing it")

    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def items(self) -> list[str]:
        return list(self.manifest.items)

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics

    def index(self) -> dict[str, dict[str, list[tuple[str, ChunkRecord]]]]:
        if self._index is None:
            name = self.manifest.index_file
            raw = self._read_meta(name, 2 << 30)
            self._index = load_index(raw, self.manifest, self.where)
        return self._index

    def _read_meta(self, name: str, limit: int) -> bytes:
        import xxhash
        check_file_name(name, self.where)
        rec = self.manifest.meta_files.get(name)
        if rec is None:
            raise CorruptCheckpointError(f"{self.where}: {name} is not listed in the manifest")
        try:
            raw = read_small_file(self.path / name, limit, self.where)
        except FileNotFoundError as e:
            self._raise_if_replaced(e)
            raise CorruptCheckpointError(f"{self.where}: {name} is missing") from e
        if len(raw) != rec.size or xxhash.xxh3_64(raw).hexdigest() != rec.xxh3_64:
            self._raise_if_replaced(None)
            raise CorruptCheckpointError(f"{self.where}: {name} does not match its checksum in the manifest")
        return raw

    def _raise_if_replaced(self, cause: BaseException | None) -> None:
        """Raise ``ReplacedWhileReadingError`` if ``self.path`` no longer holds the manifest
        this object opened: another process replaced the checkpoint (a new save of the same
        path) or deleted it (retention) while it was read, so the files read may belong to
        two versions, or be gone. Files are read by path, and a replacement swaps the whole
        directory at once: no file of the other version is ever checked against the wrong
        manifest without this noticing."""
        raw = getattr(self, "_manifest_raw", None)
        if raw is None:
            return
        try:
            now = read_small_file(self.path / MANIFEST, 256 << 20, self.where)
        except (OSError, CheckpointError):
            now = None
        if now != raw:
            what = "deleted" if now is None else "replaced by another save"
            raise ReplacedWhileReadingError(f"{self.where} was {what} while being read; nothing read from "
                                            "it is used (open it again)") from cause

    def meta_name(self, name: str) -> str | None:
        """The stored name of metadata file ``name`` (remote checkpoints keep it under a
        version prefix), or None if the checkpoint has none."""
        if name in self.manifest.meta_files:
            return name
        found = [n for n in self.manifest.meta_files if n.rsplit("/", 1)[-1] == name]
        return found[0] if len(found) == 1 else None

    def read_json(self, name: str, default: Any = None) -> Any:
        """A JSON metadata file of the checkpoint (``config.json``, ``extra.json``...)."""
        stored = self.meta_name(name)
        if stored is None:
            return default
        raw = self._read_meta(stored, MAX_JSON_BYTES)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{self.where}: {name} is not valid JSON ({e})") from e

    def read_config(self) -> dict:
        """``config.json`` as a dict (empty when absent or null); anything else is refused."""
        cfg = self.read_json("config.json", {})
        if cfg is None:
            return {}
        if not isinstance(cfg, dict):
            raise CorruptCheckpointError(f"{self.where}: config.json holds a {type(cfg).__name__}, "
                                         "not a JSON object")
        return cfg

    def restore(self, item: str, target: Any, *, strict: bool = True, verify: bool = True,
                executor: Executor | None = None, progress: bool | None = None,
                select: Callable[[str], bool] | None = None,
                shardings: Any = None) -> tuple[Any, RestoreReport]:
        """Restore ``item`` into the structure of ``target`` (abstract or concrete).

        Keys are matched by name. With ``strict`` any key missing, unexpected or of another
        shape raises ``StructureMismatchError``; otherwise such leaves keep the target's
        value and the report lists them. ``select(key)`` limits the keys read (the others
        keep the target's value). Arrays land on ``shardings`` (see ``sharding_resolver``)
        or else on the target leaf's own sharding (a concrete array's, or an abstract
        ``ShapeDtypeStruct``'s from ``nnx.eval_shape`` under a mesh); each device's slice is
        assembled from the chunks it overlaps, read from the files in place.
        """
        resolve = sharding_resolver(shardings)
        rec = self.item_record(item)
        flat = FlatTree.of(target)
        values = flat.values()
        report = RestoreReport()
        wanted: dict[str, tuple[ArraySpec, Any]] = {}
        new_values = dict(values)
        for key, tv in values.items():
            if select is not None and not select(key):
                continue
            if key in rec.arrays:
                spec = rec.arrays[key]
                why = _mismatch(spec, tv)
                if why:
                    report.mismatched.append(f"{key}: {why}")
                else:
                    wanted[key] = (spec, tv)
            elif key in rec.scalars:
                new_values[key] = decode_scalar(key, rec.scalars[key])
                report.restored.append(key)
            else:
                report.missing.append(key)
        report.unexpected = [k for k in list(rec.arrays) + list(rec.scalars)
                             if k not in values and (select is None or select(k))]
        if strict and not report.complete:
            raise StructureMismatchError(f"{self.where}: item {item!r} does not match the target: "
                                         + report.describe())
        # Each device gets only its box: read the boxes the addressable devices need (once per
        # distinct box), never the whole array on a host that holds only a slice.
        placement, requests = {}, {}
        for key, (spec, tv) in wanted.items():
            sharding = concrete_sharding(resolve(key) or _target_sharding(tv), key, self.where)
            if sharding is not None and not isinstance(tv, (np.ndarray, np.generic)) and len(sharding.device_set) > 1:
                boxes = device_boxes(spec, sharding)
                placement[key] = (sharding, boxes)
                requests[key] = sorted(set(boxes.values()))
            else:
                placement[key] = (sharding, None)
                requests[key] = [_full_box(spec)]
        self.last_read = (0, 0)
        host = self._read_boxes(item, {k: s for k, (s, _) in wanted.items()}, requests, verify, executor, progress)
        report.chunks_read, report.bytes_read = self.last_read
        for key, (spec, tv) in wanted.items():
            sharding, boxes = placement[key]
            pieces = host.pop(key)
            if boxes is None:
                value = _to_real(spec, pieces[_full_box(spec)], tv, f"{self.where}: array {key!r}")
                if isinstance(tv, (np.ndarray, np.generic)):
                    new_values[key] = np.asarray(value)
                else:
                    # may_alias: a 64-byte aligned host buffer becomes the CPU array without a copy
                    new_values[key] = jax.device_put(value, sharding, may_alias=True)
            else:
                per_device = [jax.device_put(_to_real(spec, pieces[box], tv, f"{self.where}: array {key!r}"), device, may_alias=True)
                              for device, box in boxes.items()]
                new_values[key] = jax.make_array_from_single_device_arrays(spec.shape, sharding, per_device)
            report.restored.append(key)
        return flat.rebuild(new_values), report

    def item_record(self, item: str) -> ItemRecord:
        if item not in self.items:
            raise StructureMismatchError(f"{self.where}: checkpoint has no {item!r} (it has "
                                         f"{', '.join(self.items) or 'nothing'})")
        return self.manifest.items[item]

    def read_arrays(self, item: str, keys: list[str] | None = None, *, verify: bool = True,
                    executor: Executor | None = None) -> dict[str, Any]:
        """Host arrays of ``item`` in their real dtypes (PRNG keys as typed key arrays)."""
        rec = self.item_record(item)
        specs = {k: s for k, s in rec.arrays.items() if keys is None or k in keys}
        raw = self._read_arrays(item, specs, verify, executor, None)
        return {k: decode_stored(specs[k], raw[k], f"{self.where}: array {k!r}") for k in specs}

    def _read_arrays(self, item: str, specs: dict[str, ArraySpec], verify: bool,
                     executor: Executor | None, progress: bool | None) -> dict[str, np.ndarray]:
        """Whole arrays (stored dtype) of ``item``."""
        boxes = self._read_boxes(item, specs, {k: [_full_box(s)] for k, s in specs.items()},
                                 verify, executor, progress)
        return {k: boxes[k][_full_box(s)] for k, s in specs.items()}

    def _read_boxes(self, item: str, specs: dict[str, ArraySpec], requests: dict[str, list[Box]],
                    verify: bool, executor: Executor | None, progress: bool | None) -> dict[str, dict[Box, np.ndarray]]:
        """``_read_boxes_of_this_version``, then make sure no other process replaced or
        deleted the checkpoint meanwhile (else ``ReplacedWhileReadingError``, never a mix of
        two versions, also with ``verify=False``)."""
        try:
            out = self._read_boxes_of_this_version(item, specs, requests, verify, executor, progress)
        except CheckpointError as e:
            self._raise_if_replaced(e)
            raise
        if specs:
            self._raise_if_replaced(None)
        return out

    def _read_boxes_of_this_version(self, item: str, specs: dict[str, ArraySpec], requests: dict[str, list[Box]],
                                    verify: bool, executor: Executor | None,
                                    progress: bool | None) -> dict[str, dict[Box, np.ndarray]]:
        """Allocate each requested box once and fill it from the chunks it overlaps (only
        those), file by file, in parallel."""
        if not specs:
            return {}
        index = self.index()[item]
        executor = executor or default_executor()
        # Sizes against the real files before anything is allocated: the index's bounds
        # checks hold against the manifest's sizes, which a hostile manifest could inflate.
        self._check_file_sizes({f for key in specs for f, _ in index[key]},
                               must_exist=getattr(executor, "name", "") == "threads")
        out: dict[str, dict[Box, np.ndarray]] = {}
        jobs: dict[str, ReadJob] = {}
        total = 0
        for key, spec in specs.items():
            dtype = np.dtype(spec.stored_dtype)
            out[key] = {}
            for box in requests[key]:
                dest = aligned_empty(box[1], dtype)
                out[key][box] = dest
                total += dest.nbytes
                for fname, chunk in index[key]:
                    target = _chunk_target(chunk, dest, box)
                    if target is None:
                        continue
                    job = jobs.get(fname)
                    if job is None:
                        job = jobs[fname] = ReadJob(self.path / fname, fname, self.manifest.files[fname].size)
                    job.targets.append(target)
        with byte_progress(f"loading {self.path.name}", total, progress) as advance:
            executor.read(list(jobs.values()), verify=verify, progress=advance)
        self.last_read = (sum(len(j.targets) for j in jobs.values()), sum(j.nbytes for j in jobs.values()))
        return out

    def _check_file_sizes(self, names: set[str], *, must_exist: bool) -> None:
        for fname in sorted(names):
            try:
                st = os.lstat(self.path / fname)
            except FileNotFoundError:
                if must_exist:
                    raise CorruptCheckpointError(f"{self.where}: shard file {fname} is missing") from None
                continue  # not visible here (node-local storage): the reader there checks it
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(f"{self.where}: shard file {fname} is not a regular file "
                                             "(a symlink?); refusing it")
            expected = self.manifest.files[fname].size
            if st.st_size != expected:
                raise CorruptCheckpointError(f"{self.where}: {fname} is {st.st_size} bytes, the manifest "
                                             f"says {expected}")


def _chunk_target(chunk: ChunkRecord, dest: np.ndarray, box: Box) -> ReadTarget | None:
    """How ``chunk`` fills the part of ``dest`` (holding ``box``) it overlaps: a direct read
    when the chunk lies whole in a contiguous region, else a copy of the overlap."""
    hit = box_overlap(chunk.offset, chunk.shape, box[0], box[1])
    if hit is None:
        return None
    offset, shape = hit
    dest_sl = tuple(slice(o - b, o - b + n) for o, b, n in zip(offset, box[0], shape))
    view = dest[dest_sl] if dest_sl else dest
    whole = shape == tuple(chunk.shape)
    if whole and view.flags.c_contiguous:
        return ReadTarget(chunk, view)
    sub = tuple(slice(o - c, o - c + n) for o, c, n in zip(offset, chunk.offset, shape))
    return ReadTarget(chunk, view, sub=sub)


def _mismatch(spec: ArraySpec, target: Any) -> str | None:
    shape = getattr(target, "shape", None)
    if shape is None:
        return f"saved an array {spec.shape} {spec.dtype}, target holds {type(target).__name__}"
    if tuple(shape) != spec.shape:
        return f"saved shape {spec.shape}, target shape {tuple(shape)}"
    target_is_key = is_prng_key(target)
    if target_is_key != (spec.key_impl is not None):
        return f"saved dtype {spec.dtype}, target dtype {target.dtype}"
    return None


def open_checkpoint(path: os.PathLike | str, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a committed shardckpt checkpoint, or a directory in the guide's single-file
    layout (``model.npz``, ``optimizer.npz``, ``config.json``) read-only, or a remote
    checkpoint (``s3://...``, see remote.py)."""
    from .remote import RemoteCheckpoint, is_remote
    if is_remote(path):
        return RemoteCheckpoint(str(path))
    p = Path(path)
    if p.is_dir() and not (p / MANIFEST).exists():
        from .legacy import LegacyCheckpoint, is_legacy_dir
        if is_legacy_dir(p):
            return LegacyCheckpoint(p, allow_pickle=allow_pickle)
    return Checkpoint(p)
