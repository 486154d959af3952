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

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import xxhash
from flax import nnx

from shardckpt.errors import CheckpointError, CorruptCheckpointError, StructureMismatchError

#: Scalar leaves (not arrays) kept verbatim in the manifest, with their Python type.
SCALAR_TYPES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "none"}
_SCALAR_KINDS = frozenset(SCALAR_TYPES.values())
_NATIVE_KINDS = "biufc"  # numpy kinds .npy stores faithfully

#: The deepest pytree a save or restore accepts (levels of containers above a leaf). Real
#: states nest a dozen levels; jax.tree_util recurses per level, so far deeper trees would
#: hit Python's recursion limit at a depth that depends on the caller's stack.
MAX_TREE_DEPTH = 256


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
    if dtype is None:
        return False
    try:
        return _is_key_dtype(dtype)
    except TypeError:            # an unhashable dtype-like attribute
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@functools.lru_cache(maxsize=256)
def _is_key_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is a PRNG key dtype, once per dtype (jax's test costs ~3 us)."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


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
    #: a weak reference to the ``jax.Array`` leaf the pieces came from, in this process
    #: only (never pickled; weak, so a save never keeps device memory alive): what an
    #: incremental save knows an unchanged array by (``saving.incremental``)
    leaf_ref: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "leaf_ref": None}


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
        spec, stored = _plain_spec(dtype, tuple(value.shape))
    except CheckpointError as e:
        raise CheckpointError(f"key {key!r}: {e}") from None

    def as_stored(a: np.ndarray) -> np.ndarray:
        a = a if a.flags.c_contiguous else a.copy(order="C")
        return a.view(stored) if a.dtype != stored else a

    return ArrayEntry(key, spec, _host_pieces(value, as_stored))


@functools.lru_cache(maxsize=4096)
def _plain_spec(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[ArraySpec, np.dtype]:
    """The spec of an array of ``dtype`` and ``shape`` (not a PRNG key) and its storage
    dtype: the same few recur (every layer's kernels), and ``dtype.name`` is slow."""
    stored = storage_dtype(dtype)
    return ArraySpec(dtype=dtype.name, shape=shape, stored_dtype=stored.name, stored_shape=shape), stored


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
        """Flatten ``tree`` (nnx Variables are leaves). A tree nested deeper than
        ``MAX_TREE_DEPTH`` levels raises ``CheckpointError``, checked before jax flattens it."""
        check_depth(tree)
        try:
            with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
        except RecursionError:       # not reached after check_depth; never a raw RecursionError
            raise _too_deep() from None
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
            raise CheckpointError(f"key {key!r}: {summarize(value)} is abstract: it has no data to save")
        else:
            scalars[key] = encode_scalar(key, value)
    return arrays, scalars


# --- depth, descriptions --------------------------------------------------------------------

def _too_deep() -> CheckpointError:
    return CheckpointError(f"the pytree is nested more than {MAX_TREE_DEPTH} levels deep (a key path of more than "
                           f"{MAX_TREE_DEPTH} parts); shardckpt saves and restores pytrees up to {MAX_TREE_DEPTH} "
                           "levels deep: flatten it, e.g. into a dict keyed by path")


#: Leaves recognised without asking jax, so the walks below stay cheap for big states:
#: exact types first (an isinstance check against jax.Array is slow; the concrete array
#: types met are added on first sight), then the ABCs.
_LEAF_TYPES = {np.ndarray, int, float, bool, complex, str, bytes, jax.ShapeDtypeStruct}
_LEAF_CLASSES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _one_level(node: Any) -> list[tuple[str, Any]] | None:
    """The children of pytree node ``node`` as (path part, child), or None for a leaf
    (an nnx Variable is a leaf; a None child is a child). No recursion."""
    kind = type(node)
    if kind is dict:              # the common nodes without a jax call (the same path parts)
        return [(str(k), v) for k, v in node.items()]
    if kind is list or kind is tuple:
        return [(str(i), v) for i, v in enumerate(node)]
    if node is None or kind in _LEAF_TYPES or _is_variable(node):
        return None
    if isinstance(node, _LEAF_CLASSES):
        _LEAF_TYPES.add(kind)         # jax's ArrayImpl, numpy scalar types: exact next time
        return None
    kids, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(kids) == 1 and kids[0][0] == ():
        return None
    return [(key_of(path), child) for path, child in kids]


def tree_depth(tree: Any, limit: int | None = None) -> int:
    """The length of the longest key path in ``tree`` (levels of containers above its
    deepest leaf or empty container), walked without recursion. With ``limit``, stops as
    soon as the depth is over it (and returns ``limit + 1``).

    Why not let ``jax.tree_util`` find out: it recurses in C++ and, with an ``is_leaf``
    callback, a tree deeper than Python's recursion limit raises ``RecursionError`` and
    leaves the interpreter's recursion count wrong, so later unrelated calls fail too."""
    deepest, stack = 0, [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is dict:
            children = node.values()
        elif kind is list or kind is tuple:
            children = node
        else:
            kids = _one_level(node)
            children = () if kids is None else [child for _, child in kids]
        if depth > deepest:
            deepest = depth
        if children:
            if limit is not None and depth >= limit:
                return limit + 1
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_depth(tree: Any) -> None:
    """``CheckpointError`` if ``tree`` is nested deeper than ``MAX_TREE_DEPTH`` levels."""
    if tree_depth(tree, MAX_TREE_DEPTH) > MAX_TREE_DEPTH:
        raise _too_deep()


def check_key_depth(key: str, where: str) -> None:
    """A saved key of more than ``MAX_TREE_DEPTH`` parts is no key shardckpt writes: refused
    before it is nested into dicts (``restore`` without a target)."""
    if key.count(".") >= MAX_TREE_DEPTH:
        raise CorruptCheckpointError(f"{where}: key {key[:80]!r}... has {key.count('.') + 1} parts; saved pytrees "
                                     f"are at most {MAX_TREE_DEPTH} levels deep")


def is_array_like(value: Any) -> bool:
    """An array leaf (``jax.Array``, NumPy array or scalar, ``jax.ShapeDtypeStruct``, or
    anything with a shape and a dtype), as opposed to a Python scalar leaf."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or (
        hasattr(value, "shape") and hasattr(value, "dtype"))


def bounded(names: Any, limit: int = 12) -> str:
    """``names`` joined by commas, at most ``limit`` of them, then how many in all."""
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _leaf_summary(value: Any) -> str:
    if _is_variable(value):
        return f"{type(value).__name__}({_leaf_summary(value.get_value())})"
    if is_array_like(value):
        return f"{tuple(getattr(value, 'shape', ()))} {getattr(value, 'dtype', '?')}"
    return type(value).__name__


def summarize(obj: Any, limit: int = 6) -> str:
    """What ``obj`` is, for an error message: its type, an array's shape and dtype, a
    pytree's leaf count and first keys with their shapes. Never a value."""
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    if isinstance(obj, (nnx.Module, nnx.Optimizer)):
        return f"an {'nnx.Optimizer' if isinstance(obj, nnx.Optimizer) else 'nnx.Module'} ({type(obj).__name__})"
    if _is_variable(obj):
        return f"an nnx.{type(obj).__name__} {_leaf_summary(obj)}"
    if is_array_like(obj):
        kind = "jax.Array" if isinstance(obj, jax.Array) else type(obj).__name__
        return f"an array {_leaf_summary(obj)} ({kind})"
    if isinstance(obj, (str, bytes)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    if obj is None or isinstance(obj, (bool, int, float, complex)):
        return f"a Python {type(obj).__name__}"
    if callable(obj):
        return f"a {type(obj).__name__} {getattr(obj, '__qualname__', '')}".rstrip()
    if tree_depth(obj, MAX_TREE_DEPTH) > MAX_TREE_DEPTH:
        return f"a {type(obj).__name__} nested more than {MAX_TREE_DEPTH} levels deep"
    try:
        flat = jax.tree_util.tree_flatten_with_path(obj, is_leaf=_is_variable)[0]
    except Exception:   # noqa: BLE001 - anything jax cannot flatten is described by its type
        return f"a {type(obj).__name__}"
    if len(flat) == 1 and flat[0][0] == ():
        return f"a {type(obj).__name__}"
    shown = ", ".join(f"{key_of(p)}: {_leaf_summary(v)}" for p, v in flat[:limit])
    more = f", ... ({len(flat)} leaves in all)" if len(flat) > limit else ""
    return f"a {type(obj).__name__} of {len(flat)} leaves ({shown}{more})"


# --- dtype casts -----------------------------------------------------------------------------

def _finfo(dtype: np.dtype):
    try:
        return ml_dtypes.finfo(dtype) if dtype.kind in "fV" else None
    except (TypeError, ValueError):
        return None


def _iinfo(dtype: np.dtype):
    try:
        return ml_dtypes.iinfo(dtype) if dtype.kind in "iuV" else None
    except (TypeError, ValueError):
        return None


def lossless_cast(src: Any, dst: Any) -> bool:
    """Whether every value of dtype ``src`` is exactly representable in ``dst`` (bfloat16 ->
    float32, int8 -> int32, float16 -> float64: True; float32 -> float16 or bfloat16,
    float -> int, int32 -> float32: False). The restore rule: a lossless cast into a
    target's dtype is silent, a lossy one warns."""
    src, dst = np.dtype(src), np.dtype(dst)
    if src == dst or src.kind == "b":
        return True
    if dst.kind == "b":
        return False
    if src.kind == "c" or dst.kind == "c":
        if dst.kind != "c":
            return False
        part = np.dtype(f"float{src.itemsize * 4}") if src.kind == "c" else src
        return lossless_cast(part, np.dtype(f"float{dst.itemsize * 4}"))
    sf, df, si, di = _finfo(src), _finfo(dst), _iinfo(src), _iinfo(dst)
    if sf is not None and df is not None:
        return df.nmant >= sf.nmant and df.maxexp >= sf.maxexp and df.minexp <= sf.minexp
    if si is not None and di is not None:
        return int(di.min) <= int(si.min) and int(di.max) >= int(si.max)
    if si is not None and df is not None:
        return max(-int(si.min), int(si.max)) <= 2 ** (df.nmant + 1)
    return False


# --- container kinds -------------------------------------------------------------------------

#: ``tree-<item>.json``: the container kinds of a plain pytree item, so that a restore
#: without a target gives back lists, tuples, None leaves and empty containers.
TREE_RECORD_FORMAT = "shardckpt-tree"
TREE_RECORD_VERSION = 1
_NODE_KINDS = ("dict", "list", "tuple", "none")


def keys_digest(keys: Any) -> str:
    """xxh3-64 (hex) of the sorted leaf keys, one per line: ties a record to its item."""
    return xxhash.xxh3_64("\n".join(sorted(keys)).encode()).hexdigest()


def _kind(node: Any) -> str:
    if isinstance(node, list):
        return "list"
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        return "tuple"
    return "dict"      # dicts, nnx.State, namedtuples, other pytree nodes: by their keys


def container_record(tree: Any, keys: Any) -> dict | None:
    """The record of ``tree``'s containers that dotted keys cannot tell: every list and
    tuple (with its length), every None leaf, every empty container. ``nodes`` is empty for
    a tree of non-empty dicts. None when the tree cannot be described by path parts (a
    dict key holding a '.')."""
    nodes: list[list] = []
    stack = [((), tree)]
    while stack:
        path, node = stack.pop()
        if node is None:
            nodes.append([list(path), "none"])
            continue
        kids = _one_level(node)
        if kids is None:
            continue
        if any("." in part for part, _ in kids):
            return None
        kind = _kind(node)
        if kind != "dict" or not kids:
            nodes.append([list(path), kind, len(kids)])
        stack.extend((path + (part,), child) for part, child in reversed(kids))
    keys = list(keys)
    return {"format": TREE_RECORD_FORMAT, "version": TREE_RECORD_VERSION, "keys": len(keys),
            "digest": keys_digest(keys), "nodes": nodes}


def record_matches(record: Any, keys: Any) -> bool:
    """Whether ``record`` is a container record written for exactly these leaf keys (a
    record left from an earlier version of the item does not match)."""
    keys = list(keys)
    return (isinstance(record, dict) and record.get("format") == TREE_RECORD_FORMAT
            and record.get("keys") == len(keys) and record.get("digest") == keys_digest(keys))


def _parse_nodes(record: dict, what: str) -> list[tuple[tuple[str, ...], str, int]]:
    """The record's entries, each checked: a path of at most ``MAX_TREE_DEPTH`` str parts, a
    kind, and for lists and tuples a length no longer than the record can fill (every
    position holds a saved key, a None leaf or an empty container)."""
    nodes = record.get("nodes")
    keys = record.get("keys")
    if not isinstance(nodes, list) or type(keys) is not int:
        raise CorruptCheckpointError(f"{what}: malformed container record (nodes, keys)")
    most = keys + len(nodes)
    out = []
    for node in nodes:
        ok = isinstance(node, list) and len(node) in (2, 3) and isinstance(node[0], list) \
            and len(node[0]) <= MAX_TREE_DEPTH and all(type(p) is str for p in node[0]) and node[1] in _NODE_KINDS
        length = node[2] if ok and len(node) == 3 else 0
        if not ok or type(length) is not int or not 0 <= length <= most or (node[1] == "none") != (len(node) == 2):
            raise CorruptCheckpointError(f"{what}: malformed container record entry {str(node)[:120]}")
        out.append((tuple(node[0]), node[1], length))
    return out


def _is_index(name: str, length: int) -> bool:
    """``name`` is the canonical decimal of a position below ``length`` ("0", "17"; not "01")."""
    return 0 < len(name) <= 19 and name.isascii() and name.isdigit() and (name == "0" or name[0] != "0") \
        and int(name) < length


def apply_container_record(nested: dict, record: dict, what: str, *, partial: bool = False) -> Any:
    """``nested`` (the nested dicts a restore without a target builds from dotted keys) with
    the recorded containers put back: lists, tuples, None leaves, empty containers.
    ``partial`` (some keys were selected): list positions not read are None; lists not read
    at all, None leaves and empty containers (no key selects them) stay absent. A record that contradicts the keys
    raises CorruptCheckpointError; time and memory stay linear in the record and the keys."""
    if record.get("version") != TREE_RECORD_VERSION:
        return nested          # a newer writer's record: the plain nested dicts
    nodes = _parse_nodes(record, what)
    root: dict = {"": nested}

    def parent_of(path: tuple[str, ...], create: bool) -> dict | None:
        node = root[""]
        for part in path[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None and create and isinstance(node, dict):
                child = node[part] = {}
            if not isinstance(child, dict):
                if create:
                    raise CorruptCheckpointError(f"{what}: container record path {'.'.join(path)!r:.200} "
                                                 "does not fit the saved keys")
                return None
            node = child
        return node

    for path, kind, length in nodes:       # None leaves and empty containers first (no keys: not selected)
        if kind != "none" and length or partial:
            continue
        if not path:
            if kind != "none" and not root[""]:
                root[""] = {}
                continue
            raise CorruptCheckpointError(f"{what}: container record puts an empty node at the root of a tree with keys")
        parent = parent_of(path, True)
        if path[-1] in parent:
            raise CorruptCheckpointError(f"{what}: container record path {'.'.join(path)!r:.200} collides with a saved key")
        parent[path[-1]] = None if kind == "none" else {}
    for path, kind, length in sorted(nodes, key=lambda n: -len(n[0])):   # innermost first
        if kind not in ("list", "tuple"):
            continue
        parent = parent_of(path, False) if path else root
        slot = path[-1] if path else ""
        node = parent.get(slot) if parent is not None else None
        if node is None and partial:
            continue
        if not isinstance(node, dict) or not all(_is_index(k, length) for k in node) \
                or (not partial and len(node) != length):
            raise CorruptCheckpointError(f"{what}: container record says {'.'.join(path) or 'the root'!r:.200} is a "
                                         f"{kind} of {length}, which the saved keys do not fit")
        items = [node.get(str(i)) for i in range(length)]
        parent[slot] = items if kind == "list" else tuple(items)
    return root[""]
