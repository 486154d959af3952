"""The pytree core: save items (name -> pytree) as one checkpoint, on any store.

``save_checkpoint`` resolves the path into (store, name) once, picks the coordinator and
executor for this participant (``backends.save_session``) and runs the one save pipeline
(``transaction.run_save``). Reading is ``reader.Checkpoint`` / ``open_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from .backends import save_session
from .executors.base import Executor
from .reader import (Checkpoint, ReplacedWhileReadingError, RestoreReport, open_checkpoint,  # noqa: F401
                     read_consistently)
from .store import resolve
from .transaction import CommitArgs, check_metrics, prepare_items, run_save

__all__ = ["save_checkpoint", "Checkpoint", "RestoreReport", "open_checkpoint", "read_consistently",
           "prepare_items", "ReplacedWhileReadingError"]


def save_checkpoint(path: Any, items: dict[str, Any], *, step: int | None = None,
                    json_files: dict[str, Any] | None = None, metrics: dict | None = None,
                    num_shards: int | None = None, compress: bool = False,
                    executor: Executor | None = None, progress: bool | None = None,
                    keep_other_items: bool = False, prepared: tuple | None = None,
                    backend: str = "auto", num_writers: int | None = None, save_timeout: float | None = None,
                    join_timeout: float | None = None,
                    process_index: int | None = None, process_count: int | None = None,
                    world: bool = False, filesystem: Any = None) -> Any:
    """Write ``items`` (name -> pytree) as a committed checkpoint at ``path`` (a local
    path or a URI such as ``s3://bucket/run/step_7``); returns its location.

    The checkpoint appears atomically, complete or not at all. An existing checkpoint there
    is replaced only once the new one is durable; with ``keep_other_items`` its items and
    metadata files that this save does not rewrite are carried over (hard links or the same
    objects, no data copied), which is how ``save_model`` + ``save_optimizer`` build one
    checkpoint. ``prepared`` is ``prepare_items(items)`` taken earlier (async saves).
    """
    check_metrics(metrics)          # before anything is written: a bad metric fails no commit
    store, name = resolve(path, filesystem)
    session = save_session(store, name, backend=executor if executor is not None else backend,
                           num_writers=num_writers, save_timeout=save_timeout, join_timeout=join_timeout,
                           process_index=process_index, process_count=process_count, world=world)
    prepared = prepared if prepared is not None else prepare_items(items)
    return run_save(store, name, prepared, coordinator=session.coordinator, executor=session.executor,
                    participant=session.participant, participants=session.count,
                    replicated=session.replicated, num_shards=num_shards, compress=compress,
                    progress=progress,
                    commit_args=CommitArgs(step, json_files, metrics, keep_other_items))
