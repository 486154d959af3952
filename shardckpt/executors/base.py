"""The Executor seam: who moves the bytes.

Two protocols, because not every executor does both: a ``Writer`` writes planned shards into
a save's staging area, a ``Reader`` fills read targets from stored files; an ``Executor``
is both. Each runs in parallel and knows nothing of coordinators, the API or the format
beyond the shard file, so any executor runs with any store.

The thread executor (``threads.py``) works in this process; the Ray executor (``ray.py``)
runs the same calls in writer/reader actors on every node; the per-node chunk cache
(``node_share.py``) is a Reader only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.shard import ReadTarget, ShardPlan, ShardReport, read_chunks, write_shard
from shardckpt.store.base import Staging, Store

Progress = Callable[[int], None] | None


@dataclass
class ReadJob:
    """Everything to read from one stored file: ``store`` and ``name`` (root-relative)
    locate it, ``file_name`` is its name in the manifest (for messages)."""

    store: Store
    name: str
    file_name: str
    expected_size: int
    targets: list[ReadTarget] = field(default_factory=list)
    version: str = ""          # the checkpoint version (its manifest's checksum), for caches

    @property
    def nbytes(self) -> int:
        return sum(t.dest.nbytes for t in self.targets)


class Reader(ABC):
    """Fills read targets; ``num_workers`` files at once."""

    num_workers: int = 1

    @abstractmethod
    def read(self, jobs: list[ReadJob], *, verify: bool, progress: Progress) -> None:
        """Fill every target of every job, in parallel."""


class Writer(ABC):
    """Writes planned shards; ``num_workers`` is how many files at once (plans use it)."""

    num_workers: int = 1

    @abstractmethod
    def write_shards(self, staging: Staging, plans: list[ShardPlan], *, compress: bool,
                     progress: Progress, deadline: float | None = None,
                     writer: dict | None = None) -> list[ShardReport]:
        """Write every planned shard into ``staging`` (durable), in parallel."""

    def shard_bytes_cap(self, total_bytes: int) -> int | None:
        """The largest shard this writer wants for a part of ``total_bytes`` (None: no
        limit; the Ray executor streams shards through a bounded memory budget)."""
        return None


class Executor(Reader, Writer):
    """Both: what a save session and a load are given."""

    def close(self) -> None:
        pass


def write_one(staging: Staging, plan: ShardPlan, compress: bool, progress: Progress, writer: dict) -> ShardReport:
    return write_shard(staging, plan.file, plan.members, compress=compress, progress=progress, writer=writer)


def run_read_job(job: ReadJob, verify: bool, progress: Progress = None) -> None:
    """Read one file's chunks (``format.shard.read_chunks``), after checking that the file
    is there and has the size the manifest records."""
    try:
        source = job.store.open(job.name)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{job.store.where(job.name)}: shard file {job.file_name} is missing") from e
    with source:
        if source.size != job.expected_size:
            raise CorruptCheckpointError(f"{job.store.where(job.name)}: {job.file_name} is {source.size} bytes, "
                                         f"the manifest says {job.expected_size}")
        read_chunks(source, job.file_name, job.targets, verify=verify, progress=progress)
