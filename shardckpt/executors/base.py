"""The Executor seam: who moves the bytes. An executor writes planned shards into a save's
staging area and fills read targets from stored files, in parallel; it knows nothing of
stores, coordinators or the format beyond that, so any executor runs with any store.

The thread executor (local.py) works in this process; the Ray executor (ray.py) runs the
same two calls in writer/reader actors on every node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import CorruptCheckpointError
from ..plan import ShardPlan
from ..shard_io import (ChunkRecord, ShardReport, open_zip, read_chunk_into, read_chunk_part,
                        read_compressed_chunk, write_shard)


@dataclass
class ReadTarget:
    """Copy ``chunk`` into ``dest``. With ``sub`` None the chunk fills ``dest`` exactly
    (C-contiguous, read in place); else ``dest[...] = chunk_array[sub]``."""

    chunk: ChunkRecord
    dest: np.ndarray
    sub: tuple[slice, ...] | None = None


@dataclass
class ReadJob:
    """Everything to read from one stored file: ``store`` and ``name`` (root-relative)
    locate it, ``file_name`` is its name in the manifest (for messages)."""

    store: Any
    name: str
    file_name: str
    expected_size: int
    targets: list[ReadTarget] = field(default_factory=list)
    version: str = ""          # the checkpoint version (its manifest's checksum), for caches

    @property
    def nbytes(self) -> int:
        return sum(t.dest.nbytes for t in self.targets)


class Executor(ABC):
    """Moves bytes; ``num_workers`` is how many files it writes at once (plans use it)."""

    num_workers: int = 1

    @abstractmethod
    def write_shards(self, staging, plans: list[ShardPlan], *, compress: bool,
                     progress: Callable[[int], None] | None, deadline: float | None = None,
                     writer: dict | None = None) -> list[ShardReport]:
        """Write every planned shard into ``staging`` (durable), in parallel."""

    @abstractmethod
    def read(self, jobs: list[ReadJob], *, verify: bool,
             progress: Callable[[int], None] | None) -> None:
        """Fill every target of every job, in parallel."""

    def shard_bytes_cap(self, total_bytes: int) -> int | None:
        """The largest shard this executor wants for a part of ``total_bytes`` (None: no
        limit; the Ray executor streams shards through a bounded memory budget)."""
        return None

    def close(self) -> None:
        pass


def write_one(staging, plan: ShardPlan, compress: bool, progress, writer: dict) -> ShardReport:
    return write_shard(staging, plan.file, plan.members, compress=compress, progress=progress, writer=writer)


def run_read_job(job: ReadJob, verify: bool, progress=None) -> None:
    """Read one file's chunks: whole chunks straight into their destination, partial ones
    through ``Source.buffer`` (a map on local disks), compressed ones through the zip
    directory parsed once for the whole file."""
    try:
        source = job.store.open(job.name)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{job.store.where(job.name)}: shard file {job.file_name} is missing") from e
    with source:
        if source.size != job.expected_size:
            raise CorruptCheckpointError(f"{job.store.where(job.name)}: {job.file_name} is {source.size} bytes, "
                                         f"the manifest says {job.expected_size}")
        zf = None
        try:
            for t in job.targets:
                c = t.chunk
                if c.data_offset is None:
                    if zf is None:
                        zf = open_zip(source, job.file_name)
                    tmp = np.empty(c.shape, t.dest.dtype) if t.sub is not None else t.dest
                    read_compressed_chunk(zf, job.file_name, c, tmp, verify=verify)
                    if t.sub is not None:
                        t.dest[...] = tmp[t.sub]
                elif t.sub is None:
                    read_chunk_into(source, c, t.dest, verify=verify)
                else:
                    read_chunk_part(source, c, t.dest.dtype, t.sub, t.dest, verify=verify)
                if progress is not None:
                    progress(t.dest.nbytes)
        finally:
            if zf is not None:
                zf.close()
