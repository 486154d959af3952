"""Who is saving: this process's index among the save's participants, and their count."""

from __future__ import annotations

from .errors import CheckpointError


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
        if process_index is None or process_count is None or not 0 <= process_index < process_count:
            raise CheckpointError(f"process_index={process_index!r}, process_count={process_count!r}: "
                                  "give both, with 0 <= process_index < process_count")
        return int(process_index), int(process_count)
    import jax
    if jax.process_count() > 1:
        return jax.process_index(), jax.process_count()
    rank = _ray_train_rank() if ray_train_world else None
    return rank if rank is not None else (0, 1)


def _ray_train_rank() -> tuple[int, int] | None:
    try:
        import ray
        if not ray.is_initialized():
            return None
        import ray.train
        ctx = ray.train.get_context()
        rank, size = ctx.get_world_rank(), ctx.get_world_size()
        return (int(rank), int(size)) if isinstance(size, int) and size >= 1 else None
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        return None
