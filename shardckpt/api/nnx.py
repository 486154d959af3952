"""The guide's nnx functions: ``save_model`` / ``load_model`` / ``save_optimizer`` /
``load_optimizer``, built on the pytree core (``core.py``).

``save_model`` / ``save_optimizer`` write the items ``"model"`` / ``"optimizer"``, each as
its own atomic commit that carries the directory's other items over, so ``save_model(p, m)``
followed by ``save_optimizer(p, opt)`` yields one checkpoint holding both. Loads build their
targets abstractly (``nnx_state.py``): nothing is initialised only to be overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optax
from flax import nnx

from shardckpt.api.core import STATE_ITEM, restore_item, save_checkpoint, tree_files
from shardckpt.api.nnx_state import (
    FRESH_HINTS,
    cast_floats,
    check_model_classes,
    check_module,
    default_model_hint,
    model_config_of,
    model_factory,
    restore_module_state,
    restore_optimizer,
    state_of,
)
from shardckpt.api.session import SaveOptions, resolve_load_executor
from shardckpt.errors import CheckpointError
from shardckpt.loading.checkpoint import Checkpoint, read_consistently
from shardckpt.loading.open import open_checkpoint
from shardckpt.tree import summarize


def save_model(path: os.PathLike | str, model: nnx.Module, config: Any = None, *,
               compress: bool = False, num_shards: int | None = None, step: int | None = None,
               backend: str = "auto", num_writers: int | None = None,
               save_timeout: float | None = None, process_index: int | None = None,
               process_count: int | None = None, progress: bool | None = None) -> Path:
    """Save ``model``'s full nnx state (parameters, RNG streams, batch stats...) to ``path``
    as the item ``"model"`` (a plain pytree is accepted too).

    ``config`` defaults to ``model.config`` (via ``to_dict()``). Returns the path. One
    process saves by default; in a multi-process job where each process holds different
    shards, every process calls it with ``process_index``/``process_count``.
    """
    options = SaveOptions(backend, num_writers, save_timeout, None, num_shards, compress, progress,
                          process_index, process_count)
    state = state_of(model, "model")
    cfg = model_config_of(model, config)
    json_files = {"config.json": {"model_config": cfg, "step": step, "train_config": None}, **tree_files({"model": state})}
    return save_checkpoint(path, {"model": state}, options, step=step, keep_other_items=True, json_files=json_files)


def save_optimizer(path: os.PathLike | str, optimizer: nnx.Optimizer, *, compress: bool = False,
                   num_shards: int | None = None, backend: str = "auto",
                   num_writers: int | None = None, save_timeout: float | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   progress: bool | None = None) -> Path:
    """Save an ``nnx.Optimizer``'s state (step and every optax state leaf) into ``path``."""
    options = SaveOptions(backend, num_writers, save_timeout, None, num_shards, compress, progress,
                          process_index, process_count)
    return save_checkpoint(path, {"optimizer": state_of(optimizer, "optimizer")}, options, keep_other_items=True)


def model_item(ck: Checkpoint) -> str:
    """Where a checkpoint keeps the model: ``"model"``, or ``"state"`` for ``save(path, tree)``."""
    if "model" not in ck.items and STATE_ITEM in ck.items:
        return STATE_ITEM
    return "model"


def load_model_from(ck: Checkpoint, model: Any = None, model_cls: type | None = None,
                    config_cls: type | None = None, *, verify: bool = True, executor=None, progress=None,
                    shardings: Any = None, select: Callable[[str], bool] | None = None) -> Any:
    """The model of an open checkpoint: into ``model`` (a module, filled in place; or a
    pytree target, restored and returned), or built from the saved config."""
    item = model_item(ck)
    if model is None:
        factory = model_factory(ck.read_config().get("model_config"), model_cls, config_cls, ck.where)
        return restore_module_state(ck, item, factory, hint=default_model_hint(model_cls, config_cls), verify=verify,
                                    executor=executor, progress=progress, shardings=shardings, select=select)
    if isinstance(model, nnx.Module):
        return restore_module_state(ck, item, model, verify=verify, executor=executor, progress=progress,
                                    shardings=shardings, select=select)
    check_module(model, ck.where, allow_tree=True)
    return restore_item(ck, item, model, verify=verify, executor=executor, progress=progress,
                        shardings=shardings, select=select)


def load_model(path: os.PathLike | str, model: Any = None,
               model_cls: type | None = None, config_cls: type | None = None, dtype: Any = None,
               *, verify: bool = True, backend: str = "auto", num_writers: int | None = None,
               shardings: Any = None, select: Callable[[str], bool] | None = None,
               progress: bool | None = None) -> tuple[Any, dict | None]:
    """Load a model saved by ``save_model`` (or a guide-layout ``model.npz``).

    Without ``model``, builds ``model_cls`` (default ``LMModel``) from the saved config
    abstractly and fills it from the files. With a module ``model``, restores into it in
    place (its shardings are kept). With a pytree ``model`` (e.g. the dict given to
    ``save_model``, or its ``jax.eval_shape``), returns the restored pytree. ``shardings``
    (one Sharding, a dict by dotted key, or a pytree like the state) puts arrays on another
    layout. ``select(key)`` restores only some keys (into a given ``model``). ``dtype``
    casts floating-point parameters of a module after loading. Returns ``(model, config_dict)``.
    """
    check_model_classes(model_cls, config_cls, f"load_model({path!s})")
    executor = resolve_load_executor(backend, num_writers)

    def load_once():   # again if another process replaces the checkpoint meanwhile
        ck = open_checkpoint(path)
        loaded = load_model_from(ck, model, model_cls, config_cls, verify=verify, executor=executor,
                                 progress=progress, shardings=shardings, select=select)
        return loaded, ck.read_config().get("model_config")

    loaded, cfg = read_consistently(load_once)
    if dtype is not None and isinstance(loaded, nnx.Module):
        cast_floats(loaded, dtype)
    return loaded, cfg


def load_optimizer(path: os.PathLike | str, model: nnx.Module, tx: optax.GradientTransformation | None = None,
                   learning_rate: float = 1e-4, *, wrt: Any = nnx.Param, strict: bool = True,
                   allow_pickle: bool = False, verify: bool = True, backend: str = "auto",
                   num_writers: int | None = None, shardings: Any = None,
                   progress: bool | None = None) -> nnx.Optimizer:
    """Recreate ``nnx.Optimizer(model, tx, wrt=wrt)`` from ``path``: ``tx`` defaults to
    ``optax.adamw(learning_rate)`` (the original guide's default); ``wrt`` is the filter the
    optimizer was built with (``nnx.LoRAParam`` for LoRA). The saved state must be the new
    optimizer's, leaf for leaf: otherwise StructureMismatchError describes both and says
    what to pass. ``strict=False`` restores only what matches, with a warning (see
    ``restore_optimizer``)."""
    tx = tx if tx is not None else optax.adamw(learning_rate)
    where = f"load_optimizer({path!s})"
    check_module(model, where)
    if not isinstance(strict, bool):
        raise CheckpointError(f"{where}: strict= takes True or False, got {summarize(strict)}")
    executor = resolve_load_executor(backend, num_writers)
    optimizer, _ = read_consistently(lambda: restore_optimizer(   # again if replaced meanwhile
        open_checkpoint(path, allow_pickle=allow_pickle), model, tx, wrt=wrt, strict=strict, verify=verify,
        executor=executor, progress=progress, shardings=shardings, fresh_hint=FRESH_HINTS["function"]))
    return optimizer
