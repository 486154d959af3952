"""Reading a committed checkpoint from any Store: the validated reader.

``Checkpoint`` opens a committed checkpoint, validates its manifest and index as untrusted
input and restores items into targets (abstract or concrete trees), reading only the chunks
the target needs: each device's box is assembled from the chunks it overlaps, through the
executor (threads here, reader actors on Ray), with ranged reads on any store. A checkpoint
that another process replaces or deletes while it is read raises
``ReplacedWhileReadingError`` (the load functions retry, ``read_consistently``): a load
returns one whole version, never a mix.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from shardckpt.errors import CheckpointError, CorruptCheckpointError, ReplacedWhileReadingError, StructureMismatchError
from shardckpt.executors.base import Reader, ReadJob
from shardckpt.executors.threads import ThreadExecutor
from shardckpt.format import limits
from shardckpt.format.index import ChunkTable
from shardckpt.format.manifest import ItemRecord
from shardckpt.format.version import Version
from shardckpt.loading.geometry import Box, aligned_empty, chunk_target, concrete_sharding, device_boxes, full_box, sharding_resolver
from shardckpt.progress import byte_progress
from shardckpt.store.base import Store
from shardckpt.store.registry import resolve
from shardckpt.tree import (
    ArraySpec,
    FlatTree,
    bounded,
    decode_scalar,
    decode_stored,
    is_array_like,
    is_prng_key,
    lossless_cast,
    summarize,
)
from shardckpt.workers import run_all

READ_ATTEMPTS = 10


def read_consistently(load: Callable[[], Any]) -> Any:
    """Run ``load`` (open a checkpoint and read from it) again when another process
    replaced the checkpoint while it ran: the caller gets one whole version, the old one or
    the new one, never a mix; CheckpointNotFoundError if it was deleted."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return load()
        except ReplacedWhileReadingError:
            if attempt + 1 == READ_ATTEMPTS:
                raise


def default_executor() -> Reader:
    return ThreadExecutor()


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

    def describe(self, limit: int = 12) -> str:
        """The keys missing, unexpected and mismatched, at most ``limit`` of each."""
        parts = []
        for label, keys in (("missing from the checkpoint", self.missing),
                            ("not in the target", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                parts.append(f"{label}: {bounded(keys, limit)}")
        return "; ".join(parts)


def _target_sharding(value: Any):
    sharding = getattr(value, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.Sharding) else None


def _to_real(spec: ArraySpec, stored: np.ndarray, target: Any, what: str = "",
             casts: dict[tuple[str, str], list[str]] | None = None, key: str = ""):
    """Stored bits -> the real dtype, then the target's dtype if it differs. A lossy cast
    (``lossless_cast`` is False: float32 -> float16, float -> int) is noted in ``casts``
    (dtype pair -> keys) for one warning per pair; a lossless one (bfloat16 -> float32) is
    silent. The original layout's raw ``V2`` bytes are viewed as the target's dtype."""
    value = decode_stored(spec, stored, what)
    tdtype = getattr(target, "dtype", None)
    if spec.key_impl is None and tdtype is not None and np.dtype(tdtype) != value.dtype:
        tdtype = np.dtype(tdtype)
        if value.dtype.type is np.void and value.dtype.itemsize == tdtype.itemsize:
            return value.view(tdtype)          # untyped bytes (the original's bfloat16): their meaning
        if casts is not None and not lossless_cast(value.dtype, tdtype):
            keys = casts.setdefault((value.dtype.name, tdtype.name), [])
            if key not in keys:
                keys.append(key)
        value = value.astype(tdtype)
    return value


class Checkpoint:
    """A committed checkpoint, opened and validated for reading: ``Checkpoint(path)`` for a
    path or URI, ``Checkpoint.at(store, name)`` inside a store."""

    legacy = False

    def __init__(self, path: Any = None, *, filesystem: Any = None, at: tuple[Store, str] | None = None):
        store, name = at if at is not None else resolve(path, filesystem)
        self.store, self.name = store, name
        self.path = store.location(name)       # a Path on a local disk, a URI elsewhere
        self.where = store.where(name)
        self._open()

    @classmethod
    def at(cls, store: Store, name: str) -> Checkpoint:
        """Checkpoint ``name`` of ``store``."""
        return cls(at=(store, name))

    def _open(self) -> None:
        self.committed = Version(lambda n, limit: self.store.read_bytes(f"{self.name}/{n}", limit), self.where)
        self.manifest = self.committed.manifest
        self.version = self.committed.id

    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def items(self) -> list[str]:
        return list(self.manifest.items)

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics

    def index(self) -> dict[str, dict[str, ChunkTable]]:
        """The validated chunk index: item -> key -> ``ChunkTable`` (a sequence of ``(file,
        ChunkRecord)`` with ``overlapping(offset, shape)``), parsed once."""
        return self.committed.index()

    def chunk_tables(self, item: str, requests: dict[str, list[Box]]) -> dict[str, ChunkTable]:
        """The chunks of ``item``'s arrays that can meet the requested boxes (key -> boxes),
        validated: from a fragmented index only the fragments holding them are read."""
        return self.committed.chunk_tables(item, requests)

    @property
    def index_bytes_read(self) -> int:
        """Bytes of chunk index (directory and fragments, or the one file) read so far."""
        return self.committed.index_bytes_read

    def raise_if_replaced(self, cause: BaseException | None) -> None:
        """``ReplacedWhileReadingError`` if another process replaced or deleted the checkpoint
        since it was opened (see ``format.version``)."""
        self.committed.raise_if_replaced(cause)

    def meta_name(self, name: str) -> str | None:
        """The stored name of metadata file ``name``, or None if the checkpoint has none."""
        return self.committed.meta_name(name)

    def read_json(self, name: str, default: Any = None) -> Any:
        """A JSON metadata file of the checkpoint (``config.json``, ``extra.json``...)."""
        stored = self.meta_name(name)
        if stored is None:
            return default
        raw = self.committed.read_meta(stored, limits.MAX_JSON_BYTES)
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
                executor: Reader | None = None, progress: bool | None = None,
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
        casts: dict[tuple[str, str], list[str]] = {}     # lossy casts: (from, to) -> keys, warned once each
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
                value = decode_scalar(key, rec.scalars[key], self.where)
                if not is_array_like(tv):
                    new_values[key] = value
                    report.restored.append(key)
                    continue
                # never a Python scalar (or a hostile string) where the target holds an array: a
                # number fits a 0-d target (jax.eval_shape makes Python numbers 0-d) if exact
                fit = _scalar_as_array(value, tv)
                if fit is None:
                    report.mismatched.append(f"{key}: saved a Python {type(value).__name__} scalar, the target "
                                             f"holds an array {tuple(tv.shape)} {tv.dtype}")
                    continue
                exact, rounded = fit
                if rounded:
                    casts.setdefault((f"Python {type(value).__name__}", exact.dtype.name), []).append(key)
                if isinstance(tv, (np.ndarray, np.generic)):
                    new_values[key] = exact
                    report.restored.append(key)
                else:
                    sharding = concrete_sharding(resolve(key) or _target_sharding(tv), key, self.where)
                    new_values[key] = jax.device_put(exact, sharding)
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
                requests[key] = [full_box(spec)]
        self.last_read = (0, 0)
        host = self._read_boxes(item, {k: s for k, (s, _) in wanted.items()}, requests, verify, executor, progress)
        report.chunks_read, report.bytes_read = self.last_read
        for key, (spec, tv) in wanted.items():
            sharding, boxes = placement[key]
            pieces = host.pop(key)
            if boxes is None:
                value = _to_real(spec, pieces[full_box(spec)], tv, f"{self.where}: array {key!r}", casts, key)
                if isinstance(tv, (np.ndarray, np.generic)):
                    new_values[key] = np.asarray(value)
                else:
                    # may_alias: a 64-byte aligned host buffer becomes the CPU array without a copy
                    new_values[key] = jax.device_put(value, sharding, may_alias=True)
            else:
                per_device = [jax.device_put(_to_real(spec, pieces[box], tv, f"{self.where}: array {key!r}", casts, key),
                                             device, may_alias=True)
                              for device, box in boxes.items()]
                new_values[key] = jax.make_array_from_single_device_arrays(spec.shape, sharding, per_device)
            report.restored.append(key)
        for (src, dst), keys in casts.items():
            keep = "keep them as Python values in the target" if src.startswith("Python") else \
                f"restore into {src} targets"
            warnings.warn(f"{self.where}: item {item!r}: {src} values restored into {dst} targets lose precision "
                          f"or range (a lossy cast) for {bounded(keys)}; {keep} to keep them exact",
                          UserWarning, stacklevel=3)
        return flat.rebuild(new_values), report

    def item_record(self, item: str) -> ItemRecord:
        if not isinstance(item, str):
            raise CheckpointError(f"{self.where}: an item is named by a str (one of {', '.join(self.items) or 'none'}); "
                                  f"got {summarize(item)}")
        if item not in self.items:
            raise StructureMismatchError(f"{self.where}: checkpoint has no {item!r:.120} (it has "
                                         f"{', '.join(self.items) or 'nothing'})")
        return self.manifest.items[item]

    def read_arrays(self, item: str, keys: list[str] | None = None, *, verify: bool = True,
                    executor: Reader | None = None) -> dict[str, Any]:
        """Host arrays of ``item`` in their real dtypes (PRNG keys as typed key arrays)."""
        rec = self.item_record(item)
        specs = {k: s for k, s in rec.arrays.items() if keys is None or k in keys}
        raw = self._read_arrays(item, specs, verify, executor, None)
        return {k: decode_stored(specs[k], raw[k], f"{self.where}: array {k!r}") for k in specs}

    def _read_arrays(self, item: str, specs: dict[str, ArraySpec], verify: bool,
                     executor: Reader | None, progress: bool | None) -> dict[str, np.ndarray]:
        """Whole arrays (stored dtype) of ``item``."""
        boxes = self._read_boxes(item, specs, {k: [full_box(s)] for k, s in specs.items()},
                                 verify, executor, progress)
        return {k: boxes[k][full_box(s)] for k, s in specs.items()}

    def _read_boxes(self, item: str, specs: dict[str, ArraySpec], requests: dict[str, list[Box]],
                    verify: bool, executor: Reader | None, progress: bool | None) -> dict[str, dict[Box, np.ndarray]]:
        """``_read_boxes_of_this_version``, then make sure no other process replaced or
        deleted the checkpoint meanwhile (else ``ReplacedWhileReadingError``, never a mix of
        two versions, also with ``verify=False``)."""
        try:
            out = self._read_boxes_of_this_version(item, specs, requests, verify, executor, progress)
        except CheckpointError as e:
            self.raise_if_replaced(e)
            raise
        if specs:
            self.raise_if_replaced(None)
        return out

    def _read_boxes_of_this_version(self, item: str, specs: dict[str, ArraySpec], requests: dict[str, list[Box]],
                                    verify: bool, executor: Reader | None,
                                    progress: bool | None) -> dict[str, dict[Box, np.ndarray]]:
        """Allocate each requested box once and fill it from the chunks it overlaps (only
        those), file by file, in parallel."""
        if not specs:
            return {}
        index = self.chunk_tables(item, {key: requests[key] for key in specs})
        executor = executor or default_executor()
        # Sizes against the real files before anything is allocated: the index's bounds
        # checks hold against the manifest's sizes, which a hostile manifest could inflate.
        self._check_file_sizes(set().union(*(index[key].file_names() for key in specs)))
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
                for fname, chunk in index[key].overlapping(*box):
                    target = chunk_target(chunk, dest, box)
                    if target is None:
                        continue
                    job = jobs.get(fname)
                    if job is None:
                        job = jobs[fname] = ReadJob(self.store, f"{self.name}/{fname}", fname,
                                                    self.manifest.files[fname].size, version=self.version)
                    job.targets.append(target)
        with byte_progress(f"loading {self.name}", total, progress, done=f"loaded {self.name}") as advance:
            executor.read(list(jobs.values()), verify=verify, progress=advance)
        self.last_read = (sum(len(j.targets) for j in jobs.values()), sum(j.nbytes for j in jobs.values()))
        return out


    def _check_file_sizes(self, names: set[str]) -> None:

        def check(fname: str) -> None:
            size = self.store.size(f"{self.name}/{fname}")
            if size is None:
                self.raise_if_replaced(None)
                raise CorruptCheckpointError(f"{self.where}: shard file {fname} is missing (or not a regular file)")
            expected = self.manifest.files[fname].size
            if size != expected:
                raise CorruptCheckpointError(f"{self.where}: {fname} is {size} bytes, the manifest says {expected}")
        run_all(check, sorted(names), 16 if len(names) > 4 else 1)


def _scalar_as_array(value: Any, target: Any) -> tuple[np.ndarray, bool] | None:
    """A saved bool/int/float scalar as a 0-d array of a 0-d target's dtype, and whether
    that rounds it (a lossy cast, warned like an array's), or None when it is no number,
    the target is not 0-d (or a PRNG key), or the value is out of the dtype's range."""
    if type(value) not in (bool, int, float) or tuple(getattr(target, "shape", (1,))) != () or is_prng_key(target):
        return None
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = np.asarray(value).astype(np.dtype(target.dtype))
        got = exact.item()
    except (OverflowError, TypeError, ValueError):
        return None
    if isinstance(got, int) and not isinstance(got, bool) and not (math.isfinite(value) and abs(got - value) < 1):
        return None                       # wrapped around an integer dtype's range, or NaN/inf into one
    if isinstance(got, float) and math.isinf(got) and not math.isinf(value):
        return None                       # out of a float dtype's range (1e10 into float16)
    return exact, not (got == value or (value != value and got != got))   # NaN is NaN


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
