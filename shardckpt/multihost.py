"""Multi-process saves without Ray: a commit protocol over shared storage.

For ``jax.distributed`` process groups (every process calls ``save`` for the same step,
SPMD style) when no Ray cluster is available. The processes agree on a transaction id with
one ``broadcast_one_to_all``; each writes its own shards and then its PartReport into the
shared tmp directory; process 0 waits for all parts (until the deadline), commits, and
names the transaction in the manifest; the others wait until the manifest with their
transaction id appears, or the tmp directory vanishes (an abort). No collective runs after
the first, so a dead process makes the others fail at the deadline instead of hanging.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np

from .checkpoint import PartReport, as_save_error, commit_parts, write_part
from .errors import SaveAbortedError
from .executors.base import Executor
from .format import MANIFEST, ItemRecord, Manifest, parse_array_spec
from .shard_io import ChunkRecord, ShardReport
from .storage import fsync_path, read_small_file, write_file_durable

POLL_SECONDS = 0.05


def part_to_bytes(part: PartReport) -> bytes:
    return msgpack.packb({
        "participant": part.participant,
        "items": {n: r.to_json() for n, r in part.items.items()},
        "item_of_file": part.item_of_file,
        "reports": [{"file": r.file, "size": r.size, "xxh3_64": r.xxh3_64, "writer": r.writer,
                     "chunks": [[c.key, c.member, list(c.offset), list(c.shape),
                                 -1 if c.data_offset is None else c.data_offset, c.nbytes, c.crc32]
                                for c in r.chunks]} for r in part.reports],
    }, use_bin_type=True)


def part_from_bytes(raw: bytes, where: str) -> PartReport:
    d = msgpack.unpackb(raw, raw=False)
    items = {n: ItemRecord({k: parse_array_spec(k, v, where) for k, v in r["arrays"].items()}, r["scalars"])
             for n, r in d["items"].items()}
    reports = [ShardReport(r["file"], r["size"], r["xxh3_64"],
                           [ChunkRecord(k, m, tuple(o), tuple(s), None if off < 0 else off, n, crc)
                            for k, m, o, s, off, n, crc in r["chunks"]], r["writer"]) for r in d["reports"]]
    return PartReport(d["participant"], items, reports, d["item_of_file"])


def _agree_on_transaction() -> tuple[str, str, int]:
    """(transaction id, host, pid) of process 0, known to every process."""
    from jax.experimental import multihost_utils
    host = socket.gethostname().encode()[:48].ljust(48, b"\0")
    mine = np.frombuffer(uuid.uuid4().bytes + host, np.uint8).copy()
    mine = np.concatenate([mine, np.frombuffer(np.int64(os.getpid()).tobytes(), np.uint8)])
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(mine))
    txn = bytes(agreed[:16]).hex()
    host0 = bytes(agreed[16:64]).rstrip(b"\0").decode(errors="replace")
    pid0 = int(np.frombuffer(bytes(agreed[64:72]), np.int64)[0])
    return txn, host0, pid0


class SharedStorageCommit(Executor):
    """Wraps a local executor; runs a save as a multi-process transaction (see module doc)."""

    name = "threads"

    def __init__(self, inner: Executor, participant: int, participants: int, save_timeout: float,
                 replicated: bool):
        self.inner = inner
        self.participant, self.participants = participant, participants
        self.save_timeout, self.replicated = save_timeout, replicated

    @property
    def num_workers(self) -> int:
        return getattr(self.inner, "num_workers", 1)

    def write_shards(self, tmp_dir, plans, *, compress, progress):
        return self.inner.write_shards(tmp_dir, plans, compress=compress, progress=progress)

    def read(self, jobs, *, verify, progress):
        return self.inner.read(jobs, verify=verify, progress=progress)

    def save_transaction(self, final: Path, entries, records, *, step, json_files, metrics, num_shards,
                         compress, progress, keep_other_items) -> Path:
        import re
        txn, host0, pid0 = _agree_on_transaction()
        host0 = re.sub(r"[^A-Za-z0-9]", "", host0)[:32] or "host"
        tmp = final.parent / f".{final.name}.tmp-{host0}-{pid0}-{txn[:12]}"
        deadline = time.time() + self.save_timeout
        p, n = self.participant, self.participants
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(exist_ok=True)
        try:
            part = write_part(tmp, entries, records, self.inner, num_shards=num_shards, compress=compress,
                              progress=progress, participant=p, participants=n, replicated=self.replicated)
            write_file_durable(tmp / f"part-{p:05d}.msgpack", part_to_bytes(part))
        except BaseException as e:
            # make the abort visible to everyone: process 0 stops waiting at once
            shutil.rmtree(tmp, ignore_errors=True)
            raise as_save_error(e, final) from e
        if p == 0:
            return self._commit(final, tmp, txn, deadline, step=step, json_files=json_files,
                                metrics=metrics, keep_other_items=keep_other_items)
        return self._await_commit(final, tmp, txn, deadline)

    def _commit(self, final, tmp, txn, deadline, **commit_args) -> Path:
        names = [tmp / f"part-{i:05d}.msgpack" for i in range(self.participants)]
        try:
            while not all(f.exists() for f in names):
                if not tmp.exists():
                    raise SaveAbortedError(f"saving {final}: another participant aborted the save")
                if time.time() > deadline:
                    missing = [i for i, f in enumerate(names) if not f.exists()]
                    raise SaveAbortedError(f"saving {final}: participants {missing} did not report "
                                           f"within save_timeout={self.save_timeout}s; nothing was committed")
                time.sleep(POLL_SECONDS)
            parts = [part_from_bytes(read_small_file(f, 1 << 30, str(tmp)), str(f)) for f in names]
            for f in names:
                os.unlink(f)
            fsync_path(tmp)
            return commit_parts(final, tmp, parts, transaction=txn, **commit_args)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise as_save_error(e, final) from e

    def _await_commit(self, final, tmp, txn, deadline) -> Path:
        while True:
            if _committed(final, txn):
                return final
            if not tmp.exists():
                if _committed(final, txn):
                    return final
                raise SaveAbortedError(f"saving {final}: the save was aborted (see process 0); nothing was committed")
            if time.time() > deadline + 30:
                raise SaveAbortedError(f"saving {final}: no commit within save_timeout={self.save_timeout}s")
            time.sleep(POLL_SECONDS)


def committed_by(final: Path, txn: str) -> bool:
    """Whether the checkpoint at ``final`` is the one transaction ``txn`` committed."""
    return _committed(final, txn)


def _committed(final: Path, txn: str) -> bool:
    try:
        raw = read_small_file(final / MANIFEST, 256 << 20, str(final))
        return Manifest.loads(raw, str(final)).transaction == txn
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return False
