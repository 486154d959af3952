"""Read-only support for the guide's original single-file layout (LinearNexus).

What the original code writes (``linearnexus/checkpoint.py``):

- ``model.npz``: ``np.savez_compressed`` (deflated ``.npy`` members) of
  ``nnx.to_pure_dict(nnx.state(model))`` flattened with ``'.'`` (``layers.0.attn.q_proj.kernel``),
  typed PRNG keys left out, bfloat16 stored as raw ``V2``.
- ``optimizer.npz``: ``np.savez_compressed`` of the leaves of
  ``jax.tree_util.tree_flatten(optimizer.opt_state)`` under positional keys ``opt_0 … opt_N``;
  no ``optimizer.step``. Beside it ``optimizer_meta.pkl``: a pickle of the treedef.
- ``config.json`` (the dict given to ``save_model``, usually ``{"model_config": ...}``; the
  manager adds ``step`` and ``train_config``), ``structure.json``, ``metrics.json``,
  ``extra.json``, and from ``save_checkpoint`` a ``meta.json`` with ``step`` and ``metrics``.

Older hand-made variants with dotted key-path names in ``optimizer.npz`` are read by key.
The pickle is never unpickled: positional leaves are matched against the new optimizer's
``opt_state`` leaves in the same order the original flattened them, checked for count,
shape and dtype. While the pickle is present, loading the optimizer is refused unless the
caller passes ``allow_pickle=True`` (the flag says the caller trusts the directory).

Every file is opened without following symlinks and must be a regular file. The archives
are read member by member by this module, never through ``np.load``: each ``.npy`` header
is parsed with a bounded size, its shape and dtype checked against the member's sizes
before anything is allocated, and exactly that member is read (an archive whose member
names are ambiguous is refused). These checkpoints carry no checksums beyond the zip
CRC-32s, which are checked as each member is read to its end.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import jax
import numpy as np

from shardckpt.errors import CheckpointError, CorruptCheckpointError, StructureMismatchError
from shardckpt.format import limits
from shardckpt.format.manifest import ItemRecord
from shardckpt.format.shard import MAX_NPY_HEADER, open_zip, read_npy_header
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.geometry import aligned_empty
from shardckpt.tree import ArraySpec, FlatTree, is_prng_key

LEGACY_FILES = {"model": "model.npz", "optimizer": "optimizer.npz"}
PICKLE_META = "optimizer_meta.pkl"
_READ_CHUNK = 16 << 20
_POSITIONAL = re.compile(r"opt_(0|[1-9][0-9]{0,8})")
# what zipfile raises on damaged bytes (the .npy headers are parsed by our own reader)
_PARSE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, zlib.error, EOFError,
                 NotImplementedError, RuntimeError, struct.error, OverflowError, KeyError, IndexError,
                 TypeError, RecursionError)


def is_legacy_listing(names: set[str]) -> bool:
    """A directory listing holding the original layout's ``model.npz`` or ``optimizer.npz``
    (as any kind of entry: a symlink or a directory there is refused when opened, not
    skipped)."""
    return any(f in names for f in LEGACY_FILES.values())


def normalize_key(key: str) -> str:
    """Legacy writers used '/' or '.' and sometimes a trailing '.value'."""
    key = key.replace("/", ".")
    for suffix in (".value", ".raw_value"):
        key = key.removesuffix(suffix)
    return key


@dataclass(frozen=True)
class _Member:
    """One validated ``.npy`` member: the zip entry itself (not its name: a name can be
    shadowed) and what its header declares."""

    info: zipfile.ZipInfo
    name: str                 # member name without ".npy"
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    header: bytes             # the member's first bytes: magic, version, header dict

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def spec(self) -> ArraySpec:
        dt = self.dtype.str if self.dtype.kind == "V" else self.dtype.name
        return ArraySpec(dtype=dt, shape=self.shape, stored_dtype=dt, stored_shape=self.shape)


def _read_header(m: BinaryIO, f: str, name: str) -> tuple[tuple[int, ...], bool, np.dtype, bytes]:
    """Parse a member's .npy header from its first bytes (read once, bounded, without
    ``ast``: ``format.shard.read_npy_header``); returns the shape, order, dtype and the
    header's bytes."""
    raw = m.read(8)                     # magic and version
    if len(raw) == 8 and raw[7] == 0 and raw[6] in (1, 2):
        width = 2 if raw[6] == 1 else 4
        raw += m.read(width)
        if len(raw) == 8 + width:
            n = int.from_bytes(raw[8:], "little")
            if n > MAX_NPY_HEADER:
                raise CorruptCheckpointError(f"{f}: member {name} has a {n}-byte .npy header "
                                             f"(at most {MAX_NPY_HEADER})")
            raw += m.read(n)
    shape, fortran, dtype, header_len = read_npy_header(io.BytesIO(raw), f"{f}: member {name}")
    if header_len != len(raw):
        raise CorruptCheckpointError(f"{f}: member {name} has a malformed .npy header")
    if dtype.names is not None or dtype.subdtype is not None:
        raise CorruptCheckpointError(f"{f}: member {name} has dtype {dtype!r}; expected a plain numeric dtype")
    return shape, fortran, dtype, raw


def _scan_zip(zf: zipfile.ZipFile, f: str) -> dict[str, _Member]:
    """Validate every ``.npy`` member's entry and header; keyed by member name without
    ".npy". Ambiguous names (one name twice, ``k`` beside ``k.npy``, two names that
    normalise to one key) are refused: np.load would answer ``k`` with another member
    than the one checked."""
    seen: dict[str, str] = {}
    for info in zf.infolist():
        name = info.filename
        base = name.removesuffix(".npy")
        if base in seen:
            raise CorruptCheckpointError(
                f"{f}: members {seen[base]!r} and {name!r} both load as {base!r}; refusing an "
                "ambiguous archive")
        seen[base] = name
    keys: dict[str, str] = {}
    out: dict[str, _Member] = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            continue     # never read: not an array member
        name = info.filename[:-4]
        key = normalize_key(name)
        if key in keys:
            raise CorruptCheckpointError(f"{f}: members {keys[key]!r} and {info.filename!r} both name "
                                         f"the array {key!r}; refusing an ambiguous archive")
        keys[key] = info.filename
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CorruptCheckpointError(f"{f}: member {info.filename} uses compression method "
                                         f"{info.compress_type} (flags {info.flag_bits:#x}); expected "
                                         "stored or deflated, unencrypted")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise CorruptCheckpointError(f"{f}: stored member {info.filename} claims {info.file_size} "
                                         f"bytes in {info.compress_size}")
        with zf.open(info) as m:
            shape, fortran, dtype, header = _read_header(m, f, info.filename)
        header_len = len(header)
        mem = _Member(info, name, shape, dtype, fortran, header)
        # Nothing is allocated from the header alone: it must describe exactly what the member
        # holds, and a deflated member cannot hold more than deflate's ratio allows.
        if (mem.nbytes + header_len != info.file_size
                or info.file_size > limits.MAX_DEFLATE_RATIO * info.compress_size + 65536):
            raise CorruptCheckpointError(
                f"{f}: member {info.filename} declares {shape} {dtype} ({mem.nbytes} bytes) but holds "
                f"{info.file_size - header_len} bytes ({info.compress_size} stored)")
        out[name] = mem
    return out


def _read_member(zf: zipfile.ZipFile, mem: _Member, f: str) -> np.ndarray:
    """Exactly ``mem``'s bytes, into a buffer of the size checked in ``_scan_zip``."""
    with zf.open(mem.info) as m:
        if m.read(len(mem.header)) != mem.header:     # the very header that was checked
            raise CorruptCheckpointError(f"{f}: member {mem.info.filename} changed while reading")
        shape = mem.shape[::-1] if mem.fortran else mem.shape
        arr = aligned_empty(shape, mem.dtype)
        view = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(bytearray())
        pos = 0
        while pos < len(view):
            chunk = m.read(min(_READ_CHUNK, len(view) - pos))
            if not chunk:
                raise CorruptCheckpointError(f"{f}: member {mem.info.filename} is truncated "
                                             f"({pos} of {len(view)} bytes)")
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if m.read(1):     # also where zipfile checks the member's CRC-32
            raise CorruptCheckpointError(f"{f}: member {mem.info.filename} is longer than its header says")
    if mem.fortran:
        arr = np.ascontiguousarray(arr.T)
    if not arr.dtype.isnative:   # a big-endian writer: values, not raw bytes
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class LegacyCheckpoint(Checkpoint):
    """A directory in the original layout, opened read-only through its Store (so it is
    read alike on a local disk and on an object store)."""

    legacy = True

    def __init__(self, path: Any = None, *, allow_pickle: bool = False, filesystem: Any = None,
                 at: tuple[Any, str] | None = None):
        self.allow_pickle = allow_pickle
        super().__init__(path, filesystem=filesystem, at=at)

    @classmethod
    def at(cls, store, name: str, *, allow_pickle: bool = False) -> LegacyCheckpoint:
        return cls(allow_pickle=allow_pickle, at=(store, name))

    def _file(self, fname: str) -> str:
        """Root-relative name of file ``fname`` of this checkpoint."""
        return f"{self.name}/{fname}"

    def _where(self, fname: str) -> str:
        return self.store.where(self._file(fname))

    def _has(self, fname: str) -> bool:
        return fname in self._entries

    def _zip(self, fname: str):
        """The archive ``fname``, opened through the store (no symlinks, regular files
        only), its directory read once."""
        try:
            source = self.store.open(self._file(fname))
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{self._where(fname)}: vanished while being opened") from e
        try:
            return source, open_zip(source, self._where(fname))
        except BaseException:
            source.close()
            raise

    def _open(self) -> None:
        self._entries = {e.name for e in self.store.list(self.name)}
        self._records: dict[str, ItemRecord] = {}
        self._members: dict[str, dict[str, str]] = {}      # item -> key -> member name
        self._positions: dict[int, tuple[str, ArraySpec]] = {}
        for item, fname in LEGACY_FILES.items():
            if not self._has(fname):
                continue
            members = self._scan(fname)
            rec = ItemRecord()
            rec.arrays = {normalize_key(n): m.spec() for n, m in members.items()}
            self._records[item] = rec
            self._members[item] = {normalize_key(n): n for n in members}
            if item == "optimizer" and members and all(_POSITIONAL.fullmatch(n) for n in members):
                self._positions = {int(n[4:]): (n, m.spec()) for n, m in members.items()}
        self._meta = self.read_json("meta.json", {})
        if not isinstance(self._meta, dict):
            raise CorruptCheckpointError(f"{self._where('meta.json')}: holds a {type(self._meta).__name__}, "
                                         "not a JSON object")
        cfg = self.read_config()
        step = self._meta.get("step")
        self._step = step if _is_int(step) else cfg.get("step") if _is_int(cfg.get("step")) else None
        self._metrics = self.read_json("metrics.json", {}) or {}

    def _scan(self, fname: str) -> dict[str, _Member]:
        """Array headers only: shapes and dtypes without reading any data."""
        f = self._where(fname)
        try:
            source, zf = self._zip(fname)
            with source, zf:
                return _scan_zip(zf, f)
        except CheckpointError:
            raise
        except _PARSE_ERRORS as e:
            raise CorruptCheckpointError(f"{f}: not a readable .npz file ({type(e).__name__}: {e})") from e

    @property
    def step(self):
        return self._step

    @property
    def items(self) -> list[str]:
        return list(self._records)

    @property
    def metrics(self) -> dict:
        return self._metrics if isinstance(self._metrics, dict) else {}

    def bind_optimizer(self, optimizer: Any) -> None:
        """Name the original's positional leaves after ``optimizer``'s state keys.

        The original saved the leaves of ``jax.tree_util.tree_flatten(optimizer.opt_state)``
        as ``opt_<i>``; that order is the optimizer's own (``nnx.state`` sorts keys, so it
        cannot be recovered from a state), hence this takes the new (abstract) optimizer.
        Count, shapes and dtypes must agree position by position, else
        StructureMismatchError names the first position that does not.
        """
        if not self._positions:
            return
        self.item_record("optimizer")    # the pickle refusal comes first
        f = self._where(LEGACY_FILES["optimizer"])
        flat = FlatTree.of(optimizer.opt_state)
        targets = list(flat.values().items())
        for key, value in targets:
            if len(jax.tree_util.tree_leaves(value)) != 1:
                raise StructureMismatchError(f"{f}: the new optimizer's state leaf {key!r} is not one "
                                             "array; positional leaves cannot be matched to it")
        n = len(self._positions)
        missing = next((i for i in range(n) if i not in self._positions), None)
        if missing is not None:
            raise StructureMismatchError(f"{f}: position opt_{missing} is absent (the original kept "
                                         "non-array leaves only in its pickle); cannot restore by position")
        if n != len(targets):
            raise StructureMismatchError(f"{f}: holds {n} optimizer state leaves (opt_0 … opt_{n - 1}), "
                                         f"the new optimizer has {len(targets)}: another optimizer or model")
        rec, members = ItemRecord(), {}
        for i, (key, value) in enumerate(targets):
            name, spec = self._positions[i]
            saved = np.dtype(spec.stored_dtype)
            target_dtype = None if is_prng_key(value) else np.dtype(value.dtype)
            dtype_ok = target_dtype is not None and (
                saved == target_dtype or (saved.kind == "V" and saved.itemsize == target_dtype.itemsize))
            if tuple(value.shape) != spec.shape or not dtype_ok:
                raise StructureMismatchError(
                    f"{f}: {name} is {spec.shape} {spec.dtype}, but leaf {i} of the new optimizer "
                    f"(opt_state.{key}) is {tuple(value.shape)} {value.dtype}")
            rec.arrays[f"opt_state.{key}"] = spec
            members[f"opt_state.{key}"] = name
        self._records["optimizer"] = rec
        self._members["optimizer"] = members

    def item_record(self, item: str) -> ItemRecord:
        if item == "optimizer" and not self.allow_pickle and self._has(PICKLE_META):
            raise CheckpointError(
                f"{self._where(PICKLE_META)}: this legacy checkpoint keeps optimizer metadata "
                "as a pickle, which can run code when loaded; it is refused by default. Pass "
                "allow_pickle=True only if you trust whoever wrote it.")
        if item not in self._records:
            raise StructureMismatchError(f"{self.where}: legacy checkpoint has no {item!r}")
        return self._records[item]

    def read_json(self, name: str, default: Any = None) -> Any:
        f = self._where(name)
        if not self._has(name):
            if name == "metrics.json" and isinstance(getattr(self, "_meta", None), dict):
                metrics = self._meta.get("metrics")   # save_checkpoint kept them in meta.json
                if isinstance(metrics, dict):
                    return metrics
            return default
        try:
            raw = self.store.read_bytes(self._file(name), limits.MAX_JSON_BYTES)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{f}: vanished while being read") from e
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{f}: not valid JSON ({e})") from e

    def read_config(self) -> dict:
        """``config.json``; the original also accepted a bare model config there (no
        ``model_config`` key): it is returned as ``{"model_config": ...}``."""
        cfg = super().read_config()
        if "model_config" not in cfg:
            bare = {k: v for k, v in cfg.items() if k not in ("step", "train_config")}
            if bare:
                cfg = {**{k: v for k, v in cfg.items() if k in ("step", "train_config")}, "model_config": bare}
        return cfg

    def index(self):
        raise CheckpointError(f"{self.where}: legacy checkpoints have no chunk index")

    def _read_arrays(self, item, specs, verify, executor, progress) -> dict[str, np.ndarray]:
        out = {}
        f = self._where(LEGACY_FILES[item])
        try:
            source, zf = self._zip(LEGACY_FILES[item])
            with source, zf:
                members = _scan_zip(zf, f)
                for key, spec in specs.items():
                    mem = members.get(self._members[item][key])
                    if mem is None or mem.spec() != spec:
                        raise CorruptCheckpointError(f"{f}: {key!r} changed while reading")
                    out[key] = _read_member(zf, mem, f)
        except CheckpointError:
            raise
        except _PARSE_ERRORS as e:
            raise CorruptCheckpointError(f"{f}: cannot read ({type(e).__name__}: {e})") from e
        return out

    def _read_boxes(self, item, specs, requests, verify, executor, progress):
        """Legacy files have no chunk index: read whole arrays, then cut the boxes."""
        full = self._read_arrays(item, specs, verify, executor, progress)
        # np.require, not np.ascontiguousarray: the latter turns a 0-d array (an optimizer's
        # step) into shape (1,).
        return {k: {box: np.require(full[k][tuple(slice(o, o + n) for o, n in zip(*box))], requirements="C")
                    for box in requests[k]} for k in specs}
