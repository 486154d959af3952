"""Flax NNX on top of the pytree core: modules and optimizers <-> state trees.

A module is saved as ``nnx.state(module)`` (item ``model``) and an ``nnx.Optimizer`` as
``nnx.state(optimizer)`` (item ``optimizer``). Restore targets are abstract
(``nnx.eval_shape``): no weights or optimizer moments are initialised only to be
overwritten. The optimizer's target is built from the parameters it updates
(``nnx.state(model, wrt)``), not by tracing the whole model graph again.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shardckpt.errors import CheckpointError, StructureMismatchError
from shardckpt.loading.checkpoint import Checkpoint, RestoreReport
from shardckpt.tree import FlatTree


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


def state_of(obj: Any, what: str = "model") -> Any:
    """What is saved for ``obj``: ``nnx.state`` of a module or optimizer, any other pytree
    as it is. Classes, strings and other non-trees are refused with what to pass."""
    if isinstance(obj, nnx.Module):   # nnx.Optimizer is a Module too (flax >= 0.11)
        return nnx.state(obj)
    check_tree_arg(obj, what)
    return obj


def check_tree_arg(obj: Any, what: str) -> None:
    """Refuse arguments that are no module and no pytree of arrays: a class, a string, bytes,
    a function. (A typo such as ``save_model(path, LMModel)`` would otherwise save nothing
    or fail deep inside.)"""
    if isinstance(obj, type):
        hint = " (pass it as model_cls=, or pass an instance)" if what == "model" else ""
        raise CheckpointError(f"{what}={obj.__name__} is a class, not a {what}: pass an nnx.Module instance "
                              f"or a pytree of arrays{hint}")
    if isinstance(obj, (str, bytes)) or callable(obj) and not isinstance(obj, nnx.Module):
        raise CheckpointError(f"{what}={obj!r:.60} is a {type(obj).__name__}: pass an nnx.Module, an "
                              "nnx.State or a pytree of arrays (a dict, list or tuple)")


def check_module(model: Any, where: str, *, allow_tree: bool = False) -> None:
    """``model=`` must be an nnx.Module (or, where accepted, a pytree target)."""
    if isinstance(model, nnx.Module):
        return
    if allow_tree:
        check_tree_arg(model, "model")
        return
    check_tree_arg(model, "model")
    raise CheckpointError(f"{where}: model= is a {type(model).__name__}; this needs an nnx.Module "
                          "(build one, e.g. nnx.eval_shape(lambda: MyModel(config, rngs=nnx.Rngs(0))) "
                          "is filled in place), or restore a plain pytree with shardckpt.restore(path, target)")


def build_config(cfg: dict | None, config_cls: type | None, where: str):
    if config_cls is None:
        from shardckpt.lm.models import ModelConfig
        config_cls = ModelConfig
    if cfg is None:
        raise CheckpointError(f"{where}: config.json has no model_config, so there is no model to build: pass "
                              "model= (a module to fill, or a pytree target), or read the arrays with "
                              "shardckpt.restore(path)")
    try:
        if hasattr(config_cls, "from_dict"):
            return config_cls.from_dict(cfg)
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a JSON object, got {type(cfg).__name__}")
        return config_cls(**cfg)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: config.json's model_config does not make a {config_cls.__name__}: "
                              f"{type(e).__name__}: {e}") from e


def model_factory(cfg: dict | None, model_cls: type | None, config_cls: type | None,
                  where: str) -> Callable[[], nnx.Module]:
    """``model_cls(config, rngs=nnx.Rngs(0))`` for the saved config (default ``LMModel``)."""
    if model_cls is not None and not isinstance(model_cls, type):
        raise CheckpointError(f"{where}: model_cls={model_cls!r:.60} is not a class; pass the module class "
                              "(a built module goes to model=)")
    config = build_config(cfg, config_cls, where)
    cls = model_cls
    if cls is None:
        from shardckpt.lm.models import LMModel
        cls = LMModel
    return lambda: cls(config, rngs=nnx.Rngs(0))


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
    if not concrete and (isinstance(target, type) or not callable(target)):
        check_module(target, ck.where)
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
        nnx.update(module, only(restored, report.restored))
        return module
    return nnx.merge(graphdef, restored)


def only(state: Any, keys: list[str]) -> Any:
    """The sub-state holding ``keys`` (for a partial ``nnx.update``)."""
    keep = set(keys)
    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(p, v) for p, v in flat if ".".join(map(str, p)) in keep])


def cast_floats(model: nnx.Module, dtype: Any) -> None:
    dtype = jnp.dtype(dtype)
    state = nnx.state(model, nnx.Param)
    cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    nnx.update(model, cast)


def abstract_optimizer(model: nnx.Module, tx: optax.GradientTransformation, wrt: Any = nnx.Param) -> nnx.Optimizer:
    """``nnx.Optimizer(model, tx, wrt=wrt)`` evaluated abstractly, from the ``wrt`` state
    only: the optimizer reads nothing of the model but ``nnx.state(model, wrt)``, so this is
    the same graphdef and state (shapes, dtypes, shardings) as tracing the whole model,
    without the model's graph in the trace."""
    return nnx.eval_shape(lambda params: nnx.Optimizer(params, tx, wrt=wrt), nnx.state(model, wrt))


def restore_optimizer(ck: Checkpoint, model: nnx.Module, tx: optax.GradientTransformation, *,
                      wrt: Any = nnx.Param, strict: bool = False, verify: bool = True,
                      executor=None, progress=None, shardings: Any = None) -> tuple[nnx.Optimizer, RestoreReport]:
    """Build ``nnx.Optimizer(model, tx, wrt=wrt)`` and restore its state by key path.

    When every leaf is in the checkpoint the optimizer is built abstractly and filled;
    otherwise (another optimizer, fine-tuning) the matching leaves are restored, the rest
    keep their fresh ``tx.init`` values, and a warning lists them; ``strict`` raises instead.
    When no leaf at all matches, StructureMismatchError: never a silently fresh optimizer.
    """
    check_module(model, ck.where)
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise CheckpointError(f"{ck.where}: tx={tx!r:.60} is not an optax.GradientTransformation")
    abstract = abstract_optimizer(model, tx, wrt)
    bind = getattr(ck, "bind_optimizer", None)   # the original layout: leaves by position
    if bind is not None:
        bind(abstract)
    graphdef, state = nnx.split(abstract)
    restored, report = ck.restore("optimizer", state, strict=strict, verify=verify,
                                  executor=executor, progress=progress, shardings=shardings)
    if not report.restored:
        raise StructureMismatchError(f"{ck.where}: no leaf of the saved optimizer matches the new one "
                                     f"(refusing to return a freshly initialised optimizer; is wrt= the "
                                     f"filter it was built with?): {report.describe()}")
    if report.complete:
        return nnx.merge(graphdef, restored), report
    warnings.warn(f"{ck.where}: optimizer state restored only where it matches the new optimizer; "
                  f"{report.describe()}", stacklevel=3)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    nnx.update(optimizer, only(restored, report.restored))
    return optimizer, report
