"""The seam between planning and I/O: an executor writes planned shards and reads chunks.

The thread executor (local.py) and the Ray executor (ray.py) implement the same two calls,
so the format never depends on who wrote it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..plan import ShardPlan
from ..shard_io import ChunkRecord, ShardReport, read_chunk_into, read_compressed_chunk
from ..storage import open_data_file


@dataclass
class ReadTarget:
    """Copy ``chunk`` into ``dest``. With ``sub`` None the chunk fills ``dest`` exactly
    (C-contiguous, read in place); else ``dest[...] = chunk_array[sub]``."""

    chunk: ChunkRecord
    dest: np.ndarray
    sub: tuple[slice, ...] | None = None


@dataclass
class ReadJob:
    """Everything to read from one file."""

    path: Path
    file_name: str
    expected_size: int
    targets: list[ReadTarget] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.dest.nbytes for t in self.targets)


class Executor(ABC):
    name = "abstract"

    @abstractmethod
    def write_shards(self, tmp_dir: Path, plans: list[ShardPlan], *, compress: bool,
                     progress: Callable[[int], None] | None) -> list[ShardReport]:
        """Write every planned shard into ``tmp_dir`` (fsynced), in parallel."""

    @abstractmethod
    def read(self, jobs: list[ReadJob], *, verify: bool,
             progress: Callable[[int], None] | None) -> None:
        """Fill every target of every job, in parallel."""

    def close(self) -> None:
        pass


def run_read_job(job: ReadJob, verify: bool, where: str, progress=None) -> None:
    """Read one file's chunks: whole chunks straight into their destination with
    ``preadv``; partial ones through a memory map, touching only the pages needed (plus the
    whole chunk once when its checksum is verified)."""
    from ..errors import CorruptCheckpointError

    fd, size = open_data_file(job.path, where)
    try:
        if size != job.expected_size:
            raise CorruptCheckpointError(f"{where}: {job.file_name} is {size} bytes, the manifest "
                                         f"says {job.expected_size}")
        mm = None
        for t in job.targets:
            c = t.chunk
            if c.data_offset is None:
                tmp = np.empty(c.shape, t.dest.dtype) if t.sub is not None else t.dest
                read_compressed_chunk(str(job.path), job.file_name, c, tmp, verify=verify)
                if t.sub is not None:
                    t.dest[...] = tmp[t.sub]
            elif t.sub is None:
                read_chunk_into(fd, job.file_name, size, c, t.dest, verify=verify)
            else:
                if mm is None:
                    import mmap
                    mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if size else b""
                src = np.ndarray(c.shape, t.dest.dtype, buffer=mm, offset=c.data_offset)
                if verify:
                    from ..shard_io import crc32
                    if crc32(memoryview(mm)[c.data_offset:c.data_offset + c.nbytes]) != c.crc32:
                        raise CorruptCheckpointError(f"{where}: checksum mismatch in {job.file_name} "
                                                     f"chunk of {c.key!r}")
                t.dest[...] = src[t.sub]
                del src
            if progress is not None:
                progress(t.dest.nbytes)
        if mm is not None and not isinstance(mm, bytes):
            mm.close()
    finally:
        os.close(fd)
