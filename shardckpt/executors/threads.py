"""Thread-pool executor: parallel shard writes and reads in this process, without Ray.

Threads are enough on one host: the work is file or network I/O, hashing and memcpy, all of
which release the GIL, so N threads keep N disk queues (or uploads) busy.
"""

from __future__ import annotations

import os
import time

from shardckpt.errors import SaveAbortedError
from shardckpt.executors.base import Executor, ReadJob, run_read_job, write_one
from shardckpt.format.shard import ShardPlan, ShardReport, writer_identity
from shardckpt.workers import run_all


def default_thread_count() -> int:
    return max(2, min(8, os.cpu_count() or 2))


class ThreadExecutor(Executor):
    def __init__(self, num_workers: int | None = None):
        self.num_workers = num_workers or default_thread_count()

    def write_shards(self, staging, plans: list[ShardPlan], *, compress: bool, progress=None,
                     deadline: float | None = None, writer: dict | None = None) -> list[ShardReport]:
        def write(i_plan):
            i, plan = i_plan
            ident = writer_identity(writer=f"thread-{i % self.num_workers}", backend="threads", **(writer or {}))
            return write_one(staging, plan, compress, progress, ident)

        reports = run_all(write, list(enumerate(plans)), self.num_workers)
        if deadline is not None and time.time() > deadline:
            raise SaveAbortedError(f"saving {staging.final}: shards written after the deadline")
        return reports

    def read(self, jobs: list[ReadJob], *, verify: bool, progress=None) -> None:
        run_all(lambda job: run_read_job(job, verify, progress), jobs, self.num_workers)
