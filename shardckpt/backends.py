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
