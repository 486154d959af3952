"""Copy one committed checkpoint into another store, as a commit of its own (#19).

How the memory tier's steps reach the persistent directory: every file is streamed from the
source store into the destination's staging area by whoever holds it (``Store.copy_out``:
the memory tier's holder actors write their own copies, so the training process sends no
bytes again; other stores stream through this process), and the checkpoint is then
committed in the destination by the ordinary committer, from the source's validated index
and manifest: the destination gets its own index, file names and manifest, validated by the
loader's own checks, published atomically. Every file's size and xxh3 must come out as the
source manifest records them, so a damaged copy is never persisted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from shardckpt.errors import CheckpointError, CorruptCheckpointError, SaveAbortedError
from shardckpt.format import limits
from shardckpt.format.manifest import INDEX, Manifest
from shardckpt.format.names import is_fragment_name
from shardckpt.format.parts import CommitArgs, PartReport
from shardckpt.format.shard import ShardReport
from shardckpt.format.version import Version
from shardckpt.saving.commit import commit, version_reader
from shardckpt.store.base import Store, Written
from shardckpt.workers import run_all

COPY_THREADS = 8        # files copied at once (each by the holder of one of its copies)


@dataclass
class CopyReport:
    """What a copy wrote: files, bytes, seconds."""

    source: str
    destination: str
    files: int
    nbytes: int
    seconds: float


def copy_checkpoint(src: Store, name: str, dst: Store, dst_name: str | None = None) -> CopyReport:
    """Commit checkpoint ``name`` of ``src`` as ``dst_name`` (default: the same name) of
    ``dst``: the same items, arrays, scalars, metrics and metadata, byte for byte, with
    ``dst``'s own layout. Raises (publishing nothing) if any file does not come out as the
    source's manifest records it."""
    start = time.perf_counter()
    dst_name = dst_name or name
    where = src.where(name)
    version = Version(version_reader(src, name), where)
    manifest = version.manifest
    index = version.index()
    json_files = {}
    for stored in manifest.meta_files:
        base = stored.rsplit("/", 1)[-1]
        if base in (INDEX, "structure.json") or is_fragment_name(base):
            continue            # the committer writes these afresh for the destination's names
        raw = version.read_meta(stored, limits.MAX_JSON_BYTES)
        try:
            json_files[base] = json.loads(raw)
        except ValueError as e:
            raise CorruptCheckpointError(f"{where}: {stored} is not JSON ({e})") from e
    staging = dst.stage(dst_name, uuid.uuid4().hex, owner=None)
    try:
        written = dict(zip(manifest.files, run_all(
            lambda f: _copy_file(src, f"{name}/{f}", staging, f.rsplit("/", 1)[-1], manifest, where),
            list(manifest.files), COPY_THREADS)))
        rows: dict[str, list] = defaultdict(list)
        for item, by_key in index.items():
            for table in by_key.values():
                for fname, chunk in table:
                    rows[fname].append(chunk)
        reports = [ShardReport(written[f].name, written[f].size, written[f].xxh3_64, rows.get(f, []),
                               manifest.files[f].writer) for f in manifest.files]
        part = PartReport(0, manifest.items, reports,
                          {written[f].name: manifest.files[f].item for f in manifest.files})
        commit(staging, [part], CommitArgs(step=manifest.step, json_files=json_files, metrics=manifest.metrics),
               transaction=manifest.transaction)
    except BaseException as e:
        try:
            staging.discard()
        except Exception:  # noqa: BLE001 - best effort: what is left is invisible, gc removes it
            pass
        if isinstance(e, CheckpointError) or not isinstance(e, Exception):
            raise
        raise SaveAbortedError(f"copying {where} to {dst.where(dst_name)} failed, nothing was committed: "
                               f"{type(e).__name__}: {e}") from e
    return CopyReport(where, dst.where(dst_name), len(written), sum(w.size for w in written.values()),
                      time.perf_counter() - start)


def _copy_file(src: Store, name: str, staging, dst_name: str, manifest: Manifest, where: str) -> Written:
    stored = name.split("/", 1)[1]
    rec = manifest.files[stored]
    out = src.copy_out(name, staging, dst_name)
    if out.size != rec.size or out.xxh3_64 != rec.xxh3_64:
        raise CorruptCheckpointError(f"{where}: {stored} came out as {out.size} bytes with xxh3 {out.xxh3_64}; the "
                                     f"manifest records {rec.size} bytes with xxh3 {rec.xxh3_64}")
    return out

