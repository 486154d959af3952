"""The pytree core: ``save(path, tree)`` / ``restore(path, target)``, and ``save_checkpoint``,
the one function every save of the API goes through.

``save(path, tree)`` writes any pytree (nested dicts/lists/tuples of jax or NumPy arrays and
Python scalars, an ``nnx.State``, a module's ``nnx.state``) as the item ``"state"`` of one
atomic checkpoint; ``items={"ema": ...}`` adds more items to the same commit.
``restore(path)`` gives it back as host arrays in a nested dict, ``restore(path, target)``
into the structure, dtypes and shardings of an abstract or concrete target. The nnx
functions (``nnx.py``) and the manager are built on these.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from shardckpt.api.nnx_state import restore_module_state, state_of
from shardckpt.api.session import SaveOptions, resolve_load_executor, save_session
from shardckpt.errors import CheckpointError, CheckpointNotFoundError, StructureMismatchError
from shardckpt.format.names import check_name
from shardckpt.format.parts import CommitArgs
from shardckpt.loading.checkpoint import Checkpoint, read_consistently
from shardckpt.loading.open import open_checkpoint
from shardckpt.saving.commit import committed_version
from shardckpt.saving.metrics import check_metrics
from shardckpt.saving.pipeline import SaveReport, prepare_items, run_save
from shardckpt.store.registry import resolve
from shardckpt.tree import (
    FlatTree,
    apply_container_record,
    bounded,
    check_key_depth,
    container_record,
    decode_scalar,
    record_matches,
    summarize,
)

#: The item ``save(path, tree)`` writes and ``restore(path)`` reads.
STATE_ITEM = "state"

#: The metadata file recording a plain pytree item's containers (see ``tree_files``).
TREE_FILE = "tree-{}.json"


def tree_files(items: dict[str, Any]) -> dict[str, dict]:
    """``tree-<item>.json`` for each plain pytree item (not an ``nnx.State``): which nodes
    are lists and tuples, where None leaves and empty containers sit. ``restore(path)``
    without a target gives the saved structure back from it. The record names the item's
    keys by digest, so a record left by an earlier version of the item is not used."""
    out = {}
    for name, tree in items.items():
        if isinstance(tree, nnx.State):
            continue
        record = container_record(tree, FlatTree.of(tree).leaves)
        if record is not None:
            out[TREE_FILE.format(name)] = record
    return out


def saved_tree_record(ck: Checkpoint, item: str) -> dict | None:
    """The container record of ``item`` written with it, or None (an nnx state, a
    checkpoint written before records existed, or a record of an earlier version)."""
    name = TREE_FILE.format(item)
    if ck.legacy or ck.meta_name(name) is None:
        return None
    record = ck.read_json(name)
    rec = ck.item_record(item)
    return record if record_matches(record, [*rec.arrays, *rec.scalars]) else None


def check_item_name(name: Any, where: str = "items") -> str:
    """Item names become shard file names (``{item}-00000-of-00002.npz``)."""
    return check_name(name, f"{where}: item name")


def save_checkpoint(path: Any, items: dict[str, Any], options: SaveOptions | None = None, *,
                    step: int | None = None, json_files: dict[str, Any] | None = None,
                    metrics: dict | None = None, keep_other_items: bool = False,
                    prepared: tuple | None = None, filesystem: Any = None, base: Any = None,
                    missing_base_ok: bool = False, on_report: Callable[[SaveReport], None] | None = None) -> Any:
    """Write ``items`` (name -> pytree) as a committed checkpoint at ``path`` (a local
    path or a URI such as ``s3://bucket/run/step_7``); returns its location.

    The checkpoint appears atomically, complete or not at all. An existing checkpoint there
    is replaced only once the new one is durable; with ``keep_other_items`` its items and
    metadata files that this save does not rewrite are carried over (hard links or the same
    objects, no data copied), which is how ``save_model`` + ``save_optimizer`` build one
    checkpoint. ``prepared`` is ``prepare_items(items)`` taken earlier (async saves).
    With ``base`` (a checkpoint in the same directory) the arrays it holds unchanged are
    carried instead of written (``saving/incremental.py``); a base that is not there is an
    error unless ``missing_base_ok`` (the manager's latest step may be retired meanwhile). ``on_report`` receives the ``SaveReport``.
    """
    options = options or SaveOptions()
    check_metrics(metrics)          # before anything is written: a bad metric fails no commit
    store, name = resolve(path, filesystem)
    base_name = base_in(store, base, filesystem) if base is not None else None
    if base_name is not None and not missing_base_ok and committed_version(store, base_name) is None:
        raise CheckpointNotFoundError(f"base={base!s}: no committed checkpoint at {store.where(base_name)} to save "
                                      "incrementally against")
    session = save_session(store, name, options)
    prepared = prepared if prepared is not None else prepare_items(items)
    report = run_save(store, name, prepared, coordinator=session.coordinator, executor=session.executor,
                      participant=session.participant, participants=session.count,
                      replicated=session.replicated, num_shards=options.num_shards, compress=options.compress,
                      progress=options.progress,
                      commit_args=CommitArgs(step, json_files, metrics, keep_other_items),
                      base=base_name)
    if on_report is not None:
        on_report(report)
    return report.location


def base_in(store, base: Any, filesystem: Any = None) -> str:
    """The name of checkpoint ``base`` in ``store``: an incremental save carries files from a
    checkpoint beside the one it writes (the same directory, the same store)."""
    if isinstance(base, str) and "/" not in base and "://" not in base and not base.startswith("."):
        return base                           # a bare name: a checkpoint of the same directory
    base_store, base_name = resolve(base, filesystem)
    if base_store.uri != store.uri:
        raise CheckpointError(f"base={base!s}: an incremental save carries files from a checkpoint in the same "
                              f"directory ({store.where()}), not {base_store.where()}")
    return base_name


def save(path: os.PathLike | str, tree: Any = None, *, items: dict[str, Any] | None = None,
         step: int | None = None, metrics: dict | None = None, compress: bool = False,
         num_shards: int | None = None, backend: str = "auto", num_writers: int | None = None,
         save_timeout: float | None = None, join_timeout: float | None = None,
         process_index: int | None = None, process_count: int | None = None,
         progress: bool | None = None, base: Any = None) -> Any:
    """Save a pytree as one atomic checkpoint at ``path`` (a directory, or a URI such as
    ``s3://bucket/run/ckpt``); returns the path.

    ``tree`` is written as the item ``"state"``; ``items`` (name -> pytree) adds more items
    to the same commit, e.g. ``save(path, params, items={"ema": ema, "data": loader_state})``.
    Leaves are ``jax.Array`` (sharded or not), NumPy arrays and Python scalars (kept with
    their type); real dtypes (bfloat16, PRNG keys...) come back bit for bit. An ``nnx.Module``
    or ``nnx.Optimizer`` is saved as its ``nnx.state``. A checkpoint already at ``path`` is
    replaced as a whole, atomically (the user's own files in it are kept). ``metrics`` (JSON) are recorded in the manifest.

    ``base``: a checkpoint in the same directory (its path, or just its name) to save
    incrementally against: arrays it holds unchanged are carried (hard links, server-side
    copies) instead of written; the new checkpoint is whole on its own (deleting ``base``
    later breaks nothing).

    One process saves, by default, whatever else runs (Ray Train workers included). In a
    multi-process job where every process holds part of the state, pass ``process_index`` /
    ``process_count`` (jax.distributed jobs are detected) and call ``save`` on every process.
    """
    options = SaveOptions(backend, num_writers, save_timeout, join_timeout, num_shards, compress, progress,
                          process_index, process_count)
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
    json_files = {"metrics.json": metrics} if metrics is not None else {}
    json_files.update(tree_files(all_items))
    return save_checkpoint(path, all_items, options, step=step, json_files=json_files or None, metrics=metrics,
                           base=base)


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
              select: Callable[[str], bool] | None = None, as_jax: bool = False) -> Any:
    """Item ``item`` as saved, without a target: built from the saved key paths
    (``"layers.0.kernel"`` -> ``{"layers": {"0": {"kernel": ...}}}``) and, for a plain pytree
    saved with its container record, with its lists, tuples, None leaves and empty
    containers back. Host NumPy arrays in their real dtypes (PRNG keys as typed key arrays;
    ``as_jax``: jax arrays on the default device), scalar leaves as the Python values saved."""
    rec = ck.item_record(item)
    keys = [k for k in rec.arrays if select is None or select(k)]
    values = dict(ck.read_arrays(item, keys, verify=verify, executor=executor)) if keys else {}
    if as_jax:
        values = {k: v if isinstance(v, jax.Array) else jax.numpy.asarray(v) for k, v in values.items()}
    for key, raw in rec.scalars.items():
        if select is None or select(key):
            values[key] = decode_scalar(key, raw)
    out = nest(values, ck.where)
    record = saved_tree_record(ck, item)
    if record is not None:
        out = apply_container_record(out, record, f"{ck.where}: {TREE_FILE.format(item)}", partial=select is not None)
    return out


def nest(flat: dict[str, Any], where: str = "") -> dict:
    out: dict = {}
    for key in sorted(flat):
        check_key_depth(key, where)
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
                 select: Callable[[str], bool] | None = None, as_jax: bool = False) -> Any:
    """One item of an open checkpoint: as saved without a target, else into ``target``
    (a pytree of ``jax.ShapeDtypeStruct`` or of arrays; an nnx.Module is filled in place,
    ``strict=False`` keeping its values where the checkpoint does not fit)."""
    if target is None:
        if shardings is not None:
            raise CheckpointError(f"{ck.where}: shardings= places arrays of a target: pass target= (e.g. a "
                                  "pytree of jax.ShapeDtypeStruct), or restore host arrays without shardings=")
        return host_tree(ck, item, verify=verify, executor=executor, select=select, as_jax=as_jax)
    if isinstance(target, nnx.Module):
        return restore_module_state(ck, item, target, partial=not strict, verify=verify, executor=executor,
                                    progress=progress, shardings=shardings, select=select)
    check_target(target, ck.where)
    restored, report = ck.restore(item, target, strict=strict, verify=verify, executor=executor,
                                  progress=progress, shardings=shardings, select=select)
    if not report.complete:
        empty = [k for k, v in FlatTree.of(restored).values().items() if isinstance(v, jax.ShapeDtypeStruct)]
        if empty:
            raise StructureMismatchError(f"{ck.where}: item {item!r}: the checkpoint has no data for the abstract "
                                         f"target leaves {bounded(empty)}: {report.describe()}")
        warnings.warn(f"{ck.where}: item {item!r} restored where it matches the target; the other leaves keep "
                      f"the target's values: {report.describe()}", stacklevel=3)
    return restored


def check_target(target: Any, where: str) -> None:
    if isinstance(target, (type, str, bytes)) or callable(target):
        raise CheckpointError(f"{where}: target= is {summarize(target)}: pass a pytree "
                              "shaped like the saved one (leaves jax.ShapeDtypeStruct or arrays), an "
                              "nnx.Module to fill, or no target for host arrays")


def target_and_item(target: Any, item: Any, where: str) -> tuple[Any, str | None]:
    """``item=`` names an item (a str); a pytree there is Orbax's spelling of the target
    (``restore(path, item=state)``) and is taken as ``target``."""
    if item is None or isinstance(item, str):
        return target, item
    if target is not None:
        raise CheckpointError(f"{where}: item= names the item to read (a str such as 'state', 'model' or 'ema') "
                              f"and got {summarize(item)}, with target= given as well: pass the target once")
    return item, None


def restore(path: os.PathLike | str, target: Any = None, *, item: str | None = None, strict: bool = True,
            shardings: Any = None, select: Callable[[str], bool] | None = None, verify: bool = True,
            backend: str = "auto", num_writers: int | None = None, progress: bool | None = None,
            as_jax: bool = False) -> Any:
    """Load one item of the checkpoint at ``path``.

    ``target=None``: the item as saved: dicts, lists, tuples and None leaves as they were
    (for a tree saved by ``save``; an ``nnx.State``, or a tree saved by an older shardckpt,
    comes back as nested dicts built from the dotted key paths), host NumPy arrays in their
    real dtypes (bfloat16 stays bfloat16; ``as_jax=True``: jax arrays on the default device)
    and the scalar leaves saved. A target (``jax.eval_shape(init, ...)``: a pytree of
    ``jax.ShapeDtypeStruct``, or of arrays) gives the same tree type back with jax arrays on
    the target's shardings, or on ``shardings=`` (a Sharding, a dict by dotted key, or a
    pytree like the target); each device reads only the chunks its slice overlaps.
    ``strict`` (default): every key must match, shapes too; ``strict=False`` fills what
    matches, warns, and leaves the rest as the target has it (an abstract leaf with no saved
    data still raises). ``select(key)`` restores only some keys. An ``nnx.Module`` target is
    filled in place. A cast to a target's dtype that keeps every value (bfloat16 -> float32)
    is silent; a lossy one (float32 -> float16, float -> int) warns once per dtype pair.

    ``item``: default ``"state"`` (what ``save(path, tree)`` writes), or the checkpoint's
    only item; ``item="model"`` reads what ``save_model`` wrote, ``item="ema"`` an extra item.
    A pytree passed as ``item=`` is the target (Orbax's ``restore(path, item=tree)``).
    """
    where = f"restore({path!s})"
    target, item = target_and_item(target, item, where)
    for name, value in (("strict", strict), ("verify", verify), ("as_jax", as_jax)):
        if not isinstance(value, bool):
            raise CheckpointError(f"{where}: {name}= takes True or False, got {summarize(value)}")
    if as_jax and target is not None:
        raise CheckpointError(f"{where}: as_jax=True is for restores without a target (a target's leaves say "
                              "what comes back)")
    executor = resolve_load_executor(backend, num_writers)

    def load_once():   # again if another process replaces the checkpoint meanwhile
        ck = open_checkpoint(path)
        return restore_item(ck, pick_item(ck, item), target, strict=strict, verify=verify, executor=executor,
                            progress=progress, shardings=shardings, select=select, as_jax=as_jax)
    return read_consistently(load_once)
