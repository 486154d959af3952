"""The chunk index (``index.msgpack``): where every stored box of every array lies.

Version 2 is columnar (per array, little-endian column blobs in msgpack); readers also
accept version 1 (one row per chunk). ``load_index`` parses and validates an index read
from disk; ``check_index`` runs the very same checks on the columns a committer is about to
write, so a commit never publishes what a load would refuse. ``ChunkTable`` holds one
array's validated rows and answers "which chunks meet this box" with numpy. Indexes too
large to read whole are split into fragments (``fragments.py``).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import io
import math
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format import limits
from shardckpt.format.manifest import Manifest
from shardckpt.format.names import check_file_name
from shardckpt.format.shard import ChunkRecord
from shardckpt.format.tiling import check_boxes, check_inside
from shardckpt.tree import ArraySpec, real_dtype

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
    validated: ArraySpec | None = None    # rows this process validated already, against this spec


class ValidatedRows:
    """One array's rows that this process validated itself (a ``ChunkTable`` of a version it
    checked, its files renamed as the committer carried them), and the spec they were
    checked against. ``check_index`` then checks only what the combination can break (the
    spec is the manifest's, the array is listed once, the bytes claimed per file) instead
    of every row again: a carried base is not validated by every save. Never pickled: the
    knowledge is this process's own, it does not travel to another one.

    ``files``: the table's file list renamed, None for the files not carried (a row naming
    one fails ``index_columns``)."""

    __slots__ = ("table", "spec", "files")

    def __init__(self, table: ChunkTable, spec: ArraySpec, files: list[str | None]):
        self.table, self.spec, self.files = table, spec, files

    def __reduce__(self):
        raise TypeError("ValidatedRows is this process's knowledge; it is never sent to another one")


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
    remaps: dict[int, tuple[list, np.ndarray]] = {}     # file lists of validated rows (one per base index)
    items: dict[str, dict[str, IndexArrayColumns]] = {}
    get_off, get_shp = operator.attrgetter("offset"), operator.attrgetter("shape")
    get_do, get_nb, get_crc = operator.attrgetter("data_offset"), operator.attrgetter("nbytes"), operator.attrgetter("crc32")
    get_member = operator.attrgetter("member")
    first, second = operator.itemgetter(0), operator.itemgetter(1)
    for item, by_key in chunks_by_item.items():
        out = items[item] = {}
        for key, rows in by_key.items():
            what = f"chunk index: chunks of {key!r}"
            if isinstance(rows, ValidatedRows):
                t = rows.table
                known = remaps.get(id(rows.files))
                if known is None or known[0] is not rows.files:
                    known = remaps[id(rows.files)] = (rows.files, np.array(
                        [-1 if f is None else fmap.setdefault(f, len(fmap)) for f in rows.files], dtype=np.int64))
                fidx = known[1][t.fidx] if len(t) else np.zeros(0, np.int64)
                if len(t) and int(fidx.min()) < 0:
                    raise CorruptCheckpointError(f"{what}: a carried row names a file that is not carried")
                out[key] = IndexArrayColumns(fidx, t.offs, t.shps, t.doff, t.nbytes, t.crc, t.members, rows.spec)
                continue
            if isinstance(rows, ChunkTable):
                remap = np.array([fmap.setdefault(f, len(fmap)) for f in rows.files], dtype=np.int64)
                out[key] = IndexArrayColumns(remap[rows.fidx] if len(rows) else np.zeros(0, np.int64), rows.offs, rows.shps,
                                    rows.doff, rows.nbytes, rows.crc, list(rows.members))
                continue
            if len(rows) == 1:
                one = _one_row_columns(rows[0], fmap)
                if one is not None:
                    out[key] = one
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


_INT64 = range(-(1 << 63), 1 << 63)


def _one_row_columns(row: tuple, fmap: dict[str, int]) -> IndexArrayColumns | None:
    """``index_columns`` of an array stored as one chunk whose values are plain Python ints
    within int64 (what a writer reports): the same columns without numpy's list parsing.
    None otherwise (the general path decides, and refuses what no index can hold)."""
    f, c = row
    off, shp, do = c.offset, c.shape, c.data_offset
    do = -1 if do is None else do
    if type(off) is not tuple or type(shp) is not tuple or len(off) != len(shp) \
            or not all(type(v) is int and v in _INT64 for v in (do, c.nbytes, c.crc32, *off, *shp)):
        return None
    nd = len(off)
    return IndexArrayColumns(np.array([fmap.setdefault(f, len(fmap))], dtype=np.int64),
                             np.array(off, dtype=np.int64).reshape(1, nd), np.array(shp, dtype=np.int64).reshape(1, nd),
                             np.array([do], dtype=np.int64), np.array([c.nbytes], dtype=np.int64),
                             np.array([c.crc32], dtype=np.int64), [c.member])


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
    if n == 1:
        one = _encode_one(c)
        if one is not None:
            return one
    if n and (int(c.crc.min()) < 0 or int(c.crc.max()) > 0xFFFFFFFF):
        raise CorruptCheckpointError(f"chunk index: chunks of {key!r}: a checksum is not a CRC-32")
    box = np.stack([c.offs.reshape(n, -1), c.shps.reshape(n, -1)], axis=1) if n else np.zeros(0, np.int64)
    return {"file": c.fidx.astype("<i4").tobytes(), "box": box.astype("<i8").tobytes(),
            "data_offset": c.doff.astype("<i8").tobytes(), "nbytes": c.nbytes.astype("<i8").tobytes(),
            "crc": c.crc.astype("<u4").tobytes(), "member": c.members}


def _encode_one(c: IndexArrayColumns) -> dict | None:
    """``encode_columns`` of one row, the same bytes by ``struct`` (numpy's per-call cost
    dominates one row); None for anything but plain in-range rows (the numpy path decides)."""
    try:
        fi, do, nb, crc = int(c.fidx[0]), int(c.doff[0]), int(c.nbytes[0]), int(c.crc[0])
        off, shp = c.offs.reshape(1, -1)[0].tolist(), c.shps.reshape(1, -1)[0].tolist()
        if not (0 <= fi < 1 << 31 and 0 <= crc <= 0xFFFFFFFF) or len(off) != len(shp):
            return None
        return {"file": struct.pack("<i", fi), "box": struct.pack(f"<{2 * len(off)}q", *off, *shp),
                "data_offset": struct.pack("<q", do), "nbytes": struct.pack("<q", nb), "crc": struct.pack("<I", crc),
                "member": c.members}
    except (struct.error, ValueError, IndexError):
        return None


def check_index(cols: IndexColumns, manifest: Manifest, where: str) -> dict[str, dict[str, ChunkTable]]:
    """Validate an index given as columns against the manifest with exactly the checks
    ``load_index`` runs (it calls this for version 2): the committer runs it on the
    columns it serialises, so a commit never publishes what a load would refuse."""
    state = IndexValidator(manifest, where)
    state.set_files(cols.files)
    for item, by_key in cols.items.items():
        specs = state.item_specs(item)
        for key, c in by_key.items():
            state.count_rows(len(c.members))
            if c.validated is not None and c.validated == specs.get(key):
                state.add_validated(item, key, c)
            else:
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
    if len(raw) > limits.MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{where}: chunk index is {len(raw)} bytes, over the limit of {limits.MAX_INDEX_BYTES}")
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
                            max_buffer_size=max(len(raw), 1 << 20), max_array_len=limits.MAX_INDEX_CHUNKS + 1)


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

    def count_rows(self, n: int) -> None:
        self.chunks += n
        if self.chunks > limits.MAX_INDEX_CHUNKS:
            raise CorruptCheckpointError(f"{self.where}: chunk index has more than {limits.MAX_INDEX_CHUNKS} chunks")

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
            d[name] = up.unpack()       # arrays are capped at limits.MAX_INDEX_CHUNKS entries (index_unpacker)
            if name == "member":
                if type(d[name]) is not list:
                    raise CorruptCheckpointError(f"{what}: member names are not a list")
                self.count_rows(len(d[name]))
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
        self.count_rows(n)
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
        table = self._one_row(key, specs[key], c) if len(c.members) == 1 else None
        if table is None:
            table = self.check_rows(key, specs[key], c)
            check_boxes(key, specs[key].stored_shape, table.offs, table.shps, where)
        item_out[key] = table

    def _one_row(self, key: str, spec: ArraySpec, c: IndexArrayColumns) -> ChunkTable | None:
        """An array stored as one chunk (most arrays of a one-process save): every check of
        ``check_rows`` and ``check_boxes`` on Python integers, which for one row is several
        times faster than numpy's per-call cost. Only ever accepts: None when anything is
        off (malformed columns too), and the full checks then run and name the fault."""
        gshape = spec.stored_shape
        nd = len(gshape)
        cols = (c.fidx, c.doff, c.nbytes, c.crc)
        if type(c.members[0]) is not str or any(a.shape != (1,) or a.dtype != np.int64 for a in cols) \
                or any(a.shape != (1, nd) or a.dtype != np.int64 for a in (c.offs, c.shps)):
            return None
        fi, do, nb, crc = (int(a[0]) for a in cols)
        off, shp = c.offs[0].tolist(), c.shps[0].tolist()
        if not 0 <= fi < len(self.files) or not 0 <= crc <= 0xFFFFFFFF:
            return None
        if not all(0 <= o <= g and 0 <= n <= g and o + n <= g for o, n, g in zip(off, shp, gshape)):
            return None
        total = math.prod(gshape)
        vol = math.prod(shp) if total else 0
        if nb != vol * real_dtype(spec.stored_dtype).itemsize or (total and vol != total):
            return None            # the byte count, or one chunk that does not cover the array
        fsize = int(self.sizes[fi])
        if do < -1 or do > fsize or (do >= 0 and do + nb > fsize):
            return None
        self._claim(f"{self.where}: chunk of {key!r}", c.fidx, c.doff, c.nbytes)
        return ChunkTable(key, self.files, c.fidx, c.offs, c.shps, c.doff, c.nbytes, c.crc, c.members)

    def add_validated(self, item: str, key: str, c: IndexArrayColumns) -> None:
        """Keep rows this process validated already against the same spec (``ValidatedRows``;
        the caller compared the specs): every per-row check and the tiling held then and
        depend only on the spec and the sizes of their files, which the committer carried
        unchanged. What the new index can still break is checked: the array is listed once,
        its file numbers name files of this index, and its bytes count in the claims per
        file (which new rows in a carried file would exceed)."""
        item_out = self.out[item]
        if key in item_out:
            raise CorruptCheckpointError(f"{self.where}: index lists the chunks of {key!r} twice")
        n = len(c.members)
        if n and (int(c.fidx.min()) < 0 or int(c.fidx.max()) >= len(self.files)):
            raise CorruptCheckpointError(f"{self.where}: chunk of {key!r}: file number out of range")
        self._claim(f"{self.where}: chunk of {key!r}", c.fidx, c.doff, c.nbytes)
        item_out[key] = ChunkTable(key, self.files, c.fidx, c.offs, c.shps, c.doff, c.nbytes, c.crc, c.members)

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
            if inflated[fi] > limits.MAX_DEFLATE_RATIO * int(sizes[fi]) + 65536:
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
