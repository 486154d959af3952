"""The chunk reader checks what it copied, never a memory map of the file (#17.7).

Resharding restores used to check a chunk's CRC over a mapping of the file and then copy
from the same mapping: bytes changed in place between the two were returned as data
(17 elements, no error), and a file truncated during the check killed the process with
SIGBUS. Now every chunk is read with ``pread`` into memory (the target itself, or a scratch
buffer when only part of the chunk is needed) and checked there. A real checkpoint on
disk; the file is changed in place, or truncated, by a source that does it around the
reader's own reads, as a concurrent writer or a failing disk would.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shardckpt import CorruptCheckpointError
from shardckpt.format.shard import ReadTarget, read_chunks
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items

W = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
HALF = (slice(0, 32), slice(None))


class ChangingSource:
    """The real source of a shard file; ``when`` ("after" / "before") each read, the bytes
    it covers are XORed in the file itself; ``truncate`` cuts the file after it was opened."""

    def __init__(self, source, path: Path, when: str | None = None, truncate: bool = False):
        self.source, self.path, self.when = source, path, when
        self.size, self.name = source.size, source.name
        if truncate:
            os.truncate(path, source.size // 2)

    def _flip(self, offset: int, n: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            data = f.read(n)
            f.seek(offset)
            f.write(bytes(b ^ 0x5A for b in data))
            f.flush()
            os.fsync(f.fileno())

    def readinto(self, offset: int, view: memoryview) -> None:
        if self.when == "before":
            self._flip(offset, len(view))
        self.source.readinto(offset, view)
        if self.when == "after":
            self._flip(offset, len(view))


def _one_chunk(tmp_path):
    p = Path(save_items(tmp_path / "c", {"model": {"w": W}}))
    ck = Checkpoint(p)
    (fname, chunk), = list(ck.index()["model"]["w"])
    assert chunk.data_offset is not None       # stored, not deflated: the raw read path
    return ck, fname, chunk, p / fname


@pytest.mark.parametrize("sub", [HALF, None], ids=["part-of-a-chunk", "whole-chunk"])
def test_bytes_changed_after_the_read_are_never_returned(tmp_path, sub):
    ck, fname, chunk, path = _one_chunk(tmp_path)
    dest = np.empty((32, 64) if sub else (64, 64), np.float32)
    with ck.store.open(f"{ck.name}/{fname}") as src:
        read_chunks(ChangingSource(src, path, "after"), fname, [ReadTarget(chunk, dest, sub)])
    assert np.array_equal(dest, W[HALF] if sub else W)     # what was checked, not what the file holds now
    with ck.store.open(f"{ck.name}/{fname}") as src:         # the file really changed: a new read refuses it
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            read_chunks(src, fname, [ReadTarget(chunk, np.empty_like(dest), sub)])


@pytest.mark.parametrize("sub", [HALF, None], ids=["part-of-a-chunk", "whole-chunk"])
@pytest.mark.parametrize("damage, why", [({"when": "before"}, "checksum mismatch"), ({"truncate": True}, "truncated")],
                         ids=["changed-before-the-read", "truncated-after-the-open-not-sigbus"])
def test_damage_before_or_during_the_read_is_our_error(tmp_path, sub, damage, why):
    ck, fname, chunk, path = _one_chunk(tmp_path)
    dest = np.empty((32, 64) if sub else (64, 64), np.float32)
    with ck.store.open(f"{ck.name}/{fname}") as src:
        with pytest.raises(CorruptCheckpointError, match=why):
            read_chunks(ChangingSource(src, path, **damage), fname, [ReadTarget(chunk, dest, sub)])


def test_a_restore_after_truncation_names_the_file(tmp_path):
    _, fname, _, path = _one_chunk(tmp_path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError, match=fname):
        Checkpoint(path.parent).restore("model", {"w": np.zeros_like(W)})
