"""Write and read one ``.npz`` shard file.

A shard is a plain zip archive of ``.npy`` members, so ``np.load(path)`` opens it anywhere.
We write the zip ourselves rather than through ``zipfile`` because we need three things the
standard writer cannot give in one pass: every member's array data aligned to
``ALIGN`` bytes (so a reader ``preadv``s a member's bytes straight into an aligned array), the CRC-32 of
each member (the zip format demands it; it is also our per-chunk checksum, computed with
ISA-L at ~10 GB/s), and an xxh3-64 checksum of the whole file computed while it is written,
never by reading it back.

Reading never parses the zip of an uncompressed shard: the checkpoint index records where
each chunk's raw bytes start, and ``read_chunks`` (the one chunk reader) checks those offsets
against the file size before reading.
"""

from __future__ import annotations

import io
import os
import re
import socket
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from isal import isal_zlib

from shardckpt.errors import CorruptCheckpointError

ALIGN = 64                      # member data alignment (the .npy header is 64-aligned too)
WRITE_BLOCK = 16 << 20          # bytes hashed and written per step, hot in cache
_ZIP64_LIMIT = 0xFFFFFFFF
_DOS_DATE = (0 << 9) | (1 << 5) | 1   # 1980-01-01: shards are byte-reproducible
_PAD_ID = 0x6873                # extra-field id carrying alignment padding (ignored by readers)


def crc32(data, value: int = 0) -> int:
    return isal_zlib.crc32(data, value)


@dataclass(frozen=True)
class ChunkRecord:
    """Where one stored box of an array lives: ``key``'s stored array restricted to
    ``offset``..``offset+shape``, raw C-order bytes at ``data_offset`` (None when the
    member is compressed), ``nbytes`` long, CRC-32 ``crc32``."""

    key: str
    member: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    data_offset: int | None
    nbytes: int
    crc32: int


@dataclass
class ShardReport:
    """What a writer hands back to the committer for one finished, fsynced shard."""

    file: str
    size: int
    xxh3_64: str
    chunks: list[ChunkRecord]
    writer: dict = field(default_factory=dict)


@dataclass
class MemberToWrite:
    key: str
    member: str
    offset: tuple[int, ...]
    data: np.ndarray


@dataclass
class ShardPlan:
    """What one shard file will hold: the members a writer puts into ``file``, in order."""

    file: str
    members: list[MemberToWrite] = field(default_factory=list)
    nbytes: int = 0


def writer_identity(**extra) -> dict:
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    ident.update({k: v for k, v in extra.items() if v is not None})
    return ident


_NPY_HEADERS: dict[tuple, bytes] = {}     # (dtype string, shape) -> header of a C-order array
NPY_HEADER_MEMO = 4096


def npy_header(arr: np.ndarray) -> bytes:
    """The ``.npy`` header of ``arr``. The header of a C-order array of a plain dtype is a
    function of its dtype string and shape: those recur (every layer's arrays), so they are
    made once (numpy's writer costs ~8 us an array, a save's per-array cost)."""
    dt = arr.dtype
    if not arr.flags.c_contiguous or dt.names is not None or dt.subdtype is not None or dt.metadata:
        return _npy_header(arr)
    key = (dt.str, arr.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        header = _npy_header(arr)
        if len(_NPY_HEADERS) >= NPY_HEADER_MEMO:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = header
    return header


def _npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header longer than 64 KiB: format 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def local_header(name: bytes, crc: int, csize: int, usize: int, method: int, offset: int) -> bytes:
    zip64 = usize >= _ZIP64_LIMIT or csize >= _ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, usize, csize) if zip64 else b""
    base = offset + 30 + len(name) + len(extra)
    pad = (-base - 4) % ALIGN
    extra += struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
    version = 45 if zip64 else 20
    sizes = (_ZIP64_LIMIT, _ZIP64_LIMIT) if zip64 else (csize, usize)
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0, method, 0, _DOS_DATE, crc,
                       sizes[0], sizes[1], len(name), len(extra)) + name + extra


def central_entry(name: bytes, crc: int, csize: int, usize: int, method: int, offset: int) -> bytes:
    fields64 = []
    usz, csz, off = usize, csize, offset
    if usize >= _ZIP64_LIMIT:
        fields64.append(usize)
        usz = _ZIP64_LIMIT
    if csize >= _ZIP64_LIMIT:
        fields64.append(csize)
        csz = _ZIP64_LIMIT
    if offset >= _ZIP64_LIMIT:
        fields64.append(offset)
        off = _ZIP64_LIMIT
    extra = struct.pack("<HH", 1, 8 * len(fields64)) + struct.pack(f"<{len(fields64)}Q", *fields64) if fields64 else b""
    version = 45 if fields64 else 20
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | version, version, 0, method, 0,
                       _DOS_DATE, crc, csz, usz, len(name), len(extra), 0, 0, 0,
                       0o100644 << 16, off) + name + extra


def end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    out = b""
    if count >= 0xFFFF or cd_offset >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
        z64_offset = cd_offset + cd_size
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, (3 << 8) | 45, 45, 0, 0,
                           count, count, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, z64_offset, 1)
        count16, cd_size32, cd_offset32 = 0xFFFF, _ZIP64_LIMIT, _ZIP64_LIMIT
    else:
        count16, cd_size32, cd_offset32 = count, cd_size, cd_offset
    return out + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, cd_size32, cd_offset32, 0)


def write_shard(staging, file: str, members: Iterable[MemberToWrite], *, compress: bool = False,
                progress=None, writer: dict | None = None) -> ShardReport:
    """Write ``members`` as shard ``file`` into a save's staging area (any Store), durable
    when this returns; on any error nothing of the file remains and the error is raised."""
    members = list(members)
    chunks, written = staging.write_stream(file, lambda sink: write_members(sink, members, compress, progress))
    return ShardReport(written.name, written.size, written.xxh3_64, chunks, writer or writer_identity())


def write_members(sink, members: list[MemberToWrite], compress: bool = False, progress=None) -> list[ChunkRecord]:
    """Write the zip archive of ``members`` into ``sink`` (one pass; see module doc) and
    return where each chunk's bytes lie."""
    central, chunks = [], []
    for m in members:
        arr = m.data
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        header = npy_header(arr)
        name = (m.member + ".npy").encode("utf-8")
        raw = memoryview(arr).cast("B") if arr.nbytes else b""
        data_crc = crc32(raw)        # one pass over the data: the member's zip CRC is combined from it
        crc = isal_zlib.crc32_combine(crc32(header), data_crc, len(raw))
        usize = len(header) + arr.nbytes
        offset = sink.pos
        if compress:
            comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)
            payload = comp.compress(header) + comp.compress(raw) + comp.flush()
            sink.write(local_header(name, crc, len(payload), usize, 8, offset))
            sink.write(payload)
            csize, method, data_offset = len(payload), 8, None
        else:
            sink.write(local_header(name, crc, usize, usize, 0, offset))
            sink.write(header)
            data_offset = sink.pos
            sink.write(raw)
            csize, method = usize, 0
        central.append(central_entry(name, crc, csize, usize, method, offset))
        chunks.append(ChunkRecord(m.key, m.member, tuple(m.offset), tuple(arr.shape),
                                  data_offset, arr.nbytes, data_crc))
        if progress is not None:
            progress(arr.nbytes)
    cd_offset = sink.pos
    cd = b"".join(central)
    sink.write(cd)
    sink.write(end_records(len(central), cd_offset, len(cd)))
    return chunks


# --- reading: the one chunk reader -----------------------------------------------------------

@dataclass
class ReadTarget:
    """Copy ``chunk`` into ``dest``. With ``sub`` None the chunk fills ``dest`` exactly
    (C-contiguous, read in place); else ``dest[...] = chunk_array[sub]``."""

    chunk: ChunkRecord
    dest: np.ndarray
    sub: tuple[slice, ...] | None = None


def read_chunks(source, where: str, targets: list[ReadTarget], *, verify: bool = True,
                progress: Callable[[int], None] | None = None,
                on_error: Callable[[ReadTarget, CorruptCheckpointError], None] | None = None) -> None:
    """Fill every target from ``source`` (one stored shard, a ``store.Source`` already
    checked to have the manifest's size): the one chunk reader, whoever reads (the thread
    and Ray executors, the per-node chunk cache, ``verify``).

    Raw chunks are read with ``Source.readinto`` (``pread`` or a ranged GET), bounds checked
    first. A chunk that fills its target exactly is read straight into it; one only partly
    needed (another device layout) is read once into a scratch buffer for all the targets
    that need it. The CRC-32 is checked on the bytes read, in memory, never on a memory map
    of the file (a file changed or truncated meanwhile cannot hand out unchecked bytes or
    kill the process). Compressed members are inflated through the zip directory, parsed
    once per call, never beyond the size the index declares. A damaged chunk raises
    ``CorruptCheckpointError``; with ``on_error`` it is reported there instead and the
    other chunks are still read (``verify``)."""
    zf = None
    try:
        for group in _by_chunk(targets):
            c = group[0].chunk
            try:
                if c.data_offset is None:
                    if zf is None:
                        zf = open_zip(source, where)
                    whole = [t for t in group if t.sub is None]
                    buf = whole[0].dest if whole else np.empty(c.shape, group[0].dest.dtype)
                    read_compressed_chunk(zf, where, c, buf, verify=verify)
                else:
                    check_chunk_bounds(source, where, c)
                    whole = [t for t in group if t.sub is None]
                    buf = whole[0].dest if whole and whole[0].dest.flags.c_contiguous else \
                        np.empty(c.shape, group[0].dest.dtype)
                    _read_raw(source, where, c, buf, verify)
            except CorruptCheckpointError as e:
                if on_error is None or (c.data_offset is None and zf is None):
                    raise
                on_error(group[0], e)
                continue
            for t in group:
                if t.dest is not buf:
                    t.dest[...] = buf[t.sub] if t.sub is not None else buf
                if progress is not None:
                    progress(t.dest.nbytes)
    finally:
        if zf is not None:
            zf.close()


def _by_chunk(targets: list[ReadTarget]) -> list[list[ReadTarget]]:
    """Targets grouped by the chunk they read (first appearance order)."""
    groups: dict[tuple, list[ReadTarget]] = {}
    for t in targets:
        groups.setdefault((t.chunk.member, t.chunk.offset, t.chunk.data_offset), []).append(t)
    return list(groups.values())


def _read_raw(source, where: str, chunk: ChunkRecord, dest: np.ndarray, verify: bool) -> None:
    view = memoryview(dest).cast("B") if dest.nbytes else memoryview(b"")
    if len(view) != chunk.nbytes:
        raise CorruptCheckpointError(f"{where}: chunk of {chunk.key!r} has {chunk.nbytes} bytes, "
                                     f"expected {len(view)}")
    if chunk.nbytes:
        source.readinto(chunk.data_offset, view)
    if verify and crc32(view) != chunk.crc32:
        raise CorruptCheckpointError(f"{where}: checksum mismatch in chunk of {chunk.key!r} "
                                     f"(member {chunk.member!r})")


def check_chunk_bounds(source, where: str, chunk: ChunkRecord) -> None:
    if chunk.data_offset is None or chunk.data_offset < 0 or chunk.data_offset + chunk.nbytes > source.size:
        raise CorruptCheckpointError(
            f"{where}: chunk of {chunk.key!r} at byte {chunk.data_offset} (+{chunk.nbytes}) "
            f"lies outside the file ({source.size} bytes)")


class SourceFile(io.RawIOBase):
    """A stored file (a ``store.Source``) as a seekable binary file, for ``zipfile``:
    compressed shards are opened once per load, whatever the store."""

    def __init__(self, source):
        self.source, self.pos = source, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.source.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.source.size - self.pos))
        if n:
            self.source.readinto(self.pos, memoryview(b).cast("B")[:n])
        self.pos += n
        return n


#: What ``zipfile`` raises on a damaged archive, its directory or a member ("zip file version
#: 8.4" is a NotImplementedError): every one becomes CorruptCheckpointError.
ZIP_DAMAGE = (zipfile.BadZipFile, KeyError, ValueError, zlib.error, EOFError, NotImplementedError, RuntimeError,
              OSError, struct.error, OverflowError, IndexError, TypeError, MemoryError)


def open_zip(source, where: str) -> zipfile.ZipFile:
    """The zip directory of a stored shard, parsed once (CorruptCheckpointError if damaged)."""
    try:
        return zipfile.ZipFile(io.BufferedReader(SourceFile(source), 1 << 20))
    except CorruptCheckpointError:
        raise
    except ZIP_DAMAGE as e:
        raise CorruptCheckpointError(f"{where}: not a readable zip archive ({type(e).__name__}: {e})") from e


# --- .npy headers, parsed without ast ------------------------------------------------------------

MAX_NPY_HEADER = 65536
NPY_MAGIC = b"\x93NUMPY"
_HEADER_ITEM = re.compile(r"\s*'(descr|fortran_order|shape)'\s*:\s*('(?:[^'\\]|\\.)*'|True|False|\([0-9,\s]*\))\s*,?")
_DESCR = re.compile(r"[<>|=]?(?:[biufcV][0-9]{1,2}|\?)")


def read_npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header length) of the ``.npy`` stream ``f``, read with
    a bounded size and parsed as the fixed dictionary numpy writes (``{'descr': '<f4',
    'fortran_order': False, 'shape': (3, 4), }``): plain dtypes only, no object or
    structured ones. numpy's own reader runs the header through ``ast.literal_eval``, which
    CPython 3.11 cannot run in several threads at once (cpython#106905), and accepts any
    Python literal; this reader accepts exactly the format. Damage raises
    ``CorruptCheckpointError``."""
    head = f.read(8)
    if len(head) != 8 or head[:6] != NPY_MAGIC or head[6] not in (1, 2, 3) or head[7] != 0:
        raise CorruptCheckpointError(f"{where}: not a .npy member (magic {head[:8]!r})")
    width = 2 if head[6] == 1 else 4
    raw_len = f.read(width)
    if len(raw_len) != width:
        raise CorruptCheckpointError(f"{where}: truncated .npy header")
    n = int.from_bytes(raw_len, "little")
    if n > MAX_NPY_HEADER:
        raise CorruptCheckpointError(f"{where}: {n}-byte .npy header (at most {MAX_NPY_HEADER})")
    raw = f.read(n)
    if len(raw) != n:
        raise CorruptCheckpointError(f"{where}: truncated .npy header")
    try:
        text = raw.decode("latin1" if head[6] < 3 else "utf8").strip()
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{where}: malformed .npy header") from e
    fields = _parse_header_dict(text, where)
    descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if descr.lstrip("<>|=").startswith("O"):
        raise CorruptCheckpointError(f"{where}: holds Python objects (.npy dtype {descr!r:.40}: a pickle); "
                                     "refusing it")
    if not _DESCR.fullmatch(descr):
        raise CorruptCheckpointError(f"{where}: .npy dtype {descr!r:.40} is not a plain numeric dtype")
    try:
        dtype = np.dtype(descr)
    except TypeError as e:
        raise CorruptCheckpointError(f"{where}: .npy dtype {descr!r:.40} is unknown") from e
    if dtype.hasobject or dtype.itemsize == 0:
        raise CorruptCheckpointError(f"{where}: .npy dtype {descr!r:.40} is not a plain numeric dtype")
    return shape, fortran, dtype, 8 + width + n


def _parse_header_dict(text: str, where: str) -> dict:
    if not (text.startswith("{") and text.endswith("}")):
        raise CorruptCheckpointError(f"{where}: malformed .npy header {text[:80]!r}")
    body, pos, out = text[1:-1], 0, {}
    while pos < len(body) and body[pos:].strip():
        m = _HEADER_ITEM.match(body, pos)
        if m is None or m.group(1) in out:
            raise CorruptCheckpointError(f"{where}: malformed .npy header {text[:80]!r}")
        key, value = m.group(1), m.group(2)
        if key == "descr":
            if not value.startswith("'"):
                raise CorruptCheckpointError(f"{where}: malformed .npy header {text[:80]!r}")
            out[key] = value[1:-1]
        elif key == "fortran_order":
            if value not in ("True", "False"):
                raise CorruptCheckpointError(f"{where}: malformed .npy header {text[:80]!r}")
            out[key] = value == "True"
        else:
            if not value.startswith("("):
                raise CorruptCheckpointError(f"{where}: malformed .npy header {text[:80]!r}")
            dims = [d.strip() for d in value[1:-1].split(",")]
            if dims and dims[-1] == "":
                dims = dims[:-1]
            if any(not d.isdigit() for d in dims) or len(dims) > 64:
                raise CorruptCheckpointError(f"{where}: malformed .npy shape {value[:80]!r}")
            out[key] = tuple(int(d) for d in dims)
        pos = m.end()
    if set(out) != {"descr", "fortran_order", "shape"}:
        raise CorruptCheckpointError(f"{where}: .npy header lacks {sorted({'descr', 'fortran_order', 'shape'} - set(out))}")
    return out


def read_compressed_chunk(zf: zipfile.ZipFile, where: str, chunk: ChunkRecord, dest: np.ndarray,
                          *, verify: bool = True) -> None:
    """Inflate a compressed member of the open archive ``zf`` into ``dest``, refusing to
    inflate more than the bytes the index declares (a zip bomb stops at the declared size)."""
    try:
        info = zf.getinfo(chunk.member + ".npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x41:
            raise CorruptCheckpointError(
                f"{where}: member {chunk.member!r} uses compression method {info.compress_type} "
                f"(flags {info.flag_bits:#x}); shards are stored or deflated, never encrypted")
        if info.file_size > chunk.nbytes + MAX_NPY_HEADER + 128:
            raise CorruptCheckpointError(
                f"{where}: member {chunk.member!r} declares {info.file_size} bytes, "
                f"more than the {chunk.nbytes} its index entry holds")
        with zf.open(info) as f:
            shape, _fortran, dtype, _ = read_npy_header(f, f"{where}: member {chunk.member!r}")
            view = memoryview(dest).cast("B") if dest.nbytes else memoryview(bytearray())
            if tuple(shape) != tuple(dest.shape) or dtype != dest.dtype:
                raise CorruptCheckpointError(
                    f"{where}: member {chunk.member!r} holds {shape} {dtype}, the index says "
                    f"{dest.shape} {dest.dtype}")
            pos = 0
            while pos < len(view):
                n = f.readinto(view[pos:])
                if not n:
                    raise CorruptCheckpointError(f"{where}: member {chunk.member!r} is truncated")
                pos += n
    except CorruptCheckpointError:
        raise
    except ZIP_DAMAGE as e:
        raise CorruptCheckpointError(f"{where}: cannot read member {chunk.member!r}: "
                                     f"{type(e).__name__}: {e}") from e
    if verify and crc32(view) != chunk.crc32:
        raise CorruptCheckpointError(f"{where}: checksum mismatch in member {chunk.member!r}")
