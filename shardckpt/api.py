"""The guide's convenience functions: save_model / load_model / save_optimizer / load_optimizer.

Each writes one item ("model" or "optimizer") of a checkpoint directory as its own atomic
commit, carrying the directory's other items over, so ``save_model(p, m)`` followed by
``save_optimizer(p, opt)`` yields one checkpoint holding both, and either call can be
repeated without ever leaving a half-written directory behind.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .backends import resolve_executor
from .checkpoint import Checkpoint, RestoreReport, open_checkpoint, read_consistently, save_checkpoint
from .errors import CheckpointError, StructureMismatchError
from .tree import FlatTree


def config_to_dict(config: Any) -> dict | None:
    """A model config as a JSON-safe dict (``to_dict()``, a dataclass, or a mapping)."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise CheckpointError(f"config of type {type(config).__name__} cannot be saved: give a dict, "
                          "a dataclass or an object with to_dict()")


def model_config_of(model: Any, config: Any = None) -> dict | None:
    """The model config to record: ``config`` or else ``model.config``. The original
    ``save_model(path, model, config)`` took the whole ``config.json`` dict
    (``{"model_config": {...}, ...}``): such a dict gives its ``model_config``, not nested again."""
    if isinstance(config, dict) and "model_config" in config:
        config = config["model_config"]
    return config_to_dict(config if config is not None else getattr(model, "config", None))


def save_model(path: os.PathLike | str, model: nnx.Module, config: Any = None, *,
               compress: bool = False, num_shards: int | None = None, step: int | None = None,
               backend: str = "auto", num_writers: int | None = None,
               save_timeout: float | None = None, process_index: int | None = None,
               process_count: int | None = None, progress: bool | None = None) -> Path:
    """Save ``model``'s full nnx state (parameters, RNG streams, batch stats...) to ``path``.

    ``config`` defaults to ``model.config`` (via ``to_dict()``). Returns the path. In a
    multi-process job every process calls it; each writes only its own shards.
    """
    cfg = model_config_of(model, config)
    return save_checkpoint(path, {"model": nnx.state(model)}, step=step,
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
    return save_checkpoint(path, {"optimizer": nnx.state(optimizer)}, num_shards=num_shards,
                           compress=compress, progress=progress, keep_other_items=True,
                           backend=backend, num_writers=num_writers, save_timeout=save_timeout,
                           process_index=process_index, process_count=process_count)


def _build_config(cfg: dict | None, config_cls: type | None, where: str):
    if config_cls is None:
        from .models import ModelConfig
        config_cls = ModelConfig
    if cfg is None:
        raise CheckpointError(f"{where}: config.json has no model_config; pass model= to load into")
    try:
        if hasattr(config_cls, "from_dict"):
            return config_cls.from_dict(cfg)
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a JSON object, got {type(cfg).__name__}")
        return config_cls(**cfg)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the saved config makes the class raise
        raise CheckpointError(f"{where}: config.json's model_config does not make a {config_cls.__name__}: "
                              f"{type(e).__name__}: {e}") from e


def _is_param(leaf: Any) -> bool:
    return isinstance(leaf, nnx.Param)


def restore_module_state(ck: Checkpoint, item: str, target: nnx.Module | Callable[[], nnx.Module],
                         *, verify: bool = True, executor=None, progress=None,
                         shardings: Any = None, select: Callable[[str], bool] | None = None) -> nnx.Module:
    """Restore ``item`` into a module: a concrete one (updated in place) or a constructor,
    evaluated abstractly with ``nnx.eval_shape`` so no weights are initialised just to be
    overwritten. Non-parameter state absent from the checkpoint (RNG streams of legacy
    checkpoints) falls back to a fresh initialisation, with a warning."""
    concrete = isinstance(target, nnx.Module)
    if select is not None and not concrete:
        raise CheckpointError(f"{ck.where}: select= restores part of a model: pass the model to fill "
                              "(the keys not selected keep its values)")
    module = target if concrete else nnx.eval_shape(target)
    graphdef, state = nnx.split(module)
    restored, report = ck.restore(item, state, strict=False, verify=verify, executor=executor,
                                  progress=progress, shardings=shardings, select=select)
    leaves = FlatTree.of(state).leaves
    missing_params = [k for k in report.missing if _is_param(leaves[k])]
    if report.mismatched or report.unexpected or missing_params:
        report.missing = missing_params or report.missing
        raise StructureMismatchError(f"{ck.where}: the saved {item!r} does not fit the target module: "
                                     f"{report.describe()}")
    if concrete:
        nnx.update(module, restored)
        return module
    if report.missing:
        warnings.warn(f"{ck.where}: not in the checkpoint, freshly initialised: {', '.join(report.missing)}",
                      stacklevel=3)
        module = target()
        nnx.update(module, _only(restored, report.restored))
        return module
    return nnx.merge(graphdef, restored)


def _only(state: Any, keys: list[str]) -> Any:
    """The sub-state holding ``keys`` (for a partial ``nnx.update``)."""
    keep = set(keys)
    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(p, v) for p, v in flat if ".".join(map(str, p)) in keep])


def _cast_floats(model: nnx.Module, dtype: Any) -> None:
    dtype = jnp.dtype(dtype)
    state = nnx.state(model, nnx.Param)
    cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    nnx.update(model, cast)


def load_model(path: os.PathLike | str, model: nnx.Module | None = None,
               model_cls: type | None = None, config_cls: type | None = None, dtype: Any = None,
               *, verify: bool = True, backend: str = "auto", num_writers: int | None = None,
               shardings: Any = None, select: Callable[[str], bool] | None = None,
               progress: bool | None = None) -> tuple[nnx.Module, dict | None]:
    """Load a model saved by ``save_model`` (or a guide-layout ``model.npz``).

    Without ``model``, builds ``model_cls`` (default ``LMModel``) from the saved config
    abstractly and fills it from the files. With ``model``, restores into it in place (its
    shardings are kept). ``shardings`` (one Sharding, a dict by dotted key, or a pytree
    like the state) puts arrays on another layout; an abstract target built under a mesh
    carries its own. Each device reads only the chunks its slice overlaps. ``select(key)``
    restores only some keys (into a given ``model``; the rest keep their values).
    ``dtype`` casts floating-point parameters after loading. Returns ``(model, config_dict)``.
    """
    executor = resolve_executor(backend, num_writers)

    def load_once():   # again if another process replaces the checkpoint meanwhile
        ck = open_checkpoint(path)
        cfg = ck.read_config().get("model_config")
        if model is None:
            config = _build_config(cfg, config_cls, ck.where)
            cls = model_cls
            if cls is None:
                from .models import LMModel
                cls = LMModel
            loaded = restore_module_state(ck, "model", lambda: cls(config, rngs=nnx.Rngs(0)),
                                          verify=verify, executor=executor, progress=progress,
                                          shardings=shardings, select=select)
        else:
            loaded = restore_module_state(ck, "model", model, verify=verify, executor=executor,
                                          progress=progress, shardings=shardings, select=select)
        return loaded, cfg

    model, cfg = read_consistently(load_once)
    if dtype is not None:
        _cast_floats(model, dtype)
    return model, cfg


def restore_optimizer(ck: Checkpoint, model: nnx.Module, tx: optax.GradientTransformation, *,
                      wrt: Any = nnx.Param, strict: bool = False, verify: bool = True,
                      executor=None, progress=None, shardings: Any = None) -> tuple[nnx.Optimizer, RestoreReport]:
    """Build ``nnx.Optimizer(model, tx, wrt=wrt)`` and restore its state by key path.

    When every leaf is in the checkpoint the optimizer is built abstractly and filled;
    otherwise (another optimizer, fine-tuning) the matching leaves are restored, the rest
    keep their fresh ``tx.init`` values, and a warning lists them; ``strict`` raises instead.
    When no leaf at all matches, StructureMismatchError: never a silently fresh optimizer.
    """
    abstract = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=wrt), model)
    bind = getattr(ck, "bind_optimizer", None)   # the original layout: leaves by position
    if bind is not None:
        bind(abstract)
    graphdef, state = nnx.split(abstract)
    restored, report = ck.restore("optimizer", state, strict=strict, verify=verify,
                                  executor=executor, progress=progress, shardings=shardings)
    if not report.restored:
        raise StructureMismatchError(f"{ck.where}: no leaf of the saved optimizer matches the new one "
                                     f"(refusing to return a freshly initialised optimizer): {report.describe()}")
    if report.complete:
        return nnx.merge(graphdef, restored), report
    warnings.warn(f"{ck.where}: optimizer state restored only where it matches the new optimizer; "
                  f"{report.describe()}", stacklevel=3)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    nnx.update(optimizer, _only(restored, report.restored))
    return optimizer, report


def load_optimizer(path: os.PathLike | str, model: nnx.Module, tx: optax.GradientTransformation | None = None,
                   learning_rate: float = 1e-4, *, wrt: Any = nnx.Param, strict: bool = False,
                   allow_pickle: bool = False, verify: bool = True, backend: str = "auto",
                   num_writers: int | None = None, shardings: Any = None,
                   progress: bool | None = None) -> nnx.Optimizer:
    """Recreate the optimizer of ``model`` from ``path``: ``tx`` defaults to
    ``optax.adamw(learning_rate)``; see ``restore_optimizer`` for how a different ``tx``
    is handled."""
    tx = tx if tx is not None else optax.adamw(learning_rate)
    executor = resolve_executor(backend, num_writers)
    optimizer, _ = read_consistently(lambda: restore_optimizer(   # again if replaced meanwhile
        open_checkpoint(path, allow_pickle=allow_pickle), model, tx, wrt=wrt, strict=strict, verify=verify,
        executor=executor, progress=progress, shardings=shardings))
    return optimizer
