"""How a save or a load runs: one ``SaveOptions`` value, and the Coordinator and Executor it
picks for this participant, whatever the Store.

Every public save function and the manager take the same execution options (``backend``,
``num_writers``, ``save_timeout``, ``join_timeout``, ``num_shards``, ``compress``,
``progress``, ``process_index``/``process_count``); they are checked once, when the value
is built (a typo fails at construction, not hours later at the first save), and travel as
one value below the public signatures.

Ray is imported only when a save or load uses it (importing it costs ~1 s, and the CLI's
``--help`` must not pay that): the imports of ``coord.ray_actor`` and ``executors.ray`` /
``executors.node_share`` below are function-level for that reason.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import jax

from shardckpt.catalog import Catalog
from shardckpt.coord.base import Coordinator
from shardckpt.coord.local import LocalCoordinator
from shardckpt.errors import CheckpointError
from shardckpt.executors.base import Executor, Reader
from shardckpt.executors.threads import ThreadExecutor
from shardckpt.saving.commit import commit
from shardckpt.store.base import Store
from shardckpt.tree import summarize

BACKENDS = ("auto", "threads", "ray")


def _shown(value: Any) -> str:
    """An option's value for an error message: a plain scalar as written, anything else by
    its type and shape (an array's values are never printed)."""
    return f"{value!r:.40}" if type(value) in (int, float, bool, str, type(None)) else summarize(value)


def _positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise CheckpointError(f"{name}={_shown(value)}: expected a positive integer"
                              + (" or None" if allow_none else "")) from None
    if n < 1:
        raise CheckpointError(f"{name}={n}: expected a positive integer" + (" or None" if allow_none else ""))
    return n


def _seconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{name}={_shown(value)}: expected a positive number of seconds or None")
    return float(value)


def _flag(value: Any, name: str, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise CheckpointError(f"{name}={_shown(value)}: expected True or False" + (" (or None)" if allow_none else ""))
    return value


@dataclass(frozen=True)
class SaveOptions:
    """How one save runs. ``backend``: "auto" (Ray when it runs, threads otherwise),
    "threads", "ray", or an Executor; ``num_writers``: files written at once (threads) or
    writer actors (Ray); ``save_timeout``: seconds before the save is aborted;
    ``join_timeout``: seconds for every participant to begin a multi-participant save;
    ``num_shards``: shard files per item; ``compress``: deflate the members; ``progress``:
    a progress bar (None: on a terminal, for large saves); ``process_index`` /
    ``process_count``: this participant of a multi-process save."""

    backend: Any = "auto"
    num_writers: int | None = None
    save_timeout: float | None = None
    join_timeout: float | None = None
    num_shards: int | None = None
    compress: bool = False
    progress: bool | None = None
    process_index: int | None = None
    process_count: int | None = None
    world: bool = field(default=False, repr=False)   # the manager: the Ray Train world is the group

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Executor) and self.backend not in BACKENDS:
            raise CheckpointError(f"backend={self.backend!r:.40} is not one of {', '.join(map(repr, BACKENDS))} "
                                  "(or an Executor)")
        object.__setattr__(self, "num_writers", _positive_int(self.num_writers, "num_writers"))
        object.__setattr__(self, "num_shards", _positive_int(self.num_shards, "num_shards"))
        object.__setattr__(self, "save_timeout", _seconds(self.save_timeout, "save_timeout"))
        object.__setattr__(self, "join_timeout", _seconds(self.join_timeout, "join_timeout"))
        _flag(self.compress, "compress")
        _flag(self.progress, "progress", allow_none=True)
        if self.process_index is not None or self.process_count is not None:
            participants(self.process_index, self.process_count)     # refuses what cannot be a participant

    def with_participant(self, process_index: int | None, process_count: int | None) -> SaveOptions:
        return replace(self, process_index=process_index, process_count=process_count)


def resolve_executor(backend: Any = "auto", num_writers: int | None = None,
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
    from shardckpt.executors.ray import RayExecutor  # Ray only when used (module doc)
    return RayExecutor.get(num_writers, save_timeout)


def resolve_load_executor(backend: Any = "auto", num_writers: int | None = None) -> Reader:
    """The executor a load runs on. With Ray, a load from inside a Ray actor (a Ray Train
    worker, a data-parallel rank) reads through its node's chunk cache, so N workers on a
    node read the checkpoint from storage once (executors/node_share.py); the driver's loads
    spread over the reader actors of every node."""
    executor = resolve_executor(backend, num_writers)
    if type(executor).__name__ == "RayExecutor" and in_ray_actor():
        from shardckpt.executors.node_share import NodeSharedReader  # Ray only when used (module doc)
        return NodeSharedReader()
    return executor


def _ray_if_imported():
    """The ``ray`` module when this process imported it, else None: Ray cannot be running
    in a process that never imported it (``ray.init`` and Ray's worker processes import
    it), and importing it only to ask costs ~0.5 s and ~35 MB of resident memory on the
    first save of a process that does not use Ray (#21: most of the fixed ~70 MB a save
    cost on the small states)."""
    return sys.modules.get("ray")


def in_ray_actor() -> bool:
    ray = _ray_if_imported()
    try:
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - not in Ray
        return False


def ray_running() -> bool:
    ray = _ray_if_imported()
    try:
        return ray is not None and bool(ray.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported or foreign module named ray
        return False


@dataclass
class SaveSession:
    """Who takes part in one save and how: this participant's index among ``count``, the
    coordinator that commits and the executor that writes."""

    coordinator: Coordinator
    executor: Executor
    participant: int = 0
    count: int = 1
    replicated: bool = False


def save_session(store: Store, final: str, options: SaveOptions) -> SaveSession:
    """One participant's view of a save of checkpoint ``final`` in ``store``.

    One participant: the Ray coordinator and writer actors with Ray (``backend='ray'``, or
    Ray running), this process alone otherwise. Several: a Ray coordinator transaction
    (Ray running or ``backend='ray'``; each participant writes its own part with local
    threads), else the shared-storage protocol for ``jax.distributed`` process groups.
    ``options.world``: take the Ray Train world as the participants when not given (the
    manager). ``join_timeout``: with Ray, abort when not every participant has begun within it.
    """
    backend, timeout = options.backend, options.save_timeout
    index, count = participants(options.process_index, options.process_count, ray_train_world=options.world)
    use_ray = backend == "ray" or (backend == "auto" and ray_running())
    if isinstance(backend, Executor):   # an executor given: Ray's writers commit through Ray's coordinator
        use_ray = type(backend).__name__ == "RayExecutor"
    if count == 1:
        executor = resolve_executor(backend, options.num_writers, timeout)
        if use_ray:
            from shardckpt.coord.ray_actor import RayCoordinator  # Ray only when used (module doc)
            return SaveSession(RayCoordinator(store, final, commit, 1, timeout,
                                              cleanup=Catalog(store).cleanup_leftovers), executor)
        return SaveSession(LocalCoordinator(store, final, commit, timeout), executor)
    replicated = jax.process_count() == 1   # independent processes holding the same state
    executor = ThreadExecutor(options.num_writers)   # each participant writes its own part from here
    if use_ray:
        from shardckpt.coord.ray_actor import RayCoordinator  # Ray only when used (module doc)
        if backend == "ray":
            from shardckpt.executors.ray import ensure_ray
            ensure_ray()
        return SaveSession(RayCoordinator(store, final, commit, count, timeout, options.join_timeout,
                                          cleanup=Catalog(store).cleanup_leftovers),
                           executor, index, count, replicated)
    if jax.process_count() != count:
        raise CheckpointError(f"process_count={count} without Ray needs jax.distributed with {count} processes "
                              f"(jax.process_count() is {jax.process_count()}); start Ray, pass backend='ray', "
                              "or pass process_count=1 to save from this process alone")
    from shardckpt.coord.jax_shared import SharedStorageCoordinator
    return SaveSession(SharedStorageCoordinator(store, final, commit, count, timeout), executor, index, count,
                       replicated)


def participants(process_index: int | None = None, process_count: int | None = None, *,
                 ray_train_world: bool = False) -> tuple[int, int]:
    """(index, count) of this save participant: given; else ``jax.process_index()/
    process_count()`` in a multi-process JAX job (each process holds different shards);
    else, with ``ray_train_world`` (the manager, ``RayTrainCheckpointer``), the Ray Train
    worker's world rank and size; else (0, 1): the plain functions save from one process,
    as Ray's own docs do (rank 0 saves, then reports the directory)."""
    if process_index is not None or process_count is not None:
        if process_index is None and process_count == 1:
            return 0, 1
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (process_index, process_count))
        if not ok or not 0 <= process_index < process_count:
            raise CheckpointError(f"process_index={process_index!r}, process_count={process_count!r}: "
                                  "give both, integers with 0 <= process_index < process_count")
        return int(process_index), int(process_count)
    if jax.process_count() > 1:
        return jax.process_index(), jax.process_count()
    rank = ray_train_rank() if ray_train_world else None
    return rank if rank is not None else (0, 1)


def ray_train_rank() -> tuple[int, int] | None:
    """(world rank, world size) inside a Ray Train worker, else None."""
    if not ray_running():
        return None
    try:
        import ray.train  # only inside a running Ray (module doc)
        ctx = ray.train.get_context()
        rank, size = ctx.get_world_rank(), ctx.get_world_size()
        return (int(rank), int(size)) if isinstance(size, int) and size >= 1 else None
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        return None
