"""Ray Train integration: shardckpt checkpoints saved by every rank, registered with
``ray.train.report``, restored from ``ray.train.get_checkpoint()``.

Inside ``train_loop_per_worker`` of a Ray Train V2 trainer (``JaxTrainer`` or
``DataParallelTrainer``)::

    ckpt = RayTrainCheckpointer()                 # storage = the run's experiment dir
    state = ckpt.restore(tx=optax.adamw(1e-3))    # None on a fresh start
    ...
    ckpt.save(step, model, optimizer, metrics={"loss": loss})
    ...
    ckpt.finish()

Every rank calls ``save``: each writes only its share into the run's storage (shared
filesystem), the coordinator commits one manifest, and the checkpoint is reported with
``CheckpointUploadMode.NO_UPLOAD`` — it is already where Ray Train keeps checkpoints, so no
rank uploads or copies anything and ``CheckpointConfig(num_to_keep,
checkpoint_score_attribute)`` manages it like any other. With ``async_save=True`` the save
runs in the background and is reported at the next ``save`` or at ``finish`` (reports stay
one per call on every rank, as Ray Train requires).

The one Ray Train internal we touch — the run's storage context — is read in
``_run_storage`` only. ``ray.train`` is imported only inside the functions here: it needs
``pip install 'shardckpt[train]'`` (``ray[train]``), core Ray does not.

Ray Train's own pattern — rank 0 saves into a local directory and reports it with
``ray.train.report(checkpoint=Checkpoint.from_directory(...))`` — works with the plain
functions (``save``, ``save_model``, ``save_optimizer``), which save from one process by
default; see ``docs/ray_train.md``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import optax
from flax import nnx

from shardckpt.api.manager import DEFAULT_JOIN_TIMEOUT, CheckpointManager, CheckpointState
from shardckpt.api.tiers import MemoryTier
from shardckpt.errors import CheckpointError
from shardckpt.store.registry import open_store

PREFIX = "step"


def ray_train():
    """``ray.train``, or a CheckpointError naming the extra that installs it."""
    try:
        import ray.train
    except ImportError as e:
        raise CheckpointError("shardckpt.ray_train needs Ray Train: pip install 'shardckpt[train]' "
                              f"(ray[train]); importing ray.train failed: {e}") from e
    return ray.train


def _run_storage() -> tuple[str, Any]:
    """(experiment directory, pyarrow filesystem) of the current Ray Train run."""
    storage = ray_train().get_context().get_storage()
    return storage.experiment_fs_path, storage.storage_filesystem


class RayTrainCheckpointer:
    """Save/restore shardckpt checkpoints from every worker of a Ray Train run.

    ``directory``: None for the run's own storage (``RunConfig(storage_path=)``: a filesystem
    every worker mounts, or S3 / another pyarrow filesystem, where every rank uploads its own
    shards straight from memory and Ray registers the committed checkpoint), or any path or
    URI (``s3://bucket/run?endpoint_url=...``; an object-store directory Ray does not see is
    reported as metrics only, and ``max_to_keep`` keeps it in bounds).

    Every rank must call ``save`` for the same steps: a save that some rank has not begun
    within ``join_timeout`` seconds (default 20) is aborted on the ranks that did, with an
    error naming the missing ranks (``None``: wait up to ``save_timeout``). To save from
    rank 0 alone, use the plain functions and ``ray.train.report`` (docs/ray_train.md).

    ``memory=MemoryTier(...)`` (with ``persist_every``): every rank saves into the cluster's
    memory (``api/tiers.py``) and rank 0 copies every ``persist_every``-th step to the
    directory in the background; after Ray Train restarts a failed worker group, ``restore``
    takes the newest step from memory. Steps only in memory are reported as metrics (Ray
    Train cannot see them); the directory's retention is ``max_to_keep``'s.
    """

    def __init__(self, directory: os.PathLike | str | None = None, *, async_save: bool = False,
                 num_shards: int | None = None, save_timeout: float | None = None, verify: bool = True,
                 join_timeout: float | None = DEFAULT_JOIN_TIMEOUT, max_to_keep: int | None = None,
                 memory: MemoryTier | None = None, persist_every: int | None = None):
        ctx = ray_train().get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._filesystem = self._fs_root = None       # the run's storage, where Ray sees the checkpoints
        if directory is None:
            path, fs = _run_storage()
            self._filesystem, self._fs_root = fs, path
            store = open_store(path, filesystem=fs)   # S3: every rank uploads its own shards
        else:
            store = open_store(directory)
        self.directory = store.location("")           # a Path on a filesystem, a URI on an object store
        # Ray Train's CheckpointConfig does retention where Ray sees the checkpoints; for an
        # object-store directory of the user's choosing, ``max_to_keep`` does.
        self.manager = CheckpointManager(store, max_to_keep=max_to_keep, prefix=PREFIX, backend="ray",
                                         num_shards=num_shards, save_timeout=save_timeout, verify=verify,
                                         join_timeout=join_timeout, memory=memory, persist_every=persist_every)
        self.async_save = async_save
        self._unreported: tuple[Path, dict] | None = None

    # --- restore -------------------------------------------------------------------------
    def latest_path(self) -> Path | None:
        """The checkpoint to resume from: the newer of the one Ray Train hands this attempt
        (``ray.train.get_checkpoint()``) and the newest one committed in the run's directory.
        Ray Train registers reports asynchronously, so after a crash it can hand out an
        older checkpoint than the last one committed (or none); the directory is the truth."""
        checkpoint = ray_train().get_checkpoint()
        candidates = []
        if checkpoint is not None:
            name = str(checkpoint.path).rstrip("/").rsplit("/", 1)[-1]
            m = re.fullmatch(rf"{PREFIX}_(\d+)", name)
            if m:
                candidates.append((int(m.group(1)), self.manager.step_path(int(m.group(1)))))
            elif isinstance(self.directory, Path):     # the run's storage is a local directory
                candidates.append((-1, Path(checkpoint.path)))
        latest = self.manager.latest_step
        if latest is not None:
            candidates.append((latest, self.manager.step_path(latest)))
        return max(candidates, key=lambda c: c[0])[1] if candidates else None

    def restore(self, model: nnx.Module | None = None, *, tx: optax.GradientTransformation | None = None,
                model_cls: type | None = None, config_cls: type | None = None,
                shardings: Any = None, optimizer_shardings: Any = None, wrt: Any = nnx.Param,
                items: dict[str, Any] | None = None, should_load_optimizer: bool = True,
                strict: bool = True, optimizer: nnx.Optimizer | None = None,
                fresh_optimizer: bool = False) -> CheckpointState | None:
        """Load the run's latest reported checkpoint, or None on a fresh start. Each rank
        reads only what its target needs (its devices' slices of sharded arrays). ``wrt``:
        the filter the optimizer was built with (``nnx.LoRAParam`` for LoRA); ``items``:
        targets for extra items; ``optimizer`` (an optimizer to fill), ``strict`` and
        ``fresh_optimizer``: see ``CheckpointManager.load``."""
        if self.manager.tiers:       # the newest step either tier can give whole (memory first)
            return self.manager.load_latest(model=model, model_cls=model_cls, config_cls=config_cls, tx=tx,
                                            shardings=shardings, optimizer_shardings=optimizer_shardings, wrt=wrt,
                                            items=items, should_load_optimizer=should_load_optimizer,
                                            strict=strict, optimizer=optimizer, fresh_optimizer=fresh_optimizer)
        path = self.latest_path()
        if path is None:
            return None
        return self.manager.load(path, model=model, model_cls=model_cls, config_cls=config_cls, tx=tx,
                                 shardings=shardings, optimizer_shardings=optimizer_shardings, wrt=wrt,
                                 items=items, should_load_optimizer=should_load_optimizer, strict=strict,
                                 optimizer=optimizer, fresh_optimizer=fresh_optimizer)

    # --- save ----------------------------------------------------------------------------
    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
             metrics: dict | None = None, config: Any = None, train_config: dict | None = None,
             extra: dict | None = None, items: dict[str, Any] | None = None) -> None:
        """Save ``step`` on this rank (all ranks call it) and report to Ray Train.
        ``items`` saves more pytrees (EMA, data-loader state) in the same checkpoint."""
        train = ray_train()
        metrics = dict(metrics or {})
        metrics.setdefault("step", step)
        previous = self._finish_pending()
        path = self.manager.save(step, model, optimizer, config=config, train_config=train_config,
                                 metrics=metrics, extra=extra, items=items, process_index=self.rank,
                                 process_count=self.world_size, blocking=not self.async_save)
        if self.async_save:
            self._unreported = (path, metrics)
            if previous is not None:
                self._report(*previous)
            else:
                train.report(_plain(metrics))
        else:
            self._report(path, metrics)

    def finish(self) -> None:
        """Wait for a background save and report it (call once after the loop); with a
        memory tier, rank 0 also copies the newest step to the directory and waits."""
        pending = self._finish_pending()
        if pending is not None:
            self._report(*pending)
        if self.manager.tiers and self.rank == 0:
            self.manager.close()

    def _finish_pending(self) -> tuple[Path, dict] | None:
        self.manager.wait_until_finished()
        pending, self._unreported = self._unreported, None
        return pending

    def _report(self, path: Any, metrics: dict) -> None:
        """Register the committed checkpoint with Ray Train where Ray can see it (the run's
        storage, or a local directory); a checkpoint in an object-store directory of the
        user's choosing is reported as metrics only (resume and retention then go by the
        directory: ``latest_path``, ``max_to_keep``)."""
        train = ray_train()
        from ray.train import Checkpoint, CheckpointUploadMode
        name = str(path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        checkpoint, visible = None, True
        if self.manager.tiers and str(path).startswith(self.manager.tiers.store.uri):
            visible = False                  # in the memory tier: Ray Train cannot see it
        elif self._filesystem is not None:
            if self.rank == 0:
                checkpoint = Checkpoint(path=f"{self._fs_root}/{name}", filesystem=self._filesystem)
        elif isinstance(path, Path):
            if self.rank == 0:
                checkpoint = Checkpoint.from_directory(str(path))
        else:
            visible = False
        if not visible:
            train.report(_plain(metrics))
            return
        train.report(_plain(metrics), checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _plain(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v) if not isinstance(v, (str, bool, int)) else v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out
