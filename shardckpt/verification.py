"""``shardckpt.verify(path)``: check a checkpoint against its manifest without loading it.

A load already refuses what it reads wrong; ``verify`` reads *everything* and reports every
problem at once instead of stopping at the first: the manifest and chunk index parse and
validate, every shard and metadata file is a regular file of the recorded size whose
xxh3-64 matches the manifest, every chunk's CRC-32 matches the index, and nothing else lies
in the directory. A damaged or hostile checkpoint never raises here: its problems go into
the report, each naming the file (and key) at fault.

(The module is not called ``verify.py`` so that ``shardckpt.verify`` can be the function
without hiding a submodule of the same name.)
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from .errors import CheckpointError
from .format import MANIFEST
from .progress import byte_progress
from .shard_io import ChunkRecord, crc32, file_xxh3, read_compressed_chunk

READ_BLOCK = 8 << 20      # bytes read, hashed and CRC'd per step (hot in cache)


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` is True exactly when ``problems`` is empty."""

    path: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    arrays: int = 0
    checksums: bool = True
    layout: str = "shardckpt"          # "shardckpt", "legacy" or "" (not a checkpoint)
    notes: list[str] = field(default_factory=list)   # facts that are not problems

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.ok = False

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'FAILED'} ({self.files_checked} files, "
                f"{self.bytes_checked} bytes, {self.arrays} arrays"
                f"{'' if self.checksums else ', checksums skipped'})")
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def verify(path: os.PathLike | str, *, checksums: bool = True,
           progress: bool | None = None) -> VerifyReport:
    """Check the checkpoint at ``path`` completely and return a :class:`VerifyReport`.

    ``checksums=False`` checks structure, presence and sizes only (no file is read beyond
    the manifest and index). ``progress``: a progress bar on stderr (None: only on a
    terminal and for large checkpoints). Never raises for a damaged checkpoint.
    """
    report = VerifyReport(str(path), checksums=checksums)
    try:
        _verify(Path(path), report, checksums, progress)
    except Exception as e:  # noqa: BLE001 - a verifier reports, it does not crash
        report.problem(f"{path}: verification stopped by an unexpected error: {type(e).__name__}: {e}")
    return report


def _verify(path: Path, report: VerifyReport, checksums: bool, progress: bool | None) -> None:
    from .checkpoint import Checkpoint

    if not path.exists():
        report.layout = ""
        report.problem(f"{path}: no such file or directory")
        return
    if not path.is_dir():
        report.layout = ""
        report.problem(f"{path}: not a directory, so not a checkpoint")
        return
    if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
        from .legacy import is_legacy_dir
        if is_legacy_dir(path):
            _verify_legacy(path, report, checksums)
            return
    try:
        ck = Checkpoint(path)
    except CheckpointError as e:
        report.layout = ""
        report.problem(str(e))
        return
    m = ck.manifest
    report.files_checked += 1
    report.arrays = sum(len(rec.arrays) for rec in m.items.values())
    index = None
    try:
        index = ck.index()
    except CheckpointError as e:
        report.problem(str(e))

    listed = set(m.files) | set(m.meta_files) | {MANIFEST}
    _stray_entries(path, listed, report)

    # Presence, type and size of every listed file; only sound files are read further.
    sound: dict[str, int] = {}
    for name, rec in [*m.files.items(), *m.meta_files.items()]:
        why = _file_problem(path / name, rec.size)
        if why:
            report.problem(f"{path}: {name} {why}")
        else:
            sound[name] = rec.size
    if not checksums:
        report.files_checked += len(sound)
        return

    chunks_of: dict[str, list[tuple[ChunkRecord, np.dtype]]] = {}
    for item, by_key in (index or {}).items():
        for key, rows in by_key.items():
            dtype = np.dtype(m.items[item].arrays[key].stored_dtype)
            for fname, chunk in rows:
                chunks_of.setdefault(fname, []).append((chunk, dtype))
    records = {**m.files, **m.meta_files}
    packed_bytes = sum(c.nbytes for f, cs in chunks_of.items() if f in sound
                       for c, _ in cs if c.data_offset is None)
    total = sum(sound.values()) + packed_bytes

    def check(name: str, advance) -> list[str]:
        try:
            return _check_file(path, name, records[name], chunks_of.get(name, []), advance)
        except OSError as e:
            return [f"{path}: {name} cannot be read: {e}"]

    from .executors.local import default_thread_count
    with byte_progress(f"verifying {path.name}", total, progress) as advance:
        names = sorted(sound)
        with ThreadPoolExecutor(min(default_thread_count(), max(1, len(names))),
                                thread_name_prefix="shardckpt-verify") as pool:
            for name, problems in zip(names, pool.map(lambda n: check(n, advance), names)):
                for p in problems:
                    report.problem(p)
    report.files_checked += len(sound)
    report.bytes_checked += sum(sound.values())


def _file_problem(p: Path, size: int) -> str | None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be examined: {e}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink; checkpoint files must be regular files"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != size:
        return f"is {st.st_size} bytes, the manifest says {size} (truncated or replaced)"
    return None


def _stray_entries(path: Path, listed: set[str], report: VerifyReport) -> None:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        report.problem(f"{path}: cannot list the directory: {e}")
        return
    for entry in entries:
        if entry.name in listed:
            continue
        kind = ("directory" if entry.is_dir(follow_symlinks=False) else
                "symlink" if entry.is_symlink() else "file")
        report.problem(f"{path}: stray {kind} {entry.name} is not listed in the manifest")


def _check_file(path: Path, name: str, rec, chunks: list[tuple[ChunkRecord, np.dtype]],
                advance: Callable[[int], None] | None) -> list[str]:
    """One file: its xxh3-64 and the CRC-32 of each raw chunk in a single sequential read
    (every byte is read once, into one reused buffer: bounded memory, and a file that
    shrinks under us reads short instead of faulting as a memory map would); compressed
    chunks then through the bounded inflating reader."""
    p = path / name
    raw = sorted((c for c, _ in chunks if c.data_offset is not None), key=lambda c: c.data_offset)
    packed = [(c, dtype) for c, dtype in chunks if c.data_offset is None]
    problems = []
    if not raw:
        digest = file_xxh3(str(p), advance)
        read = rec.size
    else:
        hasher = xxhash.xxh3_64()
        crcs = [0] * len(raw)
        first = 0                          # raw[:first] lie wholly before ``read``
        read = 0
        buf = bytearray(READ_BLOCK)
        view = memoryview(buf)
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            while True:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                block, start, end = view[:n], read, read + n
                hasher.update(block)
                k = first
                while k < len(raw) and raw[k].data_offset < end:
                    c = raw[k]
                    lo, hi = max(c.data_offset, start), min(c.data_offset + c.nbytes, end)
                    if lo < hi:
                        crcs[k] = crc32(block[lo - start:hi - start], crcs[k])
                    k += 1
                while first < len(raw) and raw[first].data_offset + raw[first].nbytes <= end:
                    first += 1
                read = end
                if advance is not None:
                    advance(n)
        finally:
            os.close(fd)
        digest = hasher.hexdigest()
        for c, crc in zip(raw, crcs):
            if c.data_offset + c.nbytes > read:
                problems.append(f"{path}: {name}: the chunk of {c.key!r} lies beyond the end of the file")
            elif crc != c.crc32:
                problems.append(f"{path}: {name}: CRC-32 mismatch in the chunk of {c.key!r} "
                                f"(member {c.member!r}, offset {list(c.offset)})")
    if read != rec.size:
        problems.insert(0, f"{path}: {name} changed size while being verified")
    elif digest != rec.xxh3_64:
        problems.insert(0, f"{path}: {name} does not match its xxh3-64 checksum in the manifest")
    if packed:
        problems += _check_compressed(p, name, packed, advance)
    return problems


def _check_compressed(p: Path, name: str, packed: list, advance) -> list[str]:
    """Inflate every compressed chunk through the bounded reader, the zip directory
    parsed once for the file."""
    from .shard_io import open_zip
    from .store.local import FileSource
    problems = []
    try:
        source = FileSource(p, name)
    except CheckpointError as e:
        return [f"{p.parent}: {e}"]
    with source:
        try:
            zf = open_zip(source, name)
        except CheckpointError as e:
            return [f"{p.parent}: {e}"]
        with zf:
            for c, dtype in packed:
                dest = np.empty(c.shape, dtype)    # the chunk's size, which the index bounds
                try:
                    read_compressed_chunk(zf, name, c, dest, verify=True)
                except CheckpointError as e:
                    problems.append(f"{p.parent}: {e} (key {c.key!r})")
                if advance is not None:
                    advance(c.nbytes)
    return problems


def _verify_legacy(path: Path, report: VerifyReport, checksums: bool) -> None:
    """The guide's single-file layout has no manifest: check what it can carry (readable
    .npz archives without objects, zip member CRCs, parseable JSON)."""
    from .legacy import LEGACY_FILES, PICKLE_META, LegacyCheckpoint

    report.layout = "legacy"
    report.notes.append("legacy single-file layout: no manifest, so no sizes or xxh3 checksums "
                        "to compare against; zip member CRCs checked")
    try:
        ck = LegacyCheckpoint(path)
    except CheckpointError as e:
        report.problem(str(e))
        return
    del ck  # opened for its validation (readable headers, no object arrays)
    for fname in LEGACY_FILES.values():
        f = path / fname
        if not f.is_file():
            continue
        report.files_checked += 1
        report.bytes_checked += f.stat().st_size if checksums else 0
        try:
            with zipfile.ZipFile(f) as zf:
                report.arrays += sum(n.endswith(".npy") for n in zf.namelist())
                bad = zf.testzip() if checksums else None
            if bad is not None:
                report.problem(f"{path}: {fname}: CRC mismatch in member {bad!r}")
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            report.problem(f"{path}: {fname}: cannot be read ({e})")
        except Exception as e:  # noqa: BLE001 - zlib.error and friends
            report.problem(f"{path}: {fname}: cannot be read ({type(e).__name__}: {e})")
    for fname in ("config.json", "metrics.json", "extra.json"):
        f = path / fname
        if f.exists():
            report.files_checked += 1
            try:
                json.loads(f.read_bytes())
            except (ValueError, OSError, RecursionError) as e:
                report.problem(f"{path}: {fname} is not valid JSON ({e})")
    if (path / PICKLE_META).exists():
        report.notes.append(f"{PICKLE_META} is a pickle: not opened (loading it can run code)")
