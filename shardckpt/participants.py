"""Who is saving: this process's index among the save's participants, and their count."""

from __future__ import annotations

from .errors import CheckpointError


def participants(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """(index, count) of this save participant: given, else the Ray Train worker's world
    rank and size, else ``jax.process_index()/process_count()``."""
    if process_index is not None or process_count is not None:
        if process_index is None or process_count is None or not 0 <= process_index < process_count:
            raise CheckpointError(f"process_index={process_index!r}, process_count={process_count!r}: "
                                  "give both, with 0 <= process_index < process_count")
        return int(process_index), int(process_count)
    rank = _ray_train_rank()
    if rank is not None:
        return rank
    import jax
    return jax.process_index(), jax.process_count()


def _ray_train_rank() -> tuple[int, int] | None:
    try:
        import ray
        if not ray.is_initialized():
            return None
        import ray.train
        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        return None
