"""Write and read one ``.npz`` shard file.

A shard is a plain zip archive of ``.npy`` members, so ``np.load(path)`` opens it anywhere.
We write the zip ourselves rather than through ``zipfile`` because we need three things the
standard writer cannot give in one pass: every member's array data aligned to
``ALIGN`` bytes (so a reader can memory-map or ``preadv`` a member in place), the CRC-32 of
each member (the zip format demands it; it is also our per-chunk checksum, computed with
ISA-L at ~10 GB/s), and an xxh3-64 checksum of the whole file computed while it is written,
never by reading it back.

Reading never parses the zip: the checkpoint index records where each chunk's raw bytes
start, and the loader checks those offsets against the file size before reading.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import xxhash
from isal import isal_zlib

from .errors import CheckpointError, CorruptCheckpointError

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


def writer_identity(**extra) -> dict:
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    ident.update({k: v for k, v in extra.items() if v is not None})
    return ident


def npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header longer than 64 KiB: format 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _local_header(name: bytes, crc: int, csize: int, usize: int, method: int, offset: int) -> bytes:
    zip64 = usize >= _ZIP64_LIMIT or csize >= _ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, usize, csize) if zip64 else b""
    base = offset + 30 + len(name) + len(extra)
    pad = (-base - 4) % ALIGN
    extra += struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
    version = 45 if zip64 else 20
    sizes = (_ZIP64_LIMIT, _ZIP64_LIMIT) if zip64 else (csize, usize)
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0, method, 0, _DOS_DATE, crc,
                       sizes[0], sizes[1], len(name), len(extra)) + name + extra


def _central_entry(name: bytes, crc: int, csize: int, usize: int, method: int, offset: int) -> bytes:
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


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
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
            sink.write(_local_header(name, crc, len(payload), usize, 8, offset))
            sink.write(payload)
            csize, method, data_offset = len(payload), 8, None
        else:
            sink.write(_local_header(name, crc, usize, usize, 0, offset))
            sink.write(header)
            data_offset = sink.pos
            sink.write(raw)
            csize, method = usize, 0
        central.append(_central_entry(name, crc, csize, usize, method, offset))
        chunks.append(ChunkRecord(m.key, m.member, tuple(m.offset), tuple(arr.shape),
                                  data_offset, arr.nbytes, data_crc))
        if progress is not None:
            progress(arr.nbytes)
    cd_offset = sink.pos
    cd = b"".join(central)
    sink.write(cd)
    sink.write(_end_records(len(central), cd_offset, len(cd)))
    return chunks


def read_chunk_into(source, chunk: ChunkRecord, dest: np.ndarray, *, verify: bool = True) -> None:
    """Read one uncompressed chunk's bytes from ``source`` (a ``store.Source``) straight
    into ``dest`` (C-contiguous, exactly ``chunk.nbytes``), checking bounds first and the
    CRC after."""
    view = memoryview(dest).cast("B") if dest.nbytes else memoryview(b"")
    check_chunk_bounds(source, chunk)
    if len(view) != chunk.nbytes:
        raise CorruptCheckpointError(f"{source.name}: chunk of {chunk.key!r} has {chunk.nbytes} bytes, "
                                     f"expected {len(view)}")
    if chunk.nbytes:
        source.readinto(chunk.data_offset, view)
    if verify and crc32(view) != chunk.crc32:
        raise CorruptCheckpointError(f"{source.name}: checksum mismatch in chunk of {chunk.key!r} "
                                     f"(member {chunk.member!r})")


def read_chunk_part(source, chunk: ChunkRecord, dtype: np.dtype, sub: tuple, dest: np.ndarray,
                    *, verify: bool = True) -> None:
    """``dest[...] = chunk[sub]``: a chunk only partly needed (another device layout). The
    local store maps the file, so only the pages touched are read, plus the whole chunk
    once when its checksum is verified."""
    check_chunk_bounds(source, chunk)
    buf = source.buffer(chunk.data_offset, chunk.nbytes)
    if verify and crc32(buf) != chunk.crc32:
        raise CorruptCheckpointError(f"{source.name}: checksum mismatch in chunk of {chunk.key!r}")
    src = np.frombuffer(buf, dtype, count=chunk.nbytes // dtype.itemsize if dtype.itemsize else 0).reshape(chunk.shape)
    dest[...] = src[sub]
    del src, buf


def check_chunk_bounds(source, chunk: ChunkRecord) -> None:
    if chunk.data_offset is None or chunk.data_offset < 0 or chunk.data_offset + chunk.nbytes > source.size:
        raise CorruptCheckpointError(
            f"{source.name}: chunk of {chunk.key!r} at byte {chunk.data_offset} (+{chunk.nbytes}) "
            f"lies outside the file ({source.size} bytes)")


class SourceFile(io.RawIOBase):
    """A stored file (a ``store.Source``) as a seekable binary file, for ``zipfile``:
    compressed shards are opened once per load, whatever the store."""

    def __init__(self, source):
        self.source, self._pos = source, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.source.size - self._pos))
        if n:
            self.source.readinto(self._pos, memoryview(b).cast("B")[:n])
        self._pos += n
        return n


def open_zip(source, file_name: str):
    """The zip directory of a stored shard, parsed once (CorruptCheckpointError if damaged)."""
    import zipfile
    try:
        return zipfile.ZipFile(io.BufferedReader(SourceFile(source), 1 << 20))
    except (zipfile.BadZipFile, ValueError, OSError, struct.error, EOFError, OverflowError) as e:
        raise CorruptCheckpointError(f"{file_name}: not a readable zip archive ({type(e).__name__}: {e})") from e


def read_compressed_chunk(zf, file_name: str, chunk: ChunkRecord, dest: np.ndarray,
                          *, verify: bool = True) -> None:
    """Inflate a compressed member of the open archive ``zf`` into ``dest``, refusing to
    inflate more than the bytes the index declares (a zip bomb stops at the declared size)."""
    import tokenize
    import zipfile

    try:
        info = zf.getinfo(chunk.member + ".npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x41:
            raise CorruptCheckpointError(
                f"{file_name}: member {chunk.member!r} uses compression method {info.compress_type} "
                f"(flags {info.flag_bits:#x}); shards are stored or deflated, never encrypted")
        if info.file_size > chunk.nbytes + 65536 + 128:
            raise CorruptCheckpointError(
                f"{file_name}: member {chunk.member!r} declares {info.file_size} bytes, "
                f"more than the {chunk.nbytes} its index entry holds")
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _fortran, _dtype = read_header(f, max_header_size=65536)
            view = memoryview(dest).cast("B") if dest.nbytes else memoryview(bytearray())
            if tuple(shape) != tuple(dest.shape) or _dtype != dest.dtype:
                raise CorruptCheckpointError(
                    f"{file_name}: member {chunk.member!r} holds {shape} {_dtype}, the index says "
                    f"{dest.shape} {dest.dtype}")
            pos = 0
            while pos < len(view):
                n = f.readinto(view[pos:])
                if not n:
                    raise CorruptCheckpointError(f"{file_name}: member {chunk.member!r} is truncated")
                pos += n
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, zlib.error, EOFError, NotImplementedError,
            RuntimeError, OSError, struct.error, OverflowError, IndexError, TypeError,
            tokenize.TokenError, SyntaxError, MemoryError) as e:
        # a damaged archive or .npy header makes zipfile / numpy raise any of these
        raise CorruptCheckpointError(f"{file_name}: cannot read member {chunk.member!r}: "
                                     f"{type(e).__name__}: {e}") from e
    if verify and crc32(view) != chunk.crc32:
        raise CorruptCheckpointError(f"{file_name}: checksum mismatch in member {chunk.member!r}")


def file_xxh3(path: str, progress=None) -> str:
    """xxh3-64 of a whole file, streamed (used by ``verify``, never by a plain load)."""
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(WRITE_BLOCK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


__all__ = ["ALIGN", "ChunkRecord", "ShardReport", "MemberToWrite", "write_shard", "write_members", "open_zip", "SourceFile",
           "read_compressed_chunk", "file_xxh3", "crc32", "writer_identity", "CheckpointError"]
