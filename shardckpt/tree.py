"""Pytrees (nnx state, optimizer state, any jax pytree) <-> flat, named entries.

A checkpoint stores flat entries keyed by a dotted key path ("layers.0.attn.q.kernel"), so
that files are readable by humans and by plain ``np.load``, and so that a restore can match
entries by name into a target of another structure (fine-tuning with another optimizer).

``nnx.Variable`` objects are leaves: we store their value and restore by
``variable.replace(value=...)``, which keeps the variable type and its metadata (sharding
annotations) of the *target*. Dtypes that ``.npy`` cannot describe are stored as
same-width unsigned integers, typed PRNG keys as their key data; the real dtype is kept in
the manifest so every round trip is bit exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardckpt.errors import CheckpointError, CorruptCheckpointError, StructureMismatchError

#: Scalar leaves (not arrays) kept verbatim in the manifest, with their Python type.
SCALAR_TYPES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "none"}
_SCALAR_KINDS = frozenset(SCALAR_TYPES.values())
_NATIVE_KINDS = "biufc"  # numpy kinds .npy stores faithfully


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_part(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def key_of(path: tuple) -> str:
    """Dotted key of a jax key path: ``('layers', 0, 'kernel') -> 'layers.0.kernel'``."""
    return ".".join(_path_part(p) for p in path)


def _leaf_value(leaf: Any) -> Any:
    return leaf.get_value() if _is_variable(leaf) else leaf


def is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@dataclass(frozen=True)
class ArraySpec:
    """What the manifest records about one array: its real dtype and shape, and how it is
    stored (``stored_dtype``/``stored_shape`` differ for bfloat16, float8, PRNG keys)."""

    dtype: str
    shape: tuple[int, ...]
    stored_dtype: str
    stored_shape: tuple[int, ...]
    key_impl: str | None = None

    @property
    def stored_nbytes(self) -> int:
        return math.prod(self.stored_shape) * np.dtype(self.stored_dtype).itemsize

    def to_json(self) -> dict:
        d = {"dtype": self.dtype, "shape": list(self.shape), "stored_dtype": self.stored_dtype,
             "stored_shape": list(self.stored_shape)}
        if self.key_impl is not None:
            d["key_impl"] = self.key_impl
        return d


@dataclass
class Piece:
    """A box of an array's stored representation held by this process: ``data`` (host
    memory, stored dtype, C-contiguous) sits at ``offset`` in the stored global array."""

    offset: tuple[int, ...]
    data: np.ndarray


@dataclass
class ArrayEntry:
    key: str
    spec: ArraySpec
    pieces: list[Piece] = field(default_factory=list)


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a value of ``dtype`` is written as: itself when .npy can describe it,
    else the unsigned integer of the same width (bfloat16 -> uint16, float8 -> uint8)."""
    dtype = np.dtype(dtype)
    if dtype.kind in _NATIVE_KINDS and dtype.type.__module__ == "numpy":
        return dtype
    if dtype.kind == "O" or dtype.names is not None:
        raise CheckpointError(f"dtype {dtype} cannot be checkpointed (object/structured dtype)")
    if dtype.itemsize not in (1, 2, 4, 8):
        raise CheckpointError(f"dtype {dtype} has unsupported item size {dtype.itemsize}")
    return np.dtype(f"uint{dtype.itemsize * 8}")


_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def real_dtype(name: Any, what: str = "") -> np.dtype:
    """Parse a dtype name from a manifest: only the dtypes a checkpoint can hold (numpy's
    bool/int/uint/float/complex and ml_dtypes' bfloat16, float8_*, int4, ...), never
    object, structured, bytes, unicode, void or datetime dtypes, never an arbitrary numpy
    type string. Anything else raises ``CorruptCheckpointError`` naming ``what``."""
    prefix = f"{what}: " if what else ""
    if not isinstance(name, str) or not _DTYPE_NAME.fullmatch(name):
        raise CorruptCheckpointError(f"{prefix}unknown dtype {name!r:.80}")
    try:
        dtype = jnp.dtype(name)
    except Exception as e:   # TypeError, ValueError, SystemError for odd strings
        raise CorruptCheckpointError(f"{prefix}unknown dtype {name!r:.80}") from e
    module = getattr(dtype.type, "__module__", "")
    if dtype.names is not None or dtype.subdtype is not None or not (
            (dtype.kind in _NATIVE_KINDS and module == "numpy") or module == "ml_dtypes"):
        raise CorruptCheckpointError(f"{prefix}unsupported dtype {name!r:.80}")
    return dtype


def _box_of(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    starts, sizes = [], []
    for sl, dim in zip(index, shape):
        start, stop, _ = sl.indices(dim)
        starts.append(start)
        sizes.append(stop - start)
    return tuple(starts), tuple(sizes)


def _host_pieces(x: Any, as_stored: Callable[[np.ndarray], np.ndarray]) -> list[Piece]:
    """Host copies of the parts of ``x`` this process must write.

    A sharded ``jax.Array``: each distinct shard once. When the replicas of a shard live in
    several processes, they split it along axis 0 and each writes its part, so replicated
    state is written in parallel by all its holders, never twice. Anything else: the whole.
    """
    if not isinstance(x, jax.Array) or (x.is_fully_addressable and len(x.sharding.device_set) == 1):
        arr = np.asarray(x)
        return [Piece((0,) * arr.ndim, as_stored(arr))]
    me = jax.process_index()
    holders: dict[tuple, set[int]] = {}
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        holders.setdefault(_box_of(index, x.shape), set()).add(device.process_index)
    pieces, done = [], set()
    for shard in x.addressable_shards:
        box = _box_of(shard.index, x.shape)
        if box in done:
            continue
        done.add(box)
        procs = sorted(holders[box])
        rank, count = procs.index(me), len(procs)
        offset, shape = box
        if x.ndim == 0 or shape[0] < count:
            if rank != 0:
                continue
            part = slice(None)
        else:
            rows = -(-shape[0] // count)
            part = slice(rank * rows, min(shape[0], (rank + 1) * rows))
            if part.start >= part.stop:
                continue
            offset = (offset[0] + part.start,) + offset[1:]
        data = np.asarray(shard.data)
        pieces.append(Piece(offset, as_stored(data[part] if x.ndim else data)))
    return pieces


def encode_value(key: str, value: Any) -> ArrayEntry:
    """Describe one array leaf and take the host pieces of it that this process writes."""
    if is_prng_key(value):
        impl = str(jax.random.key_impl(value))
        data = jax.random.key_data(value)
        spec = ArraySpec(dtype=str(value.dtype), shape=tuple(value.shape),
                         stored_dtype=str(np.dtype(data.dtype)), stored_shape=tuple(data.shape),
                         key_impl=impl)
        return ArrayEntry(key, spec, _host_pieces(data, lambda a: a if a.flags.c_contiguous else a.copy(order="C")))
    dtype = np.dtype(value.dtype)
    if dtype.kind == "O":
        raise CheckpointError(f"key {key!r}: object arrays cannot be checkpointed")
    try:
        stored = storage_dtype(dtype)
    except CheckpointError as e:
        raise CheckpointError(f"key {key!r}: {e}") from None

    def as_stored(a: np.ndarray) -> np.ndarray:
        a = a if a.flags.c_contiguous else a.copy(order="C")
        return a.view(stored) if a.dtype != stored else a

    spec = ArraySpec(dtype=dtype.name, shape=tuple(value.shape), stored_dtype=stored.name,
                     stored_shape=tuple(value.shape))
    return ArrayEntry(key, spec, _host_pieces(value, as_stored))


def decode_stored(spec: ArraySpec, stored: np.ndarray, what: str = "") -> np.ndarray | jax.Array:
    """Inverse of the storage encoding: view the stored bits as the real dtype (no copy),
    or wrap PRNG key data back into a typed key array."""
    if spec.key_impl is not None:
        try:
            return jax.random.wrap_key_data(stored, impl=spec.key_impl)
        except (ValueError, TypeError, KeyError) as e:   # a name jax does not know
            raise CorruptCheckpointError(f"{what or 'PRNG key'}: key data of unknown implementation {spec.key_impl!r:.80} "
                                         f"({type(e).__name__}: {e})") from e
    if spec.dtype in (stored.dtype.name, stored.dtype.str):
        return stored       # stored as it is (the original layout's raw V2 bfloat16 included)
    dtype = real_dtype(spec.dtype)
    return stored.view(dtype) if stored.dtype != dtype else stored


def encode_scalar(key: str, value: Any) -> dict:
    kind = SCALAR_TYPES.get(type(value))
    if kind is None:
        raise CheckpointError(
            f"key {key!r}: leaf of type {type(value).__name__} cannot be checkpointed "
            "(only arrays and bool/int/float/str/None leaves are)")
    if kind == "float" and not math.isfinite(value):
        return {"type": kind, "value": repr(value)}
    return {"type": kind, "value": value}


_NON_FINITE = frozenset({"nan", "inf", "-inf"})


def decode_scalar(key: str, record: Any, where: str = "") -> Any:
    """The value of a scalar leaf record ``{"type": ..., "value": ...}`` as written by
    ``encode_scalar``. Anything else raises ``CorruptCheckpointError`` naming the key."""
    prefix = f"{where}: " if where else ""
    if not isinstance(record, dict) or type(record.get("type")) is not str or record["type"] not in _SCALAR_KINDS:
        raise CorruptCheckpointError(f"{prefix}key {key!r:.200}: malformed scalar leaf record {record!r:.200}")
    kind, value = record["type"], record.get("value")
    if kind == "none":
        return None
    if kind == "float":
        if type(value) is float or (type(value) is int and -(1 << 53) <= value <= 1 << 53):
            return float(value)
        if type(value) is str and value in _NON_FINITE:
            return float(value)
    elif type(value) is {"bool": bool, "int": int, "str": str}[kind]:
        return value
    raise CorruptCheckpointError(f"{prefix}key {key!r:.200}: scalar leaf value {value!r:.200} is not a {kind}")


@dataclass
class FlatTree:
    """A pytree taken apart: its leaves by dotted key, and how to put it back together."""

    leaves: dict[str, Any]            # key -> raw leaf (Variable or value)
    treedef: Any

    @classmethod
    def of(cls, tree: Any) -> FlatTree:
        with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
        leaves: dict[str, Any] = {}
        for path, leaf in with_path:
            key = key_of(path)
            if key in leaves:
                raise StructureMismatchError(
                    f"two leaves share the key {key!r}; rename one (keys must stay unique "
                    "when joined with '.')")
            leaves[key] = leaf
        return cls(leaves, treedef)

    def values(self) -> dict[str, Any]:
        return {k: _leaf_value(v) for k, v in self.leaves.items()}

    def rebuild(self, new_values: dict[str, Any]) -> Any:
        """The same tree with each leaf's value replaced (variables keep type and metadata)."""
        out = []
        for key, leaf in self.leaves.items():
            value = new_values[key]
            out.append(leaf.replace(value=value) if _is_variable(leaf) else value)
        return self.treedef.unflatten(out)


def split_values(values: dict[str, Any], *, copy_numpy: bool = False) -> tuple[list[ArrayEntry], dict[str, dict]]:
    """Separate array leaves (written to shards) from scalar leaves (kept in the manifest)."""
    arrays, scalars = [], {}
    for key, value in values.items():
        if isinstance(value, (jax.Array, np.ndarray, np.generic)):
            if copy_numpy and isinstance(value, np.ndarray):
                value = value.copy()
            arrays.append(encode_value(key, value))
        elif type(value) in SCALAR_TYPES:
            scalars[key] = encode_scalar(key, value)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            raise CheckpointError(f"key {key!r}: abstract value {value!r:.120} has no data to save")
        else:
            scalars[key] = encode_scalar(key, value)
    return arrays, scalars
