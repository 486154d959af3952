"""The on-disk format, version 1: manifest schema, chunk index, and validation.

``manifest.json`` is the commit record (written last; no manifest, no checkpoint). It keeps
what a human reads: items, arrays with real dtypes and shapes, scalar leaves, files with
sizes and checksums, metrics. The bulk chunk table (up to ~10^6 rows for a 70B model on 512
devices) lives in ``index.msgpack``, referenced and checksummed by the manifest.

Everything read here is treated as hostile: sizes are capped before parsing, names must be
plain file names inside the checkpoint, shapes and byte counts are checked against each
other and against the files before any array is allocated, and no pickle is ever involved.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as _dt
import gc
import heapq
import io
import json
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import xxhash

from .errors import CheckpointError, CorruptCheckpointError
from .shard_io import ChunkRecord
from .tree import ArraySpec, decode_scalar, real_dtype, storage_dtype

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.msgpack"
MAX_MANIFEST_BYTES = 64 << 20    # parsing costs up to ~20x this (docs/reliability.md)
MAX_INDEX_BYTES = 256 << 20      # parsing costs ~8x this for real indexes (docs/reliability.md)
MAX_INDEX_CHUNKS = 1 << 22       # ~4.2 x 10^6 chunks: parsed, ~0.4-0.7 KiB each at the peak
MAX_ELEMENTS = 1 << 50
MAX_NDIM = 32                    # numpy's historical limit; validation is linear in it
MAX_JSON_DEPTH = 64              # nesting of the manifest's JSON (metrics are user data)
MAX_DEFLATE_RATIO = 1032        # deflate cannot inflate more than this per input byte
CHECKSUM_FIELD = "checksum"
CHECKSUM_ALGO = "xxh3-64"
# Top-level fields of a manifest written before manifests carried a checksum (legacy).
_LEGACY_FIELDS = frozenset({"format", "version", "step", "created", "writers", "host_count", "metrics",
                            "items", "files", "meta_files", "index", "transaction"})
# A plain name; remote checkpoints may prefix one version directory (see remote.py).
# Used with fullmatch: ``$`` would accept a trailing newline.
_SAFE_NAME = re.compile(r"(v[0-9a-f]{8,32}/)?[A-Za-z0-9_@\-][A-Za-z0-9_.@\-]{0,254}")
_CHECKSUM = re.compile(r"xxh3-64:([0-9a-f]{16})")


def check_file_name(name: Any, where: str) -> str:
    """A file named by a manifest must be a plain name in the checkpoint directory."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise CorruptCheckpointError(f"{where}: file name {name!r:.200} is not a plain file name "
                                     "inside the checkpoint; refusing it")
    return name


def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptCheckpointError(f"{what}: expected an integer in [{lo}, {hi}], got {v!r:.100}")
    return v


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_NDIM:
        raise CorruptCheckpointError(f"{what}: malformed shape {v!r:.200}")
    shape = tuple(_int(d, what) for d in v)
    if math.prod(shape) > MAX_ELEMENTS:
        raise CorruptCheckpointError(f"{what}: shape {shape} is implausibly large")
    return shape


def parse_array_spec(key: str, d: Any, where: str) -> ArraySpec:
    what = f"{where}: array {key!r}"
    if not isinstance(d, dict):
        raise CorruptCheckpointError(f"{what}: malformed record")
    try:
        dtype = d["dtype"]
        stored_dtype = d["stored_dtype"]
        key_impl = d.get("key_impl")
        if not isinstance(dtype, str) or not isinstance(stored_dtype, str) or len(dtype) > 64:
            raise CorruptCheckpointError(f"{what}: malformed dtype {dtype!r:.80} / {stored_dtype!r:.80}")
        if key_impl is None:
            real = real_dtype(dtype, what)
            if storage_dtype(real).name != stored_dtype:
                raise CorruptCheckpointError(f"{what}: dtype {dtype} cannot be stored as {stored_dtype!r:.80}")
        elif not isinstance(key_impl, str) or stored_dtype != "uint32":
            raise CorruptCheckpointError(f"{what}: malformed PRNG key record")
        spec = ArraySpec(dtype=str(dtype), shape=_shape(d["shape"], what), stored_dtype=str(stored_dtype),
                         stored_shape=_shape(d["stored_shape"], what), key_impl=key_impl)
    except CorruptCheckpointError:
        raise
    except Exception as e:  # KeyError, TypeError, CheckpointError from dtype parsing
        raise CorruptCheckpointError(f"{what}: malformed record ({e})") from e
    if key_impl is None and spec.shape != spec.stored_shape:
        raise CorruptCheckpointError(f"{what}: shape {spec.shape} != stored shape {spec.stored_shape}")
    if key_impl is not None and spec.stored_shape[:len(spec.shape)] != spec.shape:
        raise CorruptCheckpointError(f"{what}: key data shape {spec.stored_shape} does not extend {spec.shape}")
    return spec


@dataclass
class ItemRecord:
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    scalars: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"arrays": {k: s.to_json() for k, s in self.arrays.items()}, "scalars": self.scalars}


@dataclass
class FileRecord:
    size: int
    xxh3_64: str
    item: str | None = None
    writer: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"size": self.size, "xxh3_64": self.xxh3_64}
        if self.item is not None:
            d["item"] = self.item
        if self.writer:
            d["writer"] = self.writer
        return d


@dataclass
class Manifest:
    step: int | None
    items: dict[str, ItemRecord]
    files: dict[str, FileRecord]           # shard files
    meta_files: dict[str, FileRecord]      # config.json, metrics.json, ... and the index
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    writers: dict[str, str] = field(default_factory=dict)
    host_count: int = 1
    index_file: str = INDEX
    transaction: str = ""                  # id of the save that committed it (multi-process)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "step": self.step,
            "created": self.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "writers": self.writers, "host_count": self.host_count, "metrics": self.metrics,
            "items": {k: v.to_json() for k, v in self.items.items()},
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "meta_files": {k: v.to_json() for k, v in sorted(self.meta_files.items())},
            "index": self.index_file,
            **({"transaction": self.transaction} if self.transaction else {}),
        }

    def dumps(self) -> bytes:
        """The manifest as written: indented JSON carrying ``"checksum"``, the xxh3-64 of
        the canonical form of everything else (see ``manifest_checksum``)."""
        doc = self.to_json()
        text = json.dumps(doc, indent=1, sort_keys=False, allow_nan=False)
        if json_depth(doc) > MAX_JSON_DEPTH:
            raise CheckpointError(f"manifest: metrics or leaves nested deeper than {MAX_JSON_DEPTH} levels "
                                  "cannot be saved")
        doc = json.loads(text)            # what a reader will see (tuples -> lists, int keys -> str)
        doc[CHECKSUM_FIELD] = manifest_checksum(doc)
        return json.dumps(doc, indent=1, sort_keys=False, allow_nan=False).encode()

    @classmethod
    def loads(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check a manifest. Raises ``CorruptCheckpointError`` naming ``where`` for
        any damage: not JSON, nested too deep, wrong checksum, wrong schema."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: manifest is {len(raw)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({e})") from e
        if json_depth(d) > MAX_JSON_DEPTH:
            raise CorruptCheckpointError(f"{where}: manifest nests JSON deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a shardckpt manifest")
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{where}: format version {version!r:.20} is not supported "
                                         f"by this shardckpt (reads version {FORMAT_VERSION})")
        _check_manifest_checksum(d, where)
        try:
            step = d.get("step")
            if step is not None:
                _int(step, f"{where}: step")
            items = {}
            for name, rec in _dict(d["items"], where).items():
                rec = _dict(rec, f"{where}: item {name!r}")
                # required, as written: a damaged key must not read as "no arrays"
                arrays = {str(k): parse_array_spec(k, v, where) for k, v in _dict(rec["arrays"], where).items()}
                scalars = _dict(rec["scalars"], where)
                for k, v in scalars.items():
                    decode_scalar(k, v, f"{where}: item {name!r}")
                items[str(name)] = ItemRecord(arrays, scalars)
            files = {check_file_name(k, where): _file_record(v, f"{where}: file {k!r}") for k, v in _dict(d["files"], where).items()}
            meta = {check_file_name(k, where): _file_record(v, f"{where}: file {k!r}") for k, v in _dict(d["meta_files"], where).items()}
            index_file = check_file_name(d.get("index", INDEX), where)
            if index_file in meta and meta[index_file].size > MAX_INDEX_BYTES:
                raise CorruptCheckpointError(f"{where}: chunk index {index_file} is {meta[index_file].size} bytes, "
                                             f"over the limit of {MAX_INDEX_BYTES}")
            metrics = _dict(d.get("metrics", {}), where)
            host_count = _int(d.get("host_count", 1), f"{where}: host_count", 1)
            created = d.get("created", "")
            transaction = d.get("transaction", "")
            if not isinstance(created, str) or not isinstance(transaction, str):
                raise CorruptCheckpointError(f"{where}: malformed created/transaction field")
            writers = _dict(d.get("writers", {}), where)
        except CorruptCheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e!s:.200})") from e
        return cls(step=step, items=items, files=files, meta_files=meta, metrics=metrics,
                   created=created, writers=writers, host_count=host_count, index_file=index_file,
                   transaction=transaction[:64])


def canonical_json(doc: Any) -> bytes:
    """The canonical serialisation a manifest checksum covers: ``json.dumps(doc,
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)``, UTF-8
    (pure ASCII). Insensitive to whitespace, key order and escapes of the file; sensitive
    to every key and value."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def manifest_checksum(doc: dict) -> str:
    """``"xxh3-64:<16 hex digits>"`` of the canonical JSON of ``doc`` without its checksum."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    return f"{CHECKSUM_ALGO}:{xxhash.xxh3_64(canonical_json(body)).hexdigest()}"


def seal_manifest(doc: dict) -> dict:
    """``doc`` with its checksum (re)computed: for tools and tests that write manifests."""
    doc = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    doc[CHECKSUM_FIELD] = manifest_checksum(doc)
    return doc


def _check_manifest_checksum(d: dict, where: str) -> None:
    if CHECKSUM_FIELD not in d:
        # Written by shardckpt before manifests carried a checksum: accepted as legacy, but
        # only with exactly the fields that release wrote (a bit flip in the checksum's
        # own name would otherwise turn a sealed manifest into an unchecked one).
        extra = sorted(set(d) - _LEGACY_FIELDS)
        if extra:
            raise CorruptCheckpointError(f"{where}: manifest has no checksum and unknown fields {extra!r:.200}")
        return
    got = d[CHECKSUM_FIELD]
    if not isinstance(got, str) or not _CHECKSUM.fullmatch(got):
        raise CorruptCheckpointError(f"{where}: manifest checksum {got!r:.80} is malformed")
    want = manifest_checksum(d)
    if got != want:
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch (recorded {got}, content has {want}); "
                                     f"{MANIFEST} is damaged")


def json_depth(doc: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), iteratively: no recursion limit."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if depth > deepest:
            deepest = depth
            if depth > MAX_JSON_DEPTH:
                return depth
        stack.extend((x, depth + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise CorruptCheckpointError(f"{where}: expected a JSON object, got {type(v).__name__}")
    return v


def _file_record(v: Any, what: str) -> FileRecord:
    v = _dict(v, what)
    xxh = v.get("xxh3_64")
    if not isinstance(xxh, str) or not re.fullmatch(r"[0-9a-f]{16}", xxh):
        raise CorruptCheckpointError(f"{what}: malformed checksum {xxh!r:.40}")
    writer, item = v.get("writer", {}), v.get("item")
    if not isinstance(writer, dict) or not (item is None or isinstance(item, str)):
        raise CorruptCheckpointError(f"{what}: malformed item or writer record")
    return FileRecord(_int(v.get("size"), f"{what} size"), xxh, item, writer)


# --- chunk index --------------------------------------------------------------------------

INDEX_VERSION = 2                # columnar; readers also accept version 1 (one row per chunk)
_COLUMNS = ("file", "box", "data_offset", "nbytes", "crc", "member")
_BLOB_DTYPES = {"file": "<i4", "box": "<i8", "data_offset": "<i8", "nbytes": "<i8", "crc": "<u4"}


class ChunkTable(Sequence):
    """The chunks of one array, as validated columns: behaves like the list of ``(file,
    ChunkRecord)`` it replaces (``len``, indexing, iteration, ``==`` with a list) and makes
    records only when asked. ``overlapping(offset, shape)`` finds, with numpy, the chunks
    that meet a box."""

    __slots__ = ("key", "files", "fidx", "offs", "shps", "doff", "nbytes", "crc", "members", "_ends", "_full",
                 "_sorted")

    def __init__(self, key: str, files: list[str], fidx: np.ndarray, offs: np.ndarray, shps: np.ndarray,
                 doff: np.ndarray, nbytes: np.ndarray, crc: np.ndarray, members: list[str]):
        self.key, self.files, self.members = key, files, members
        self.fidx, self.offs, self.shps, self.doff, self.nbytes, self.crc = fidx, offs, shps, doff, nbytes, crc
        self._ends = None
        self._full = None

    def __len__(self) -> int:
        return len(self.members)

    def _record(self, i: int) -> tuple[str, ChunkRecord]:
        do = int(self.doff[i])
        return (self.files[int(self.fidx[i])],
                ChunkRecord(self.key, self.members[i], tuple(self.offs[i].tolist()), tuple(self.shps[i].tolist()),
                            None if do < 0 else do, int(self.nbytes[i]), int(self.crc[i])))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chunk index out of range")
        return self._record(i)

    def __iter__(self):
        files, key = self.files, self.key
        tuples: dict[tuple, tuple] = {}       # equal offsets and shapes share one object
        for fi, m, o, s, do, nb, c in zip(self.fidx.tolist(), self.members, self.offs.tolist(), self.shps.tolist(),
                                          self.doff.tolist(), self.nbytes.tolist(), self.crc.tolist()):
            o = tuple(o)
            s = tuple(s)
            yield files[fi], ChunkRecord(key, m, tuples.setdefault(o, o), tuples.setdefault(s, s),
                                         None if do < 0 else do, nb, c)

    def __eq__(self, other) -> bool:
        if isinstance(other, (ChunkTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"ChunkTable({self.key!r}, {len(self)} chunks)"

    def file_names(self) -> set[str]:
        """The names of the files holding these chunks."""
        return {self.files[i] for i in np.unique(self.fidx).tolist()}

    def overlapping_rows(self, offset, shape) -> list[int]:
        """Row numbers, ascending, of the chunks meeting box ``offset``..``offset+shape``
        (the rule of ``plan.box_overlap``: touching is not meeting, except for empty
        boxes). A binary search on the first dimension narrows the candidates; few are
        tested in Python, many with numpy."""
        nd = self.offs.shape[1]
        lo = [int(v) for v in offset]
        size = [int(v) for v in shape]
        if len(lo) != nd or len(size) != nd:
            raise ValueError(f"box {offset}+{shape} does not have the {nd} dimensions of {self.key!r}")
        hi = [a + n for a, n in zip(lo, size)]
        nonempty = all(n > 0 for n in size)
        n = len(self)
        if self._ends is None:
            self._ends = self.offs + self.shps
            self._full = (self.shps > 0).all(axis=1)
            if nd and n:
                order = np.argsort(self.offs[:, 0], kind="stable")
                self._sorted = (order.tolist(), self.offs[order, 0].tolist(), int(self.shps[:, 0].max()))
        if nd and n:
            order, starts, longest = self._sorted
            # a chunk meeting the box starts in [lo0 - longest, hi0] along the first dimension
            a = bisect.bisect_left(starts, lo[0] - longest)
            b = bisect.bisect_right(starts, hi[0])
            rows = sorted(order[a:b])
        else:
            rows = list(range(n))
        if len(rows) <= 32:
            out = []
            offs, ends, full = self.offs, self._ends, self._full
            for r in rows:
                x = [max(u, v) for u, v in zip(offs[r].tolist(), lo)]
                y = [min(u, v) for u, v in zip(ends[r].tolist(), hi)]
                if any(q < p for p, q in zip(x, y)):
                    continue
                if nonempty and full[r] and any(q == p for p, q in zip(x, y)):
                    continue
                out.append(r)
            return out
        idx = np.array(rows, dtype=np.intp)
        lo_a, hi_a = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
        x = np.maximum(self.offs[idx], lo_a)
        y = np.minimum(self._ends[idx], hi_a)
        hit = (y >= x).all(axis=1)
        if nonempty:
            hit &= ~((y == x).any(axis=1) & self._full[idx])
        return idx[hit].tolist()

    def overlapping(self, offset, shape) -> list[tuple[str, ChunkRecord]]:
        """The ``(file, ChunkRecord)`` of the chunks meeting the box, in index order."""
        return [self._record(i) for i in self.overlapping_rows(offset, shape)]


@dataclass
class IndexArrayColumns:
    """One array's chunks as columns, as written to and read from a version-2 index."""

    fidx: np.ndarray        # int64[n], file numbers
    offs: np.ndarray        # int64[n, nd]
    shps: np.ndarray        # int64[n, nd]
    doff: np.ndarray        # int64[n], -1: compressed
    nbytes: np.ndarray      # int64[n]
    crc: np.ndarray         # int64[n]
    members: list


@dataclass
class IndexColumns:
    """A whole index as columns: what ``dump_index`` serialises and ``check_index`` checks."""

    files: list[str]
    items: dict[str, dict[str, IndexArrayColumns]]


def index_columns(chunks_by_item: Any) -> IndexColumns:
    """``{item: {key: [(file, chunk), ...] or ChunkTable}}`` as columns, in one pass over the
    records. Values no index can hold (non-integers, mixed ranks, integers beyond int64)
    raise ``CorruptCheckpointError``."""
    if isinstance(chunks_by_item, IndexColumns):
        return chunks_by_item
    fmap: dict[str, int] = {}
    items: dict[str, dict[str, IndexArrayColumns]] = {}
    get_off, get_shp = operator.attrgetter("offset"), operator.attrgetter("shape")
    get_do, get_nb, get_crc = operator.attrgetter("data_offset"), operator.attrgetter("nbytes"), operator.attrgetter("crc32")
    get_member = operator.attrgetter("member")
    first, second = operator.itemgetter(0), operator.itemgetter(1)
    for item, by_key in chunks_by_item.items():
        out = items[item] = {}
        for key, rows in by_key.items():
            what = f"chunk index: chunks of {key!r}"
            if isinstance(rows, ChunkTable):
                remap = np.array([fmap.setdefault(f, len(fmap)) for f in rows.files], dtype=np.int64)
                out[key] = IndexArrayColumns(remap[rows.fidx] if len(rows) else np.zeros(0, np.int64), rows.offs, rows.shps,
                                    rows.doff, rows.nbytes, rows.crc, list(rows.members))
                continue
            fs = list(map(first, rows))
            uniq = dict.fromkeys(fs)
            missing = uniq.keys() - fmap.keys()
            if missing:                          # new names numbered in order of appearance
                new = [f for f in uniq if f in missing]
                fmap.update(zip(new, range(len(fmap), len(fmap) + len(new))))
            fidx = np.array(list(map(fmap.__getitem__, fs)), dtype=np.int64)
            cs = list(map(second, rows))
            try:
                offs, shps = _int_matrix(list(map(get_off, cs)), what), _int_matrix(list(map(get_shp, cs)), what)
                dos = list(map(get_do, cs))
                if None in dos:
                    dos = [-1 if d is None else d for d in dos]
                doff = _int_vector(dos, what)
                nbytes = _int_vector(list(map(get_nb, cs)), what)
                crc = _int_vector(list(map(get_crc, cs)), what)
            except (TypeError, ValueError, OverflowError) as e:
                raise CorruptCheckpointError(f"{what}: a chunk record has malformed values ({e!s:.200})") from e
            if shps.shape != offs.shape:
                raise CorruptCheckpointError(f"{what}: chunk boxes of different ranks")
            out[key] = IndexArrayColumns(fidx, offs, shps, doff, nbytes, crc, list(map(get_member, cs)))
    return IndexColumns(list(fmap), items)


def _int_vector(values: list, what: str) -> np.ndarray:
    """Integers as int64; anything NumPy does not read as int64 (floats, strings, bools
    alone, integers beyond int64) refused."""
    try:
        a = np.array(values)
    except (TypeError, ValueError, OverflowError) as e:
        raise CorruptCheckpointError(f"{what}: a chunk record has malformed values ({e!s:.200})") from e
    if len(values) and a.dtype != np.int64:
        raise CorruptCheckpointError(f"{what}: a chunk record has a value that is not an integer")
    return a.astype(np.int64, copy=False)


def _int_matrix(tuples: list, what: str) -> np.ndarray:
    """Equal-length tuples of integers as an int64 array (n, len). Equal tuples (most
    chunk shapes, the offsets of one participant) are converted once."""
    try:
        uniq = dict.fromkeys(tuples)
    except TypeError:                    # lists: unhashable, converted one by one
        uniq = dict.fromkeys(map(tuple, tuples))
        tuples = list(map(tuple, tuples))
    ranks = set(map(len, uniq))
    if len(ranks) > 1:
        raise CorruptCheckpointError(f"{what}: chunk boxes of different ranks")
    if ranks <= {0}:
        return np.zeros((len(tuples), 0), np.int64)
    table = _int_vector(list(uniq), what)
    if table.ndim != 2:
        raise CorruptCheckpointError(f"{what}: chunk boxes of different ranks")
    if len(uniq) == len(tuples):
        return table
    if len(uniq) == 1:
        return np.repeat(table, len(tuples), axis=0)
    code = {t: i for i, t in enumerate(uniq)}
    return table[np.array(list(map(code.__getitem__, tuples)), dtype=np.intp)]


def dump_index(chunks_by_item: Any) -> bytes:
    """Serialise ``{item: {key: [(file, chunk), ...] or ChunkTable}}`` (or ``IndexColumns``)
    as a version-2 index: per array, little-endian columns as msgpack binaries."""
    cols = index_columns(chunks_by_item)
    items = {item: {key: encode_columns(key, c) for key, c in by_key.items()} for item, by_key in cols.items.items()}
    return msgpack.packb({"version": INDEX_VERSION, "files": cols.files, "items": items}, use_bin_type=True)


def encode_columns(key: str, c: IndexArrayColumns) -> dict:
    """One array's chunks as the msgpack map of a version-2 index (also the rows of one
    array in an index fragment): little-endian column blobs and the member names."""
    n = len(c.members)
    if n and (int(c.crc.min()) < 0 or int(c.crc.max()) > 0xFFFFFFFF):
        raise CorruptCheckpointError(f"chunk index: chunks of {key!r}: a checksum is not a CRC-32")
    box = np.stack([c.offs.reshape(n, -1), c.shps.reshape(n, -1)], axis=1) if n else np.zeros(0, np.int64)
    return {"file": c.fidx.astype("<i4").tobytes(), "box": box.astype("<i8").tobytes(),
            "data_offset": c.doff.astype("<i8").tobytes(), "nbytes": c.nbytes.astype("<i8").tobytes(),
            "crc": c.crc.astype("<u4").tobytes(), "member": c.members}


def dump_index_v1(chunks_by_item: dict[str, dict[str, list[tuple[str, ChunkRecord]]]]) -> bytes:
    """The version-1 layout (one row per chunk) that shardckpt wrote before version 2: for
    tests and tools; ``load_index`` reads both."""
    files: dict[str, int] = {}
    items: dict[str, dict[str, list]] = {}
    for item, by_key in chunks_by_item.items():
        out = items.setdefault(item, {})
        for key, rows in by_key.items():
            out[key] = [[files.setdefault(f, len(files)), c.member, list(c.offset), list(c.shape),
                         -1 if c.data_offset is None else c.data_offset, c.nbytes, c.crc32] for f, c in rows]
    return msgpack.packb({"version": 1, "files": list(files), "items": items}, use_bin_type=True)


def check_index(cols: IndexColumns, manifest: Manifest, where: str) -> dict[str, dict[str, ChunkTable]]:
    """Validate an index given as columns against the manifest with exactly the checks
    ``load_index`` runs (it calls this for version 2): the committer runs it on the
    columns it serialises, so a commit never publishes what a load would refuse."""
    state = IndexValidator(manifest, where)
    state.set_files(cols.files)
    for item, by_key in cols.items.items():
        specs = state.item_specs(item)
        for key, c in by_key.items():
            state._count(len(c.members))
            state.add(item, key, specs, c)
    return state.finish()


def load_index(raw: bytes, manifest: Manifest, where: str) -> dict[str, dict[str, ChunkTable]]:
    """Parse and validate the chunk index (version 2, columnar, or version 1, rows) against
    the manifest: every chunk names a file of the manifest, lies inside its array, has the
    byte count its shape implies, and the chunks of each array tile it exactly (no gap, no
    overlap; see ``check_boxes``).

    The index is read as a stream, one array at a time; each array's chunks are checked as
    numpy columns and kept as a ``ChunkTable`` (no per-chunk objects). Any damage raises
    ``CorruptCheckpointError``."""
    if len(raw) > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{where}: chunk index is {len(raw)} bytes, over the limit of {MAX_INDEX_BYTES}")
    state = IndexValidator(manifest, where)
    with no_cyclic_gc():     # a version-1 index makes 10^6 lists: gen-2 collections would be quadratic
        _read_index(raw, state, where)
    return state.finish()


@contextlib.contextmanager
def no_cyclic_gc():
    """Pause the cyclic garbage collector while 10^5-10^6 small objects are made or walked
    (its generation-2 passes would make that quadratic); reference counting still frees."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _read_index(raw: bytes, state: IndexValidator, where: str) -> None:
    try:
        up = index_unpacker(raw)
        seen: set = set()
        items_raw = None
        for _ in range(up.read_map_header()):
            name = up.unpack()
            if not isinstance(name, str) or name in seen:
                raise CorruptCheckpointError(f"{where}: chunk index has a malformed or repeated field {name!r:.40}")
            seen.add(name)
            if name == "files":
                state.set_files(up.unpack())
            elif name == "version":
                state.set_version(up.unpack())
            elif name == "items":
                if state.version is None and state.files is not None:
                    state.version = 1        # written before the field existed (version 2 writes it first)
                if state.files is None:      # not the order we write; decode it whole
                    items_raw = msgpack.packb(up.unpack(), use_bin_type=True)
                else:
                    state.read_items(up)
            else:
                up.skip()
        try:
            up.unpack()
        except msgpack.OutOfData:
            pass
        else:
            raise CorruptCheckpointError(f"{where}: chunk index has trailing data")
        if "files" not in seen or "items" not in seen:
            raise CorruptCheckpointError(f"{where}: chunk index lacks {'files' if 'files' not in seen else 'items'}")
        if state.version is None:
            state.version = 1            # indexes written before the field existed
        if items_raw is not None:
            state.read_items(index_unpacker(items_raw))
    except CorruptCheckpointError:
        raise
    except Exception as e:   # msgpack errors, wrong types, ints beyond int64, ...
        raise CorruptCheckpointError(f"{where}: malformed chunk index ({type(e).__name__}: {e!s:.200})") from e


def index_unpacker(raw: bytes) -> msgpack.Unpacker:
    return msgpack.Unpacker(io.BytesIO(raw), raw=False, strict_map_key=True, read_size=1 << 20,
                            max_buffer_size=max(len(raw), 1 << 20), max_array_len=MAX_INDEX_CHUNKS + 1)


def _ints(values: list, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A list of Python ints (never bools, floats or strings) as int64; larger ones refused."""
    if values and not set(map(type, values)) <= {int}:
        raise CorruptCheckpointError(f"{what}: expected integers")
    try:
        a = np.array(values, dtype=np.int64)
    except OverflowError:
        raise CorruptCheckpointError(f"{what}: integer out of range") from None
    return a.reshape(shape) if shape is not None else a


_LO_BITS = 31
_LO_MASK = (1 << _LO_BITS) - 1


class IndexValidator:
    """Validation state of one index: the files, bytes claimed per file, output. Both
    ``load_index`` (versions 1 and 2) and ``check_index`` (the committer) end in ``add``."""

    def __init__(self, manifest: Manifest, where: str):
        self.manifest, self.where = manifest, where
        self.files: list[str] | None = None
        self.version: int | None = None
        self.claims: list[tuple[np.ndarray, np.ndarray]] = []
        self.out: dict[str, dict[str, ChunkTable]] = {}
        self.chunks = 0

    def set_version(self, v: Any) -> None:
        if type(v) is not int or v not in (1, INDEX_VERSION) or self.version not in (None, v):
            raise CorruptCheckpointError(f"{self.where}: chunk index version {v!r:.20} is not supported "
                                         f"(this shardckpt reads versions 1 and {INDEX_VERSION})")
        self.version = v

    def set_files(self, files: Any) -> None:
        where = self.where
        if not isinstance(files, list):
            raise CorruptCheckpointError(f"{where}: chunk index files are not a list")
        files = [check_file_name(f, where) for f in files]
        for f in files:
            if f not in self.manifest.files:
                raise CorruptCheckpointError(f"{where}: index names file {f!r} that the manifest does not list")
        self.files = files
        self.sizes = np.array([self.manifest.files[f].size for f in files], dtype=np.int64)
        self.claims: list[tuple[np.ndarray, np.ndarray]] = []    # (file numbers, nbytes) of stored chunks
        self.claimed: tuple[np.ndarray, np.ndarray] | None = None  # checked totals so far (low, high bits)
        self.inflated: dict[int, int] = {}

    def item_specs(self, item: Any) -> dict[str, ArraySpec]:
        if not isinstance(item, str) or item not in self.manifest.items:
            raise CorruptCheckpointError(f"{self.where}: index has unknown item {item!r:.100}")
        if item in self.out:
            raise CorruptCheckpointError(f"{self.where}: index lists item {item!r} twice")
        self.out[item] = {}
        return self.manifest.items[item].arrays

    def read_items(self, up: msgpack.Unpacker) -> None:
        where = self.where
        for _ in range(up.read_map_header()):
            item = up.unpack()
            specs = self.item_specs(item)
            item_out = self.out[item]
            for _ in range(up.read_map_header()):
                key = up.unpack()
                if not isinstance(key, str) or key not in specs:
                    raise CorruptCheckpointError(f"{where}: index has chunks for unknown array {key!r:.200}")
                if key in item_out:
                    raise CorruptCheckpointError(f"{where}: index lists the chunks of {key!r} twice")
                cols = self._read_rows(up, key, specs[key]) if self.version == 1 else \
                    self.read_columns(up, key, specs[key])
                self.add(item, key, specs, cols)

    def finish(self) -> dict[str, dict[str, ChunkTable]]:
        where, out = self.where, self.out
        self.check_claims()
        for item, specs in ((i, r.arrays) for i, r in self.manifest.items.items()):
            if specs and item not in out:
                raise CorruptCheckpointError(f"{where}: item {item!r} has no chunks in the index")
            for key in specs if item in out else ():
                if key not in out[item]:
                    raise CorruptCheckpointError(f"{where}: array {key!r} of item {item!r} has no chunks")
        return out

    def _count(self, n: int) -> None:
        self.chunks += n
        if self.chunks > MAX_INDEX_CHUNKS:
            raise CorruptCheckpointError(f"{self.where}: chunk index has more than {MAX_INDEX_CHUNKS} chunks")

    def read_columns(self, up: msgpack.Unpacker, key: str, spec: ArraySpec) -> IndexArrayColumns:
        """One array of a version-2 index: a map of column blobs and the member names; each
        blob's length is checked against the chunk count and rank before it is viewed."""
        what = f"{self.where}: chunks of {key!r}"
        nd = len(spec.stored_shape)
        d: dict[str, Any] = {}
        for _ in range(up.read_map_header()):
            name = up.unpack()
            if name not in _COLUMNS or name in d:
                raise CorruptCheckpointError(f"{what}: malformed or repeated column {name!r:.40}")
            d[name] = up.unpack()       # arrays are capped at MAX_INDEX_CHUNKS entries (index_unpacker)
            if name == "member":
                if type(d[name]) is not list:
                    raise CorruptCheckpointError(f"{what}: member names are not a list")
                self._count(len(d[name]))
        missing = [c for c in _COLUMNS if c not in d]
        if missing:
            raise CorruptCheckpointError(f"{what}: columns {missing} are missing")
        members = d["member"]
        n = len(members)
        arrays = {}
        for name, dt in _BLOB_DTYPES.items():
            blob = d[name]
            width = 2 * nd if name == "box" else 1
            if type(blob) is not bytes or len(blob) != n * width * np.dtype(dt).itemsize:
                raise CorruptCheckpointError(f"{what}: column {name!r} is not {n} x {width} {dt} values "
                                             f"({type(blob).__name__} of {len(blob) if hasattr(blob, '__len__') else '?'})")
            arrays[name] = np.frombuffer(blob, dtype=dt).astype(np.int64)
        box = arrays["box"].reshape(n, 2, nd)
        return IndexArrayColumns(arrays["file"], box[:, 0, :], box[:, 1, :], arrays["data_offset"], arrays["nbytes"],
                        arrays["crc"], members)

    def _read_rows(self, up: msgpack.Unpacker, key: str, spec: ArraySpec) -> IndexArrayColumns:
        """One array of a version-1 index: rows, gathered into columns (types checked)."""
        what = f"{self.where}: chunk of {key!r}"
        nfiles = len(self.files)
        nd = len(spec.stored_shape)
        n = up.read_array_header()
        self._count(n)
        unpack = up.unpack
        cf, cd, cn, cc, flat, members = [], [], [], [], [], []
        for _ in range(n):
            row = unpack()
            if type(row) is not list or len(row) != 7:
                raise CorruptCheckpointError(f"{what}: malformed row {row!r:.200}")
            fi, member, off, shp, do, nb, c = row
            if type(off) is not list or type(shp) is not list or len(off) != nd or len(shp) != nd:
                raise CorruptCheckpointError(f"{what}: box {off!r:.100}+{shp!r:.100} does not have the "
                                             f"{nd} dimensions of the array")
            if type(fi) is not int or not 0 <= fi < nfiles:
                raise CorruptCheckpointError(f"{what}: file number {fi!r:.40} is not in [0, {nfiles - 1}]")
            flat += off
            flat += shp
            cf.append(fi)
            cd.append(do)
            cn.append(nb)
            cc.append(c)
            members.append(member)
        if members and not set(map(type, members)) <= {str}:
            raise CorruptCheckpointError(f"{what}: malformed member name")
        box = _ints(flat, what, (n, 2, nd)) if n else np.zeros((0, 2, nd), np.int64)
        return IndexArrayColumns(np.array(cf, dtype=np.int64), box[:, 0, :], box[:, 1, :], _ints(cd, what),
                        _ints(cn, what), _ints(cc, what), members)

    def add(self, item: str, key: Any, specs: dict[str, ArraySpec], c: IndexArrayColumns) -> None:
        """Check one array's columns (the checks of every index version and of the commit)
        and keep them as a ``ChunkTable``."""
        where = self.where
        if not isinstance(key, str) or key not in specs:
            raise CorruptCheckpointError(f"{where}: index has chunks for unknown array {key!r:.200}")
        item_out = self.out[item]
        if key in item_out:
            raise CorruptCheckpointError(f"{where}: index lists the chunks of {key!r} twice")
        table = self.check_rows(key, specs[key], c)
        check_boxes(key, specs[key].stored_shape, table.offs, table.shps, where)
        item_out[key] = table

    def check_rows(self, key: str, spec: ArraySpec, c: IndexArrayColumns) -> ChunkTable:
        """Every check of one array's chunk rows except the tiling (which needs all of its
        rows): files, bounds, byte counts, offsets inside the files, CRC range, bytes
        claimed per file. Used alone for the rows of one index fragment."""
        where = self.where
        what = f"{where}: chunk of {key!r}"
        files, sizes = self.files, self.sizes
        nfiles = len(files)
        gshape = spec.stored_shape
        nd = len(gshape)
        members = c.members
        n = len(members)
        if members and not set(map(type, members)) <= {str}:
            raise CorruptCheckpointError(f"{what}: malformed member name")
        fidx, offs, shps, doff, nbytes, crc = c.fidx, c.offs, c.shps, c.doff, c.nbytes, c.crc
        if n == 0:
            offs = shps = np.zeros((0, nd), np.int64)
        for col in (fidx, doff, nbytes, crc):
            if col.shape != (n,) or col.dtype != np.int64:
                raise CorruptCheckpointError(f"{what}: malformed chunk columns")
        for col in (offs, shps):
            if col.shape != (n, nd) or col.dtype != np.int64:
                raise CorruptCheckpointError(f"{what}: chunk boxes do not have the {nd} dimensions of the array")
        bad = np.flatnonzero((fidx < 0) | (fidx >= nfiles))
        if bad.size:
            raise CorruptCheckpointError(f"{what}: file number {int(fidx[bad[0]])} is not in [0, {nfiles - 1}]")
        check_inside(what, offs, shps, gshape)
        itemsize = real_dtype(spec.stored_dtype).itemsize
        # exact: with every dim >= 1, partial products are at most the array's element count
        vols = shps.prod(axis=1) if math.prod(gshape) else np.zeros(n, np.int64)
        bad = np.flatnonzero(nbytes != vols * itemsize)
        if bad.size:
            i = int(bad[0])
            raise CorruptCheckpointError(f"{what}: {int(nbytes[i])} bytes do not match shape {tuple(shps[i].tolist())}")
        fsize = sizes[fidx]
        # nbytes <= 2^50 * itemsize here and doff is compared first: no overflow decides
        bad = np.flatnonzero((doff < -1) | (doff > fsize) | ((doff >= 0) & (doff + nbytes > fsize)))
        if bad.size:
            i = int(bad[0])
            raise CorruptCheckpointError(f"{what}: bytes beyond the end of {files[int(fidx[i])]}")
        bad = np.flatnonzero((crc < 0) | (crc > 0xFFFFFFFF))
        if bad.size:
            raise CorruptCheckpointError(f"{what}: checksum {int(crc[bad[0]])} is not a CRC-32")
        self._claim(what, fidx, doff, nbytes)
        return ChunkTable(key, files, fidx, offs, shps, doff, nbytes, crc, members)

    def _claim(self, what: str, fidx: np.ndarray, doff: np.ndarray, nbytes: np.ndarray) -> None:
        """Bytes claimed per file: stored chunks at most the file's size (summed over the
        whole index in ``check_claims``), compressed ones (their inflated size) at most
        deflate's ratio times it; exact, no int64 overflow."""
        if not len(fidx):
            return
        files, sizes = self.files, self.sizes
        stored = doff >= 0
        if stored.all():
            self.claims.append((fidx, nbytes))
            return
        self.claims.append((fidx[stored], nbytes[stored]))
        inflated = self.inflated
        for fi, nb in zip(fidx[~stored].tolist(), nbytes[~stored].tolist()):
            inflated[fi] = inflated.get(fi, 0) + nb
        for fi in np.unique(fidx[~stored]).tolist():
            if inflated[fi] > MAX_DEFLATE_RATIO * int(sizes[fi]) + 65536:
                raise CorruptCheckpointError(f"{what}: the chunks of {files[fi]} claim more bytes than it holds")

    def check_claims(self) -> None:
        if not self.claims or self.files is None:
            return
        f = np.concatenate([c[0] for c in self.claims])
        nb = np.concatenate([c[1] for c in self.claims])
        self.claims = []
        nf = len(self.files)
        # nbytes < 2^55 and at most 2^22 chunks: each part's float sum stays below 2^53 (exact)
        lo = np.bincount(f, weights=(nb & _LO_MASK).astype(np.float64), minlength=nf).astype(np.int64)
        hi = np.bincount(f, weights=(nb >> _LO_BITS).astype(np.float64), minlength=nf).astype(np.int64)
        if self.claimed is not None:       # running totals: the fragments of one index, in turns
            lo += self.claimed[0]
            hi += self.claimed[1]
        hi += lo >> _LO_BITS
        lo &= _LO_MASK
        self.claimed = (lo, hi)
        s = self.sizes
        over = np.flatnonzero((hi > (s >> _LO_BITS)) | ((hi == (s >> _LO_BITS)) & (lo > (s & _LO_MASK))))
        if over.size:
            raise CorruptCheckpointError(f"{self.where}: the chunks of {self.files[int(over[0])]} claim more bytes "
                                         "than it holds")


# --- exact tiling ---------------------------------------------------------------------------

_GRID_CELLS_PER_BOX = 8          # a painted grid has at most this many cells per chunk (+64 Ki)
_GRID_MIN_CELLS = 1 << 16
_SWEEP_BUDGET = 1 << 28          # coordinate comparisons the irregular sweep may make


def check_tiling(key: str, shape: tuple[int, ...], chunks: list[ChunkRecord], where: str) -> None:
    """The chunks of one array must cover it exactly once (see ``check_boxes``)."""
    nd = len(shape)
    offs = np.array([c.offset for c in chunks], dtype=np.int64).reshape(len(chunks), nd)
    shps = np.array([c.shape for c in chunks], dtype=np.int64).reshape(len(chunks), nd)
    check_boxes(key, tuple(shape), offs, shps, where)


def check_inside(what: str, offs: np.ndarray, shps: np.ndarray, shape: tuple[int, ...]) -> None:
    """Every box ``offs[i] .. offs[i] + shps[i]`` lies inside an array of ``shape`` (no
    int64 overflow decides: offsets and sizes are compared with the shape first)."""
    if not len(offs):
        return
    g = np.array(shape, dtype=np.int64).reshape(offs.shape[1])
    bad = np.flatnonzero(((offs < 0) | (shps < 0) | (offs > g) | (shps > g) | (offs + shps > g)).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise CorruptCheckpointError(f"{what}: box {tuple(offs[i].tolist())}+{tuple(shps[i].tolist())} "
                                     f"lies outside the array {tuple(shape)}")


def check_boxes(key: str, shape: tuple[int, ...], offs: np.ndarray, shps: np.ndarray, where: str) -> None:
    """Boxes ``offs[i] .. offs[i] + shps[i]`` (int64 arrays of shape (n, ndim)) tile the
    array ``shape`` exactly: each inside it, no element covered twice, none left out.

    Exact for every count. Inside the bounds, with volumes summing to the array's,
    "no two boxes overlap" is equivalent to an exact tiling, so only disjointness is
    tested, on the coordinate-compressed grid (the distinct box boundaries of each dim):

    * every box is one cell of that grid (regular layouts: what sharding produces): the
      boxes are disjoint iff their cell coordinates are distinct; a sort,
      O(d * n log n);
    * the grid has at most ``8 n + 65536`` cells (a regular grid with some boxes merged or
      split, e.g. replicated shards split by row): each box is painted into a bitmap of
      cells, stopping at the first cell painted twice; O(d * n log n + cells);
    * otherwise (irregular layouts): a sweep along the dimension whose boxes are cut by
      the fewest sweep lines, comparing each box, vectorised, with the boxes still open at
      its start; O(d * n log n + d * sum of open boxes), worst case O(d * n^2). That sum is
      computed before the sweep; a layout needing more than 2^28 comparisons (no shardckpt
      writer produces one) is refused as too irregular rather than validated for minutes.
    """
    n, nd = offs.shape
    what = f"{where}: chunks of {key!r}"
    if nd != len(shape):
        raise CorruptCheckpointError(f"{what}: chunk boxes have {nd} dimensions, the array {len(shape)}")
    check_inside(what, offs, shps, tuple(shape))
    total = math.prod(shape)
    if total == 0:       # nothing to cover; every box inside is empty
        if not n:
            raise CorruptCheckpointError(f"{what}: cover 0 of 0 elements (an array needs at least one chunk)")
        return
    # all dims >= 1 and the product <= MAX_ELEMENTS: a box's volume never overflows
    vols = shps.prod(axis=1) if nd else np.ones(n, np.int64)
    if float(vols.sum(dtype=np.float64)) > 2.0 * total:
        raise CorruptCheckpointError(f"{what}: cover more than {total} elements (overlapping chunks)")
    covered = int(vols.sum())                          # < 2^52: no int64 overflow
    if covered != total:
        raise CorruptCheckpointError(f"{what}: cover {covered} of {total} elements")
    keep = vols > 0
    offs, shps = offs[keep], shps[keep]
    m = offs.shape[0]
    if m <= 1:
        return
    s0 = shps[0]
    if (shps == s0).all() and not (offs % s0).any():
        # one chunk shape, offsets on its grid (what sharding produces): the boxes are cells
        # of that grid, disjoint iff their cell numbers differ (fewer than 2^50 cells)
        stride, strides = 1, []
        for dim, step in zip(reversed(shape), reversed(s0.tolist())):
            strides.append(stride)
            stride *= -(-dim // step)
        code = (offs // s0) @ np.array(strides[::-1], dtype=np.int64)
        code.sort()
        if not (code[1:] == code[:-1]).any():
            return
        # an overlap: found and named by the general test below
    ends = offs + shps
    lo = np.empty_like(offs)
    hi = np.empty_like(offs)
    ncells = []
    for k in range(nd):
        c = np.unique(np.concatenate([offs[:, k], ends[:, k]]))
        lo[:, k] = np.searchsorted(c, offs[:, k])
        hi[:, k] = np.searchsorted(c, ends[:, k])
        ncells.append(len(c) - 1)
    if ((hi - lo) == 1).all():
        _check_distinct_cells(what, lo, offs)
        return
    cells = 1
    limit = _GRID_CELLS_PER_BOX * m + _GRID_MIN_CELLS
    for c in ncells:
        cells *= c
        if cells > limit:
            break
    if cells <= limit:
        _paint(what, lo, hi, ncells, offs)
    else:
        _sweep(what, offs, ends)


def _overlap_error(what: str, offs: np.ndarray, i: int, j: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{what}: overlap at {tuple(offs[i].tolist())} and {tuple(offs[j].tolist())} "
                                  "(and so leave elements uncovered)")


def _check_distinct_cells(what: str, cells: np.ndarray, offs: np.ndarray) -> None:
    order = np.lexsort(cells.T[::-1])
    s = cells[order]
    dup = np.flatnonzero((s[1:] == s[:-1]).all(axis=1))
    if dup.size:
        i = int(dup[0])
        raise _overlap_error(what, offs, int(order[i]), int(order[i + 1]))


def _paint(what: str, lo: np.ndarray, hi: np.ndarray, ncells: list[int], offs: np.ndarray) -> None:
    grid = np.zeros(ncells, dtype=bool)
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        region = grid[tuple(map(slice, a, b))]
        if region.any():
            # the first box painted before that shares a cell with this one
            j = int(np.flatnonzero(((lo[:i] < hi[i]) & (lo[i] < hi[:i])).all(axis=1))[0])
            raise _overlap_error(what, offs, j, i)
        region[...] = True


def _sweep(what: str, offs: np.ndarray, ends: np.ndarray) -> None:
    m, nd = offs.shape
    # the dimension where boxes open at each box's start are fewest (sum over boxes)
    best = None
    for k in range(nd):
        order = np.argsort(offs[:, k], kind="stable")
        starts = offs[order, k]
        # boxes open when box i starts = boxes started before i (in order) minus those ended
        ended = np.searchsorted(np.sort(ends[:, k]), starts, side="right")
        cost = int((np.arange(m) - ended).sum())
        if best is None or cost < best[0]:
            best = (cost, k, order)
    cost, k, order = best
    if cost * nd > _SWEEP_BUDGET:
        raise CorruptCheckpointError(f"{what}: layout too irregular to validate ({cost} box pairs to compare); "
                                     "refusing it")
    others = [j for j in range(nd) if j != k]
    o_rest, e_rest = offs[:, others], ends[:, others]
    heap: list[tuple[int, int]] = []
    active: list[int] = []
    closed = 0
    done = np.zeros(m, dtype=bool)
    for i in order.tolist():
        start = int(offs[i, k])
        while heap and heap[0][0] <= start:
            done[heapq.heappop(heap)[1]] = True
            closed += 1
        if closed > len(active) // 2:
            active = [j for j in active if not done[j]]
            closed = 0
        if active:
            idx = np.array(active, dtype=np.int64)
            idx = idx[~done[idx]]
            hit = ((o_rest[idx] < e_rest[i]) & (o_rest[i] < e_rest[idx])).all(axis=1)
            if hit.any():
                raise _overlap_error(what, offs, int(idx[np.flatnonzero(hit)[0]]), i)
        active.append(i)
        heapq.heappush(heap, (int(ends[i, k]), i))
