"""``shardckpt.verify(path)``: check a checkpoint against its manifest without loading it,
on any store (a local directory, ``s3://...``, any pyarrow filesystem).

A load already refuses what it reads wrong; ``verify`` reads *everything* and reports every
problem at once instead of stopping at the first: the manifest and chunk index parse and
validate, every shard and metadata file is a regular file of the recorded size whose
xxh3-64 matches the manifest, every chunk's CRC-32 matches the index, and nothing else lies
in the checkpoint. A damaged or hostile checkpoint never raises here: its problems go into
the report, each naming the file (and key) at fault.

Every file is read once, sequentially, through ``Store.open`` into one reused buffer
(bounded memory; a file that shrinks while it is read reads short instead of faulting as a
memory map would); compressed chunks are then inflated through the one chunk reader.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xxhash

from shardckpt.errors import CheckpointError
from shardckpt.executors.threads import default_thread_count
from shardckpt.format import limits
from shardckpt.format.manifest import MANIFEST, FileRecord
from shardckpt.format.names import is_version_dir
from shardckpt.format.shard import ChunkRecord, ReadTarget, SourceFile, crc32, read_chunks
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.legacy import LEGACY_FILES, PICKLE_META, LegacyCheckpoint
from shardckpt.loading.open import layout_of, orbax_hint
from shardckpt.progress import byte_progress
from shardckpt.store.base import Entry, Store
from shardckpt.store.registry import resolve
from shardckpt.workers import run_all

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


def verify(path: Any, *, checksums: bool = True, progress: bool | None = None,
           filesystem: Any = None, label: str | None = None) -> VerifyReport:
    """Check the checkpoint at ``path`` (a path or a URI) completely and return a
    :class:`VerifyReport`.

    ``checksums=False`` checks structure, presence and sizes only (no file is read beyond
    the manifest and index). ``progress``: a progress bar on stderr (None: only on a
    terminal and for large checkpoints), named ``label`` (default: the checkpoint's name).
    Never raises for a damaged checkpoint.
    """
    report = VerifyReport(str(path), checksums=checksums)
    try:
        store, name = resolve(path, filesystem)
        report.path = store.where(name)
        _verify(store, name, report, checksums, progress, label)
    except Exception as e:  # noqa: BLE001 - a verifier reports, it does not crash
        report.problem(f"{report.path}: verification stopped by an unexpected error: {type(e).__name__}: {e}")
    return report


def _verify(store: Store, name: str, report: VerifyReport, checksums: bool, progress: bool | None,
            label: str | None = None) -> None:
    where = store.where(name)
    layout = layout_of(store, name)
    if layout.kind in ("missing", "file", "orbax", "steps", "empty", "other"):
        report.layout = ""
        report.problem({"missing": f"{where}: no such file or directory",
                        "file": f"{where}: not a directory, so not a checkpoint",
                        "orbax": orbax_hint(where, layout.orbax or ""),
                        "steps": f"{where}: a directory of checkpoints, not one checkpoint (verify it as a "
                                 "directory: every step is checked)",
                        }.get(layout.kind, f"{where}: no {MANIFEST}; this is not a committed checkpoint"))
        return
    if layout.kind == "legacy":
        _verify_legacy(store, name, report, checksums)
        return
    try:
        ck = Checkpoint.at(store, name)
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

    records: dict[str, FileRecord] = {**m.files, **m.meta_files}
    entries = _entries(store, name, records, report)

    # Presence, type and size of every listed file; only sound files are read further.
    sound: dict[str, int] = {}
    for fname, rec in records.items():
        why = _file_problem(entries.get(fname), rec.size)
        if why:
            report.problem(f"{where}: {fname} {why}")
        else:
            sound[fname] = rec.size
    if not checksums:
        report.files_checked += len(sound)
        return

    chunks_of: dict[str, list[tuple[ChunkRecord, np.dtype]]] = {}
    for item, by_key in (index or {}).items():
        for key, rows in by_key.items():
            dtype = np.dtype(m.items[item].arrays[key].stored_dtype)
            for fname, chunk in rows:
                chunks_of.setdefault(fname, []).append((chunk, dtype))
    packed_bytes = sum(c.nbytes for f, cs in chunks_of.items() if f in sound
                       for c, _ in cs if c.data_offset is None)
    total = sum(sound.values()) + packed_bytes

    def check(fname: str, advance) -> list[str]:
        try:
            return _check_file(store, name, fname, records[fname], chunks_of.get(fname, []), advance)
        except (OSError, CheckpointError) as e:
            return [f"{where}: {fname} cannot be read: {e}"]

    with byte_progress(f"verifying {label or name}", total, progress, done=f"verified {label or name}") as advance:
        names = sorted(sound)
        for problems in run_all(lambda n: check(n, advance), names, default_thread_count()):
            for p in problems:
                report.problem(p)
    report.files_checked += len(sound)
    report.bytes_checked += sum(sound.values())


def _entries(store: Store, name: str, records: dict[str, FileRecord], report: VerifyReport) -> dict[str, Entry]:
    """The checkpoint's entries by manifest name (``vXXX/file`` under a version prefix),
    reporting everything the manifest does not list: stray files and directories are
    problems, an unreferenced version prefix (a save that did not commit) a note."""
    where = store.where(name)
    listed_dirs = {n.split("/", 1)[0] for n in records if "/" in n}
    out: dict[str, Entry] = {}
    try:
        top = sorted(store.list(name), key=lambda e: e.name)
    except (OSError, CheckpointError) as e:
        report.problem(f"{where}: cannot list the directory: {e}")
        return out
    for entry in top:
        if entry.name == MANIFEST or entry.name in records:
            out[entry.name] = entry
            continue
        if entry.is_dir and not entry.is_link and entry.name in listed_dirs:
            for child in store.list(f"{name}/{entry.name}"):
                key = f"{entry.name}/{child.name}"
                if key in records:
                    out[key] = child
                else:
                    report.problem(f"{where}: stray {_kind(child)} {key} is not listed in the manifest")
            continue
        if entry.is_dir and not entry.is_link and is_version_dir(entry.name):
            report.notes.append(f"{entry.name}/ is not referenced by the manifest: what a save that did not "
                                "commit left (shardckpt gc removes it)")
            continue
        report.problem(f"{where}: stray {_kind(entry)} {entry.name} is not listed in the manifest")
    return out


def _kind(e: Entry) -> str:
    return "symlink" if e.is_link else "directory" if e.is_dir else "file"


def _file_problem(entry: Entry | None, size: int) -> str | None:
    if entry is None:
        return "is missing"
    if entry.is_link:
        return "is a symlink; checkpoint files must be regular files"
    if entry.is_dir:
        return "is not a regular file"
    if entry.size != size:
        return f"is {entry.size} bytes, the manifest says {size} (truncated or replaced)"
    return None


def _check_file(store: Store, name: str, fname: str, rec: FileRecord,
                chunks: list[tuple[ChunkRecord, np.dtype]], advance: Callable[[int], None] | None) -> list[str]:
    """One file: its xxh3-64 and the CRC-32 of each raw chunk in a single sequential read
    into one reused buffer; compressed chunks then through the one chunk reader."""
    where = store.where(name)
    raw = sorted((c for c, _ in chunks if c.data_offset is not None), key=lambda c: c.data_offset)
    packed = [(c, dtype) for c, dtype in chunks if c.data_offset is None]
    problems = []
    hasher = xxhash.xxh3_64()
    crcs = [0] * len(raw)
    first = 0                          # raw[:first] lie wholly before ``read``
    read = 0
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    with store.open(f"{name}/{fname}") as source:
        size = source.size
        while read < size:
            n = min(READ_BLOCK, size - read)
            try:
                source.readinto(read, view[:n])
            except CheckpointError:
                break                      # shorter than when it was opened: reported below
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
        for c, crc in zip(raw, crcs):
            if c.data_offset + c.nbytes > read:
                problems.append(f"{where}: {fname}: the chunk of {c.key!r} lies beyond the end of the file")
            elif crc != c.crc32:
                problems.append(f"{where}: {fname}: CRC-32 mismatch in the chunk of {c.key!r} "
                                f"(member {c.member!r}, offset {list(c.offset)})")
        if read != rec.size:
            problems.insert(0, f"{where}: {fname} changed size while being verified")
        elif hasher.hexdigest() != rec.xxh3_64:
            problems.insert(0, f"{where}: {fname} does not match its xxh3-64 checksum in the manifest")
        if packed:
            def damaged(t: ReadTarget, e: CheckpointError) -> None:
                problems.append(f"{where}: {e} (key {t.chunk.key!r})")
            try:
                read_chunks(source, fname, [ReadTarget(c, np.empty(c.shape, dtype)) for c, dtype in packed],
                            verify=True, progress=advance, on_error=damaged)
            except CheckpointError as e:        # the archive itself cannot be opened
                problems.append(f"{where}: {e}")
    return problems


def _verify_legacy(store: Store, name: str, report: VerifyReport, checksums: bool) -> None:
    """The guide's single-file layout has no manifest: check what it can carry (readable
    .npz archives without objects, zip member CRCs, parseable JSON)."""
    where = store.where(name)
    report.layout = "legacy"
    report.notes.append("legacy single-file layout: no manifest, so no sizes or xxh3 checksums "
                        "to compare against; zip member CRCs checked")
    try:
        LegacyCheckpoint.at(store, name)   # opened for its validation (readable headers, no object arrays)
    except CheckpointError as e:
        report.problem(str(e))
        return
    present = {e.name: e for e in store.list(name)}
    for fname in LEGACY_FILES.values():
        entry = present.get(fname)
        if entry is None or entry.is_dir or entry.is_link:
            continue
        report.files_checked += 1
        report.bytes_checked += entry.size if checksums else 0
        try:
            with store.open(f"{name}/{fname}") as source, \
                    zipfile.ZipFile(io.BufferedReader(SourceFile(source), 1 << 20)) as zf:
                report.arrays += sum(n.endswith(".npy") for n in zf.namelist())
                bad = zf.testzip() if checksums else None
            if bad is not None:
                report.problem(f"{where}: {fname}: CRC mismatch in member {bad!r}")
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, CheckpointError) as e:
            report.problem(f"{where}: {fname}: cannot be read ({e})")
        except Exception as e:  # noqa: BLE001 - zlib.error and friends
            report.problem(f"{where}: {fname}: cannot be read ({type(e).__name__}: {e})")
    for fname in ("config.json", "metrics.json", "extra.json"):
        if fname in present:
            report.files_checked += 1
            try:
                json.loads(store.read_bytes(f"{name}/{fname}", limits.MAX_JSON_BYTES))
            except (ValueError, OSError, RecursionError, CheckpointError) as e:
                report.problem(f"{where}: {fname} is not valid JSON ({e})")
    if PICKLE_META in present:
        report.notes.append(f"{PICKLE_META} is a pickle: not opened (loading it can run code)")
