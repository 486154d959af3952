"""Choosing who runs a save or a load: the Coordinator and the Executor for ``backend=``,
``num_writers=``, ``process_index=``/``process_count=``, whatever the Store."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError
from .executors.base import Executor
from .executors.local import ThreadExecutor
from .store import Store

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
        backend = "ray" if ray_running() else "threads"
    if backend == "threads":
        return ThreadExecutor(num_writers)
    from .executors.ray import RayExecutor
    return RayExecutor.get(num_writers, save_timeout)


def resolve_load_executor(backend: str | Executor = "auto", num_writers: int | None = None) -> Executor:
    """The executor a load runs on. With Ray, a load from inside a Ray actor (a Ray Train
    worker, a data-parallel rank) reads through its node's chunk cache, so N workers on a
    node read the checkpoint from storage once (executors/node_share.py); the driver's loads
    spread over the reader actors of every node."""
    executor = resolve_executor(backend, num_writers)
    from .executors.ray import RayExecutor
    if isinstance(executor, RayExecutor) and _in_ray_actor():
        from .executors.node_share import NodeSharedReader
        return NodeSharedReader()
    return executor


def _in_ray_actor() -> bool:
    try:
        import ray
        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - not in Ray
        return False


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


@dataclass
class SaveSession:
    """Who takes part in one save and how: this participant's index among ``count``, the
    coordinator that commits and the executor that writes."""

    coordinator: object
    executor: Executor
    participant: int = 0
    count: int = 1
    replicated: bool = False


def save_session(store: Store, final: str, *, backend: str | Executor = "auto", num_writers: int | None = None,
                 save_timeout: float | None = None, process_index: int | None = None,
                 process_count: int | None = None, world: bool = False,
                 join_timeout: float | None = None) -> SaveSession:
    """One participant's view of a save of checkpoint ``final`` in ``store``.

    One participant: the Ray coordinator and writer actors with Ray (``backend='ray'``, or
    Ray running), this process alone otherwise. Several: a Ray coordinator transaction
    (Ray running or ``backend='ray'``; each participant writes its own part with local
    threads), else the shared-storage protocol for ``jax.distributed`` process groups.
    ``world``: take the Ray Train world as the participants when not given (the manager).
    ``join_timeout``: with Ray, abort when not every participant has begun within it.
    """
    from .participants import participants
    index, count = participants(process_index, process_count, ray_train_world=world)
    use_ray = backend == "ray" or (backend == "auto" and ray_running())
    if isinstance(backend, Executor):   # an executor given: Ray's writers commit through Ray's coordinator
        from .executors.ray import RayExecutor
        use_ray = isinstance(backend, RayExecutor)
    if count == 1:
        executor = resolve_executor(backend, num_writers, save_timeout)
        if use_ray:
            from .coord.ray_actor import RayCoordinator
            return SaveSession(RayCoordinator(store, final, 1, save_timeout), executor)
        from .coord.local import LocalCoordinator
        return SaveSession(LocalCoordinator(store, final, save_timeout), executor)
    import jax
    replicated = jax.process_count() == 1   # independent processes holding the same state
    executor = ThreadExecutor(num_writers)   # each participant writes its own part from here
    if use_ray:
        from .coord.ray_actor import RayCoordinator
        if backend == "ray":
            from .executors.ray import ensure_ray
            ensure_ray()
        return SaveSession(RayCoordinator(store, final, count, save_timeout, join_timeout), executor, index, count,
                           replicated)
    if jax.process_count() != count:
        raise CheckpointError(f"process_count={count} without Ray needs jax.distributed with {count} processes "
                              f"(jax.process_count() is {jax.process_count()}); start Ray, pass backend='ray', "
                              "or pass process_count=1 to save from this process alone")
    from .coord.jax_shared import SharedStorageCoordinator
    return SaveSession(SharedStorageCoordinator(store, final, count, save_timeout), executor, index, count,
                       replicated)
