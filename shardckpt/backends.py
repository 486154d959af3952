"""Choosing the executor a save or load runs on (``backend=`` everywhere in the API)."""

from __future__ import annotations

from .errors import CheckpointError
from .executors.base import Executor
from .executors.local import ThreadExecutor

BACKENDS = ("auto", "threads", "ray")


def resolve_executor(backend: str | Executor = "auto", num_writers: int | None = None,
                     save_timeout: float | None = None) -> Executor:
    """``threads``: a thread pool here. ``ray``: writer/reader actors (starting a local Ray
    if none runs). ``auto``: Ray when ``ray.is_initialized()``, threads otherwise."""
    if isinstance(backend, Executor):
        return backend
    if backend not in BACKENDS:
        raise CheckpointError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "ray" if _ray_running() else "threads"
    if backend == "threads":
        return ThreadExecutor(num_writers)
    from .executors.ray import RayExecutor
    return RayExecutor.get(num_writers, save_timeout)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def executor_for_save(backend: str | Executor = "auto", num_writers: int | None = None,
                      save_timeout: float | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> Executor:
    """The executor for one participant of a save: with several participants, a Ray
    coordinator transaction (Ray running or ``backend='ray'``), else the shared-storage
    protocol of ``multihost`` for ``jax.distributed`` process groups."""
    from .coordinator import DEFAULT_SAVE_TIMEOUT
    from .participants import participants
    index, count = participants(process_index, process_count)
    if count == 1:
        return resolve_executor(backend, num_writers, save_timeout)
    import jax
    replicated = jax.process_count() == 1   # independent processes holding the same state
    if backend == "ray" or (backend == "auto" and _ray_running()):
        return resolve_executor("ray", num_writers, save_timeout).with_participant(index, count, replicated)
    if jax.process_count() != count:
        raise CheckpointError(f"{count} participants without Ray need jax.distributed with {count} processes "
                              f"(jax.process_count() is {jax.process_count()}); start Ray or pass backend='ray'")
    from .multihost import SharedStorageCommit
    return SharedStorageCommit(ThreadExecutor(num_writers), index, count,
                               save_timeout or DEFAULT_SAVE_TIMEOUT, replicated)
