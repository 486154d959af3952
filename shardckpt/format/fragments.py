"""Chunk index fragments: an index too large for every reader to read whole.

At 10^6 chunks (a 70B model over ~1,000 devices) the index is ~76 MB, and every participant
of a restore would read and validate all of it to find the few thousand rows it needs. A
checkpoint with more than ``FRAGMENT_ROWS`` chunks therefore stores its index as fragments
(``index-00000.msgpack``, ...), each holding the rows of the shard files of consecutive
writers, plus a directory in ``index.msgpack`` (index version 3) saying, per array, which
fragments hold its rows, how many, and the bounding box of those rows. A participant restoring
some boxes reads the directory and only the fragments whose boxes meet them: in an FSDP-style
layout, the fragments of the writers that held the same rows. The directory and every fragment
are metadata files of the manifest (size and xxh3-64), so each is checksummed from it.

Validation: every row of a fragment read gets the checks of a whole index (files, bounds,
bytes, offsets inside the files, CRC range, bytes claimed per file, totalled over the fragments
read) and must lie in the box the directory declares for its fragment, in the number declared.
Tiling: an array whose fragments were all read is checked whole (``check_boxes``); otherwise the
rows meeting each requested box, clipped to it, must tile that box exactly. No byte handed out
is one no chunk wrote, even if a damaged directory hid a fragment; ``verify`` and every caller
of ``Checkpoint.index()`` read all fragments and check every array whole.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format import limits
from shardckpt.format.index import ChunkTable, IndexArrayColumns, IndexColumns, IndexValidator, encode_columns, index_unpacker
from shardckpt.format.manifest import Manifest
from shardckpt.format.names import check_file_name, is_fragment_name
from shardckpt.format.tiling import check_boxes

FRAGMENT_ROWS = 1 << 16        # an index with more chunks is written as fragments (~5 MB each)
DIRECTORY_VERSION = 3
MAX_FRAGMENTS = 1 << 16
Box = tuple[tuple[int, ...], tuple[int, ...]]



# --- writing ----------------------------------------------------------------------------------

@dataclass
class FragmentPlan:
    """Which fragment each shard file's rows go to, and each array's rows sorted by fragment."""

    count: int
    frag_of_file: np.ndarray                                   # int64[len(files)]
    split: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (item, key) -> (row order, bounds[count+1])


def plan_fragments(cols: IndexColumns, writer_order: list[str] | None = None,
                   max_rows: int | None = None) -> FragmentPlan | None:
    """Fragments of at most ~``max_rows`` rows (a file's rows are never split), taking the
    files in ``writer_order`` (the committer lists them participant by participant, so that
    a fragment holds what neighbouring writers held; default: index order); None when one
    index file holds it all (then the index is written as before, version 2)."""
    max_rows = FRAGMENT_ROWS if max_rows is None else max_rows
    nf = len(cols.files)
    per_file = np.zeros(nf, np.int64)
    total = 0
    for by_key in cols.items.values():
        for c in by_key.values():
            if len(c.members):
                per_file += np.bincount(c.fidx, minlength=nf)
                total += len(c.members)
    if total <= max_rows or nf <= 1:
        return None
    number = {f: i for i, f in enumerate(cols.files)}
    order = [number[f] for f in dict.fromkeys(writer_order or ()) if f in number]
    seen = set(order)
    order += [i for i in range(nf) if i not in seen]
    order = np.array(order, dtype=np.int64)
    before = np.concatenate([[0], np.cumsum(per_file[order])[:-1]])
    raw = np.empty(nf, np.int64)
    raw[order] = before // max(1, max_rows)
    uniq, frag_of_file = np.unique(raw, return_inverse=True)      # consecutive numbers
    count = len(uniq)
    split = {}
    for item, by_key in cols.items.items():
        for key, c in by_key.items():
            f = frag_of_file[c.fidx] if len(c.members) else np.zeros(0, np.int64)
            order = np.argsort(f, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(f, minlength=count))])
            split[(item, key)] = (order, bounds)
    return FragmentPlan(count, frag_of_file.astype(np.int64), split)


def _take(c: IndexArrayColumns, rows: np.ndarray) -> IndexArrayColumns:
    members = [c.members[int(rows[0])]] if len(rows) == 1 else \
        list(operator.itemgetter(*rows.tolist())(c.members)) if len(rows) else []
    return IndexArrayColumns(c.fidx[rows], c.offs[rows], c.shps[rows], c.doff[rows], c.nbytes[rows], c.crc[rows], members)


def dump_fragment(cols: IndexColumns, plan: FragmentPlan, k: int) -> bytes:
    """Fragment ``k``: the rows of its files, per array, as version-2 columns; file numbers
    refer to the directory's list of files."""
    items: dict[str, dict[str, Any]] = {}
    for item, by_key in cols.items.items():
        for key, c in by_key.items():
            order, bounds = plan.split[(item, key)]
            rows = order[bounds[k]:bounds[k + 1]]
            if len(rows):
                items.setdefault(item, {})[key] = encode_columns(key, _take(c, rows))
    return msgpack.packb({"version": DIRECTORY_VERSION, "fragment": k, "items": items}, use_bin_type=True)


def dump_directory(cols: IndexColumns, plan: FragmentPlan, names: list[str]) -> bytes:
    """The directory: the files, the fragments' names (as stored), and per array the
    fragments holding its rows with their row counts and bounding boxes."""
    items: dict[str, dict[str, Any]] = {}
    for item, by_key in cols.items.items():
        out = items[item] = {}
        for key, c in by_key.items():
            order, bounds = plan.split[(item, key)]
            counts = np.diff(bounds)
            frags = np.flatnonzero(counts)
            nd = c.offs.shape[1]
            if len(frags):
                starts = bounds[frags]
                offs, ends = c.offs[order], (c.offs + c.shps)[order]
                lo = np.minimum.reduceat(offs, starts, axis=0) if nd else np.zeros((len(frags), 0), np.int64)
                hi = np.maximum.reduceat(ends, starts, axis=0) if nd else np.zeros((len(frags), 0), np.int64)
                box = np.stack([lo, hi], axis=1)
            else:
                box = np.zeros((0, 2, nd), np.int64)
            out[key] = {"frag": frags.astype("<i4").tobytes(), "rows": counts[frags].astype("<i8").tobytes(),
                        "box": box.astype("<i8").tobytes()}
    return msgpack.packb({"version": DIRECTORY_VERSION, "files": cols.files, "fragments": names, "items": items},
                         use_bin_type=True)


# --- reading ----------------------------------------------------------------------------------

def is_directory(raw: bytes) -> bool:
    """Whether an index file is a fragment directory (version 3), from its version field
    (written first); anything else is left to ``load_index``, which validates it."""
    try:
        up = msgpack.Unpacker(raw=False, max_buffer_size=len(raw) + 1)
        up.feed(raw[:4096])
        n = up.read_map_header()
        return n > 0 and up.unpack() == "version" and up.unpack() == DIRECTORY_VERSION
    except Exception:  # noqa: BLE001 - not ours to judge here
        return False


@dataclass
class ArrayFragments:
    """Where one array's rows are: fragment numbers (ascending), row counts, boxes."""

    frag: np.ndarray      # int64[m]
    rows: np.ndarray      # int64[m]
    lo: np.ndarray        # int64[m, nd]
    hi: np.ndarray        # int64[m, nd]

    def meeting(self, boxes: list[Box]) -> set[int]:
        """Positions (into ``frag``) of the fragments whose rows can meet one of ``boxes``:
        overlap of positive volume; an empty box (nothing to fill) takes them all."""
        if not boxes:
            return set()
        nd = self.lo.shape[1]
        lo = np.array([b[0] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
        size = np.array([b[1] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
        if (size <= 0).any():
            return set(range(len(self.frag)))
        hi = lo + size
        hit = (np.maximum(self.lo[:, None], lo[None]) < np.minimum(self.hi[:, None], hi[None])).all(axis=2).any(axis=1)
        return set(np.flatnonzero(hit).tolist())


@dataclass
class IndexDirectory:
    files: list[str]
    fragments: list[str]
    arrays: dict[str, dict[str, ArrayFragments]]


def load_directory(raw: bytes, manifest: Manifest, where: str) -> IndexDirectory:
    """Parse and validate a fragment directory against the manifest. Damage raises
    ``CorruptCheckpointError``."""
    try:
        up = index_unpacker(raw)
        doc = up.unpack()
        try:
            up.unpack()
        except msgpack.OutOfData:
            pass
        else:
            raise CorruptCheckpointError(f"{where}: chunk index directory has trailing data")
        if not isinstance(doc, dict) or set(doc) != {"version", "files", "fragments", "items"}:
            raise CorruptCheckpointError(f"{where}: malformed chunk index directory")
        files, names, items = doc["files"], doc["fragments"], doc["items"]
        if not isinstance(names, list) or not names or len(names) > MAX_FRAGMENTS or len(set(names)) != len(names):
            raise CorruptCheckpointError(f"{where}: chunk index directory has a malformed list of fragments")
        for n in names:
            check_file_name(n, where)
            if not is_fragment_name(n) or n not in manifest.meta_files:
                raise CorruptCheckpointError(f"{where}: index fragment {n!r:.80} is not listed in the manifest")
        validator = IndexValidator(manifest, where)
        validator.set_files(files)           # every name a shard file of the manifest
        if not isinstance(items, dict):
            raise CorruptCheckpointError(f"{where}: chunk index directory items are not a map")
        arrays: dict[str, dict[str, ArrayFragments]] = {}
        total = 0
        for item, rec in manifest.items.items():
            got = items.get(item, {})
            if not isinstance(got, dict) or set(got) != set(rec.arrays):
                raise CorruptCheckpointError(f"{where}: chunk index directory does not list exactly the arrays "
                                             f"of item {item!r}")
            out = arrays[item] = {}
            for key, spec in rec.arrays.items():
                out[key] = _array_fragments(got[key], spec.stored_shape, len(names), f"{where}: chunks of {key!r}")
                total += int(out[key].rows.sum())
                if total > limits.MAX_INDEX_CHUNKS:
                    raise CorruptCheckpointError(f"{where}: chunk index has more than {limits.MAX_INDEX_CHUNKS} chunks")
        if set(items) - set(manifest.items):
            raise CorruptCheckpointError(f"{where}: chunk index directory lists items the manifest does not have")
        return IndexDirectory(validator.files, names, arrays)
    except CorruptCheckpointError:
        raise
    except Exception as e:  # msgpack errors, wrong types
        raise CorruptCheckpointError(f"{where}: malformed chunk index directory ({type(e).__name__}: {e!s:.200})") from e


def _array_fragments(d: Any, shape: tuple[int, ...], nfrag: int, what: str) -> ArrayFragments:
    if not isinstance(d, dict) or set(d) != {"frag", "rows", "box"}:
        raise CorruptCheckpointError(f"{what}: malformed directory entry")
    nd = len(shape)
    blobs = [d["frag"], d["rows"], d["box"]]
    if any(type(b) is not bytes for b in blobs) or len(blobs[0]) % 4:
        raise CorruptCheckpointError(f"{what}: malformed directory entry")
    m = len(blobs[0]) // 4
    if len(blobs[1]) != 8 * m or len(blobs[2]) != 16 * m * nd:
        raise CorruptCheckpointError(f"{what}: directory columns of different lengths")
    frag = np.frombuffer(blobs[0], "<i4").astype(np.int64)
    rows = np.frombuffer(blobs[1], "<i8").astype(np.int64)
    box = np.frombuffer(blobs[2], "<i8").astype(np.int64).reshape(m, 2, nd)
    lo, hi = box[:, 0, :], box[:, 1, :]
    g = np.array(shape, dtype=np.int64).reshape(nd)
    if m and ((frag < 0).any() or (frag >= nfrag).any() or (np.diff(frag) <= 0).any()):
        raise CorruptCheckpointError(f"{what}: directory names fragments out of range or out of order")
    if m and ((rows <= 0).any() or (rows > limits.MAX_INDEX_CHUNKS).any()):
        raise CorruptCheckpointError(f"{what}: directory row counts out of range")
    if m and ((lo < 0) | (lo > hi) | (hi > g)).any():
        raise CorruptCheckpointError(f"{what}: a fragment's box lies outside the array {shape}")
    if not m:
        raise CorruptCheckpointError(f"{what}: no fragment holds chunks of this array")
    return ArrayFragments(frag, rows, lo, hi)


class FragmentedIndex:
    """The chunk index of one checkpoint read through its directory: fragments are read
    (and validated) when first needed, once. ``read`` fetches a metadata file's bytes,
    checked against the manifest."""

    def __init__(self, directory: IndexDirectory, manifest: Manifest, where: str,
                 read: Callable[[str], bytes]):
        self.directory, self.manifest, self.where, self._read = directory, manifest, where, read
        self.validator = IndexValidator(manifest, where)
        self.validator.set_files(directory.files)
        self.loaded: dict[int, dict[str, dict[str, ChunkTable]]] = {}
        self.bytes_read = 0
        self._lock = threading.Lock()      # one Checkpoint may restore items from several threads

    def tables(self, item: str, requests: dict[str, list[Box]]) -> dict[str, ChunkTable]:
        """The chunks of ``item``'s arrays ``requests`` names that can meet its boxes, read
        from the fragments holding them; each box proved exactly covered."""
        out = {}
        for key, boxes in requests.items():
            where = self.directory.arrays[item][key]
            pos = sorted(where.meeting(boxes))
            table = self._table(item, key, [int(where.frag[p]) for p in pos])
            shape = self.manifest.items[item].arrays[key].stored_shape
            if len(pos) == len(where.frag):
                check_boxes(key, shape, table.offs, table.shps, self.where)
            else:
                for box in boxes:
                    _check_box_covered(key, table, box, self.where)
            out[key] = table
        return out

    def full(self) -> dict[str, dict[str, ChunkTable]]:
        """Every array's whole table, every fragment read, every array's tiling checked."""
        out: dict[str, dict[str, ChunkTable]] = {}
        for item, by_key in self.directory.arrays.items():
            out[item] = {}
            for key, where in by_key.items():
                table = self._table(item, key, where.frag.tolist())
                check_boxes(key, self.manifest.items[item].arrays[key].stored_shape, table.offs, table.shps, self.where)
                out[item][key] = table
        return out

    def _table(self, item: str, key: str, frags: list[int]) -> ChunkTable:
        parts = [self._fragment(k)[item][key] for k in frags]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            nd = len(self.manifest.items[item].arrays[key].stored_shape)
            empty, boxes = np.zeros(0, np.int64), np.zeros((0, nd), np.int64)
            return ChunkTable(key, self.directory.files, empty, boxes, boxes, empty, empty, empty, [])
        members: list = []
        for p in parts:
            members.extend(p.members)
        cat = [np.concatenate([getattr(p, a) for p in parts]) for a in ("fidx", "offs", "shps", "doff", "nbytes", "crc")]
        return ChunkTable(key, self.directory.files, *cat, members)

    def _fragment(self, k: int) -> dict[str, dict[str, ChunkTable]]:
        with self._lock:      # read and validated once: claims are totalled per fragment read
            got = self.loaded.get(k)
            if got is None:
                got = self._load(k)
        return got

    def _load(self, k: int) -> dict[str, dict[str, ChunkTable]]:
        name = self.directory.fragments[k]
        raw = self._read(name)
        self.bytes_read += len(raw)
        what = f"{self.where}: index fragment {name}"
        try:
            got = self._parse(raw, k, what)
        except CorruptCheckpointError:
            raise
        except Exception as e:  # msgpack errors, wrong types
            raise CorruptCheckpointError(f"{what}: malformed ({type(e).__name__}: {e!s:.200})") from e
        self.validator.check_claims()        # running totals over the fragments read
        self.loaded[k] = got
        return got

    def _parse(self, raw: bytes, k: int, what: str) -> dict[str, dict[str, ChunkTable]]:
        up = index_unpacker(raw)
        fields = {}
        for _ in range(up.read_map_header()):
            name = up.unpack()
            if name in fields or name not in ("version", "fragment", "items"):
                raise CorruptCheckpointError(f"{what}: malformed or repeated field {name!r:.40}")
            if name != "items":
                fields[name] = up.unpack()
                continue
            if fields != {"version": DIRECTORY_VERSION, "fragment": k}:
                raise CorruptCheckpointError(f"{what}: is not fragment {k} of a version-{DIRECTORY_VERSION} index")
            fields[name] = self._read_items(up, k, what)
        if "items" not in fields:
            raise CorruptCheckpointError(f"{what}: lacks items")
        try:
            up.unpack()
        except msgpack.OutOfData:
            pass
        else:
            raise CorruptCheckpointError(f"{what}: trailing data")
        got = fields["items"]
        for item, by_key in self.directory.arrays.items():   # every array the directory puts here
            for key, where in by_key.items():
                if k in where.frag.tolist() and key not in got.get(item, {}):
                    raise CorruptCheckpointError(f"{what}: lacks the chunks of {key!r} the directory puts there")
        return got

    def _read_items(self, up: msgpack.Unpacker, k: int, what: str) -> dict[str, dict[str, ChunkTable]]:
        out: dict[str, dict[str, ChunkTable]] = {}
        for _ in range(up.read_map_header()):
            item = up.unpack()
            if not isinstance(item, str) or item not in self.directory.arrays or item in out:
                raise CorruptCheckpointError(f"{what}: unknown or repeated item {item!r:.100}")
            specs = self.manifest.items[item].arrays
            by_key = out[item] = {}
            for _ in range(up.read_map_header()):
                key = up.unpack()
                if not isinstance(key, str) or key not in specs or key in by_key:
                    raise CorruptCheckpointError(f"{what}: unknown or repeated array {key!r:.200}")
                cols = self.validator.read_columns(up, key, specs[key])
                table = self.validator.check_rows(key, specs[key], cols)
                where = self.directory.arrays[item][key]
                pos = np.flatnonzero(where.frag == k)
                if not pos.size or int(where.rows[pos[0]]) != len(table):
                    raise CorruptCheckpointError(f"{what}: holds {len(table)} chunks of {key!r}, the directory "
                                                 "says otherwise")
                p = int(pos[0])
                if len(table) and ((table.offs < where.lo[p]).any() or (table.offs + table.shps > where.hi[p]).any()):
                    raise CorruptCheckpointError(f"{what}: a chunk of {key!r} lies outside the box the directory "
                                                 "declares for this fragment")
                by_key[key] = table
        return out


def _check_box_covered(key: str, table: ChunkTable, box: Box, where: str) -> None:
    """The rows meeting ``box``, clipped to it, tile it exactly (``check_boxes`` on the box)."""
    off, shape = box
    if not all(int(s) > 0 for s in shape):
        return
    rows = table.overlapping_rows(off, shape)
    if len(rows) == 1:        # one chunk holds the whole box (the usual restore): covered iff it contains it
        r = rows[0]
        if all(o <= a and o + n >= a + m for o, n, a, m in zip(table.offs[r].tolist(), table.shps[r].tolist(),
                                                               off, shape)):
            return
    rows = np.array(rows, dtype=np.intp)
    lo = np.asarray(off, dtype=np.int64)
    hi = lo + np.asarray(shape, dtype=np.int64)
    a = np.maximum(table.offs[rows], lo) - lo
    b = np.minimum(table.offs[rows] + table.shps[rows], hi) - lo
    check_boxes(key, tuple(int(s) for s in shape), a, np.maximum(b - a, 0), f"{where} (restoring box {tuple(off)}+{tuple(shape)})")
