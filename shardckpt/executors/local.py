"""Thread-pool executor: parallel shard writes and reads in this process, without Ray.

Threads are enough on one host: the work is file I/O, hashing and memcpy, all of which
release the GIL, so N threads keep N disks queues (or page-cache copies) busy.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..plan import ShardPlan
from ..shard_io import ShardReport, write_shard, writer_identity
from .base import Executor, ReadJob, run_read_job


def default_thread_count() -> int:
    return max(2, min(8, os.cpu_count() or 2))


class ThreadExecutor(Executor):
    name = "threads"

    def __init__(self, num_workers: int | None = None):
        self.num_workers = num_workers or default_thread_count()

    def write_shards(self, tmp_dir: Path, plans: list[ShardPlan], *, compress: bool,
                     progress=None) -> list[ShardReport]:
        def write(i_plan):
            i, plan = i_plan
            ident = writer_identity(writer=f"thread-{i % self.num_workers}", backend=self.name)
            return write_shard(str(tmp_dir / plan.file), plan.members, compress=compress,
                               progress=progress, writer=ident)

        return self._map(write, list(enumerate(plans)))

    def read(self, jobs: list[ReadJob], *, verify: bool, progress=None, where: str = "") -> None:
        self._map(lambda job: run_read_job(job, verify, where or str(job.path.parent), progress), jobs)

    def _map(self, fn, items):
        if len(items) <= 1 or self.num_workers == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.num_workers, len(items)), thread_name_prefix="shardckpt") as pool:
            futures = [pool.submit(fn, x) for x in items]
            # .result() re-raises the first failure after all have finished (no stray writers)
            errors = [f.exception() for f in futures]
            for e in errors:
                if e is not None:
                    raise e
            return [f.result() for f in futures]
