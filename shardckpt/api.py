"""The public functions: the pytree core (``save`` / ``restore``) and the guide's nnx
convenience functions built on it (``save_model`` / ``load_model`` / ``save_optimizer`` /
``load_optimizer``).

``save(path, tree)`` writes any pytree (nested dicts/lists/tuples of jax or NumPy arrays and
Python scalars, an ``nnx.State``, a module's ``nnx.state``) as the item ``"state"`` of one
atomic checkpoint; ``items={"ema": ...}`` adds more items to the same commit.
``restore(path)`` gives it back as host arrays in a nested dict, ``restore(path, target)``
into the structure, dtypes and shardings of an abstract or concrete target.

``save_model`` / ``save_optimizer`` write the items ``"model"`` / ``"optimizer"``, each as
its own atomic commit that carries the directory's other items over, so ``save_model(p, m)``
followed by ``save_optimizer(p, opt)`` yields one checkpoint holding both.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

from .backends import resolve_load_executor
from .checkpoint import Checkpoint, open_checkpoint, read_consistently, save_checkpoint
from .errors import CheckpointError, StructureMismatchError
from .nnx_adapter import (  # noqa: F401
    build_config,
    cast_floats,
    check_module,
    config_to_dict,
    model_config_of,
    model_factory,
    restore_module_state,
    restore_optimizer,
    state_of,
)
from .tree import FlatTree, decode_scalar

#: The item ``save(path, tree)`` writes and ``restore(path)`` reads.
STATE_ITEM = "state"
_ITEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")

_build_config = build_config   # older name, kept for callers outside the package


def check_item_name(name: Any, where: str = "items") -> str:
    """Item names become shard file names (``{item}-00000-of-00002.npz``)."""
    if not isinstance(name, str) or not _ITEM_NAME.fullmatch(name) or len(name) > 100:
        raise CheckpointError(f"{where}: item name {name!r:.60} is not allowed: use letters, digits, "
                              "'_' and '-' (starting with a letter or digit)")
    return name


def _save_items(path, items: dict[str, Any], *, step=None, json_files=None, metrics=None,
                keep_other_items=False, compress=False, num_shards=None, backend="auto", num_writers=None,
                save_timeout=None, join_timeout=None, process_index=None, process_count=None, progress=None):
    return save_checkpoint(path, items, step=step, json_files=json_files, metrics=metrics,
                           num_shards=num_shards, compress=compress, progress=progress,
                           keep_other_items=keep_other_items, backend=backend, num_writers=num_writers,
                           save_timeout=save_timeout, join_timeout=join_timeout,
                           process_index=process_index, process_count=process_count)


# --- the pytree core ---------------------------------------------------------------------------

def save(path: os.PathLike | str, tree: Any = None, *, items: dict[str, Any] | None = None,
         step: int | None = None, metrics: dict | None = None, compress: bool = False,
         num_shards: int | None = None, backend: str = "auto", num_writers: int | None = None,
         save_timeout: float | None = None, join_timeout: float | None = None,
         process_index: int | None = None, process_count: int | None = None,
         progress: bool | None = None) -> Any:
    """Save a pytree as one atomic checkpoint at ``path`` (a directory, or a URI such as
    ``s3://bucket/run/ckpt``); returns the path.

    ``tree`` is written as the item ``"state"``; ``items`` (name -> pytree) adds more items
    to the same commit, e.g. ``save(path, params, items={"ema": ema, "data": loader_state})``.
    Leaves are ``jax.Array`` (sharded or not), NumPy arrays and Python scalars (kept with
    their type); real dtypes (bfloat16, PRNG keys...) come back bit for bit. An ``nnx.Module``
    or ``nnx.Optimizer`` is saved as its ``nnx.state``. A checkpoint already at ``path`` is
    replaced as a whole, atomically. ``metrics`` (JSON) are recorded in the manifest.

    One process saves, by default, whatever else runs (Ray Train workers included). In a
    multi-process job where every process holds part of the state, pass ``process_index`` /
    ``process_count`` (jax.distributed jobs are detected) and call ``save`` on every process.
    """
    all_items: dict[str, Any] = {}
    if tree is not None:
        all_items[STATE_ITEM] = state_of(tree, "tree")
    for name, value in (items or {}).items():
        check_item_name(name)
        if name in all_items:
            raise CheckpointError(f"items={{{name!r}: ...}}: {name!r} is the item save(path, tree) writes the "
                                  "tree to; give the tree either way, not both")
        if value is None:
            raise CheckpointError(f"items[{name!r}] is None: nothing to save")
        all_items[name] = state_of(value, f"items[{name!r}]")
    if not all_items:
        raise CheckpointError(f"{path}: nothing to save: pass a tree (save(path, tree)) or items={{...}}")
    json_files = {"metrics.json": metrics} if metrics is not None else None
    return _save_items(path, all_items, step=step, json_files=json_files, metrics=metrics, compress=compress,
                       num_shards=num_shards, backend=backend, num_writers=num_writers,
                       save_timeout=save_timeout, join_timeout=join_timeout, process_index=process_index,
                       process_count=process_count, progress=progress)


def pick_item(ck: Checkpoint, item: str | None) -> str:
    """``item``, or by default ``"state"``, or else the checkpoint's only item."""
    if item is not None:
        ck.item_record(item)   # StructureMismatchError naming the items it has
        return item
    names = ck.items
    if STATE_ITEM in names:
        return STATE_ITEM
    if len(names) == 1:
        return names[0]
    raise StructureMismatchError(f"{ck.where}: the checkpoint has the items {', '.join(names) or 'none'} and "
                                 f"no {STATE_ITEM!r}: pass item= (one of them)")


def host_tree(ck: Checkpoint, item: str, *, verify: bool = True, executor=None,
              select: Callable[[str], bool] | None = None) -> dict:
    """Item ``item`` as a nested dict built from the saved key paths (``"layers.0.kernel"``
    -> ``{"layers": {"0": {"kernel": ...}}}``): host NumPy arrays in their real dtypes (PRNG
    keys as typed key arrays), scalar leaves as the Python values saved."""
    rec = ck.item_record(item)
    keys = [k for k in rec.arrays if select is None or select(k)]
    values = dict(ck.read_arrays(item, keys, verify=verify, executor=executor)) if keys else {}
    for key, raw in rec.scalars.items():
        if select is None or select(key):
            values[key] = decode_scalar(key, raw)
    return nest(values, ck.where)


def nest(flat: dict[str, Any], where: str = "") -> dict:
    out: dict = {}
    for key in sorted(flat):
        node, parts = out, key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StructureMismatchError(f"{where}: keys {'.'.join(parts[:i + 1])!r} and {key!r} do not nest "
                                             "into one dict; restore with a target instead")
        if parts[-1] in node:
            raise StructureMismatchError(f"{where}: keys {key!r} and {key}.* do not nest into one dict; "
                                         "restore with a target instead")
        node[parts[-1]] = flat[key]
    return out


def restore_item(ck: Checkpoint, item: str, target: Any = None, *, strict: bool = True, verify: bool = True,
                 executor=None, progress=None, shardings: Any = None,
                 select: Callable[[str], bool] | None = None) -> Any:
    """One item of an open checkpoint: host arrays without a target, else into ``target``
    (a pytree of ``jax.ShapeDtypeStruct`` or of arrays; an nnx.Module is filled in place)."""
    if target is None:
        if shardings is not None:
            raise CheckpointError(f"{ck.where}: shardings= places arrays of a target: pass target= (e.g. a "
                                  "pytree of jax.ShapeDtypeStruct), or restore host arrays without shardings=")
        return host_tree(ck, item, verify=verify, executor=executor, select=select)
    if isinstance(target, nnx.Module):
        return restore_module_state(ck, item, target, verify=verify, executor=executor, progress=progress,
                                    shardings=shardings, select=select)
    check_target(target, ck.where)
    restored, report = ck.restore(item, target, strict=strict, verify=verify, executor=executor,
                                  progress=progress, shardings=shardings, select=select)
    if not report.complete:
        empty = [k for k, v in FlatTree.of(restored).values().items() if isinstance(v, jax.ShapeDtypeStruct)]
        if empty:
            raise StructureMismatchError(f"{ck.where}: item {item!r}: the checkpoint has no data for the abstract "
                                         f"target leaves {', '.join(empty[:12])}: {report.describe()}")
        warnings.warn(f"{ck.where}: item {item!r} restored where it matches the target; the other leaves keep "
                      f"the target's values: {report.describe()}", stacklevel=3)
    return restored


def check_target(target: Any, where: str) -> None:
    if isinstance(target, (type, str, bytes)) or callable(target):
        raise CheckpointError(f"{where}: target={target!r:.60} is a {type(target).__name__}: pass a pytree "
                              "shaped like the saved one (leaves jax.ShapeDtypeStruct or arrays), an "
                              "nnx.Module to fill, or no target for host arrays")


def restore(path: os.PathLike | str, target: Any = None, *, item: str | None = None, strict: bool = True,
            shardings: Any = None, select: Callable[[str], bool] | None = None, verify: bool = True,
            backend: str = "auto", num_writers: int | None = None, progress: bool | None = None) -> Any:
    """Load one item of the checkpoint at ``path``.

    ``target=None``: a nested dict built from the saved key paths, of host NumPy arrays in
    their real dtypes (bfloat16 stays bfloat16) and the scalar leaves saved. A target
    (``jax.eval_shape(init, ...)``: a pytree of ``jax.ShapeDtypeStruct``, or of arrays) gives
    the same tree type back with jax arrays on the target's shardings, or on ``shardings=``
    (a Sharding, a dict by dotted key, or a pytree like the target); each device reads only
    the chunks its slice overlaps. ``strict`` (default): every key must match, shapes too;
    ``strict=False`` fills what matches, warns, and leaves the rest as the target has it.
    ``select(key)`` restores only some keys. An ``nnx.Module`` target is filled in place.

    ``item``: default ``"state"`` (what ``save(path, tree)`` writes), or the checkpoint's
    only item; ``item="model"`` reads what ``save_model`` wrote, ``item="ema"`` an extra item.
    """
    executor = resolve_load_executor(backend, num_writers)

    def load_once():   # again if another process replaces the checkpoint meanwhile
        ck = open_checkpoint(path)
        return restore_item(ck, pick_item(ck, item), target, strict=strict, verify=verify, executor=executor,
                            progress=progress, shardings=shardings, select=select)
    return read_consistently(load_once)


# --- nnx: modules and optimizers ---------------------------------------------------------------

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
    state = state_of(model, "model")
    cfg = model_config_of(model, config)
    return _save_items(path, {"model": state}, step=step,
                       json_files={"config.json": {"model_config": cfg, "step": step, "train_config": None}},
                       num_shards=num_shards, compress=compress, progress=progress, keep_other_items=True,
                       backend=backend, num_writers=num_writers, save_timeout=save_timeout,
                       process_index=process_index, process_count=process_count)


def save_optimizer(path: os.PathLike | str, optimizer: nnx.Optimizer, *, compress: bool = False,
                   num_shards: int | None = None, backend: str = "auto",
                   num_writers: int | None = None, save_timeout: float | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   progress: bool | None = None) -> Path:
    """Save an ``nnx.Optimizer``'s state (step and every optax state leaf) into ``path``."""
    return _save_items(path, {"optimizer": state_of(optimizer, "optimizer")}, num_shards=num_shards,
                       compress=compress, progress=progress, keep_other_items=True,
                       backend=backend, num_writers=num_writers, save_timeout=save_timeout,
                       process_index=process_index, process_count=process_count)


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
        return restore_module_state(ck, item, factory, verify=verify, executor=executor, progress=progress,
                                    shardings=shardings, select=select)
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
                   learning_rate: float = 1e-4, *, wrt: Any = nnx.Param, strict: bool = False,
                   allow_pickle: bool = False, verify: bool = True, backend: str = "auto",
                   num_writers: int | None = None, shardings: Any = None,
                   progress: bool | None = None) -> nnx.Optimizer:
    """Recreate ``nnx.Optimizer(model, tx, wrt=wrt)`` from ``path``: ``tx`` defaults to
    ``optax.adamw(learning_rate)``; ``wrt`` is the filter the optimizer was built with
    (``nnx.LoRAParam`` for LoRA). See ``restore_optimizer`` for how a different ``tx`` is
    handled."""
    tx = tx if tx is not None else optax.adamw(learning_rate)
    check_module(model, f"load_optimizer({path!s})")
    executor = resolve_load_executor(backend, num_writers)
    optimizer, _ = read_consistently(lambda: restore_optimizer(   # again if replaced meanwhile
        open_checkpoint(path, allow_pickle=allow_pickle), model, tx, wrt=wrt, strict=strict, verify=verify,
        executor=executor, progress=progress, shardings=shardings))
    return optimizer
