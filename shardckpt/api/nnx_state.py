"""Flax NNX on top of the pytree core: modules and optimizers <-> state trees.

A module is saved as ``nnx.state(module)`` (item ``model``) and an ``nnx.Optimizer`` as
``nnx.state(optimizer)`` (item ``optimizer``). Restore targets are abstract
(``nnx.eval_shape``): no weights or optimizer moments are initialised only to be
overwritten. The optimizer's target is built from the parameters it updates
(``nnx.state(model, wrt)``), not by tracing the whole model graph again.

A resume restores what was saved or says why it cannot: an optimizer whose state does not
match the saved one (another ``tx=``, another ``wrt=``) is refused by default, with both
layouts described; restoring only what matches (``strict=False``) and starting a fresh
optimizer over the restored weights are explicit choices.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shardckpt.errors import CheckpointError, OptimizerMismatchError, StructureMismatchError
from shardckpt.loading.checkpoint import Checkpoint, RestoreReport
from shardckpt.tree import FlatTree, bounded, summarize


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
    if isinstance(obj, (nnx.Module, nnx.Optimizer)):   # flax 0.12's Optimizer is an nnx.Pytree, no Module
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
        raise CheckpointError(f"{what}= is {summarize(obj)}: pass an nnx.Module, an "
                              "nnx.State or a pytree of arrays (a dict, list or tuple)")


def check_module(model: Any, where: str, *, allow_tree: bool = False) -> None:
    """``model=`` must be an nnx.Module (or, where accepted, a pytree target)."""
    if isinstance(model, nnx.Module):
        return
    if allow_tree:
        check_tree_arg(model, "model")
        return
    check_tree_arg(model, "model")
    raise CheckpointError(f"{where}: model= is {summarize(model)}; this needs an nnx.Module "
                          "(build one, e.g. nnx.eval_shape(lambda: MyModel(config, rngs=nnx.Rngs(0))) "
                          "is filled in place), or restore a plain pytree with shardckpt.restore(path, target)")


def _looks_like_config(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) or hasattr(cls, "from_dict") or hasattr(cls, "to_dict")


def check_model_classes(model_cls: Any, config_cls: Any, where: str) -> None:
    """``model_cls=`` takes the module class, ``config_cls=`` the config class: checked
    before anything is read."""
    if model_cls is not None:
        if not isinstance(model_cls, type):
            raise CheckpointError(f"{where}: model_cls= is {summarize(model_cls)}, not a class; pass the module "
                                  "class (a built module goes to model=)")
        if not issubclass(model_cls, nnx.Module):
            config = f"; config_cls={model_cls.__name__} if it is the config class" if _looks_like_config(model_cls) else ""
            raise CheckpointError(f"{where}: model_cls={model_cls.__name__} is not an nnx.Module subclass: model_cls "
                                  f"takes the module class (e.g. LMModel), config_cls the config class{config}")
    if config_cls is not None:
        if not isinstance(config_cls, type):
            raise CheckpointError(f"{where}: config_cls= is {summarize(config_cls)}, not a class; pass the config "
                                  "class (built as config_cls.from_dict(d) or config_cls(**d))")
        if issubclass(config_cls, nnx.Module):
            raise CheckpointError(f"{where}: config_cls={config_cls.__name__} is a module class: config_cls takes the "
                                  f"config class, model_cls the module class (model_cls={config_cls.__name__})")


def build_config(cfg: dict | None, config_cls: type | None, where: str):
    """The config object of the saved ``model_config``: ``config_cls.from_dict(cfg)`` or
    ``config_cls(**cfg)``. Without ``config_cls`` the reference ``ModelConfig``, and then a
    saved config with keys ModelConfig does not know (another model's config) is refused
    with what to pass instead."""
    explicit = config_cls is not None
    if config_cls is None:
        from shardckpt.lm.models import ModelConfig
        config_cls = ModelConfig
    if cfg is None:
        raise CheckpointError(f"{where}: config.json has no model_config, so there is no model to build: pass "
                              "model= (a module to fill, or a pytree target), or read the arrays with "
                              "shardckpt.restore(path)")
    if not explicit and isinstance(cfg, dict) and dataclasses.is_dataclass(config_cls):
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(str(k) for k in cfg if k not in known)
        if unknown:
            raise StructureMismatchError(
                f"{where}: the saved model_config has keys [{bounded(repr(k) for k in unknown)}] that {config_cls.__name__} (the "
                f"reference LMModel's config, used when no config_cls= is given) does not have: the checkpoint "
                "holds another model. Pass model_cls= (its module class) and config_cls= (its config class), or "
                "model= (the module, or nnx.eval_shape(lambda: MyModel(config, rngs=nnx.Rngs(0))), to fill). "
                f"(Written by a newer shardckpt's LMModel? config_cls={config_cls.__name__} drops the unknown keys.)")
    try:
        if hasattr(config_cls, "from_dict"):
            return config_cls.from_dict(cfg)
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a JSON object, got {type(cfg).__name__}")
        return config_cls(**cfg)
    except CheckpointError:
        raise
    except Exception as e:
        hint = "" if explicit else " (pass config_cls= and model_cls= for a model other than LMModel)"
        raise CheckpointError(f"{where}: config.json's model_config does not make a {config_cls.__name__}{hint}: "
                              f"{type(e).__name__}: {str(e):.200}") from e


class ModelFactory:
    """``cls(config, rngs=nnx.Rngs(0))``; ``key`` names its abstract trace (the class, the
    config class and the saved config) for ``abstract_module``'s cache, None when the
    config has no canonical JSON form."""

    def __init__(self, cls: type, config: Any, key: Any):
        self.cls, self.config, self.key = cls, config, key

    def __call__(self) -> nnx.Module:
        return self.cls(self.config, rngs=nnx.Rngs(0))


def model_factory(cfg: dict | None, model_cls: type | None, config_cls: type | None,
                  where: str) -> ModelFactory:
    """``model_cls(config, rngs=nnx.Rngs(0))`` for the saved config (default ``LMModel``)."""
    check_model_classes(model_cls, config_cls, where)
    config = build_config(cfg, config_cls, where)
    cls = model_cls
    if cls is None:
        from shardckpt.lm.models import LMModel
        cls = LMModel
    try:
        key = (cls, config_cls, json.dumps(cfg, sort_keys=True, allow_nan=True))
    except (TypeError, ValueError):
        key = None
    return ModelFactory(cls, config, key)


# --- abstract targets, traced once --------------------------------------------------------------
#
# Tracing a module with nnx.eval_shape costs far more than reading its state (0.46 s for the
# 10M-parameter preset against 0.13 s of restore), and a resume traces the same (class,
# config) every time. The (graphdef, abstract state) of a trace is cached, keyed by what
# decides it (the class, the config, the mesh in context); each load merges the graphdef with
# its own restored state, so every load gets new module objects. The graphdef's static
# attributes (the config, dtypes...) are shared by the modules merged from it, as nnx's own
# transforms share them: a trace is cached only when all of them are immutable values.

TRACE_CACHE_SIZE = 8
_MODEL_TRACES: OrderedDict = OrderedDict()
_OPTIMIZER_TRACES: OrderedDict = OrderedDict()

_IMMUTABLE_TYPES = (type(None), bool, int, float, complex, str, bytes, type, range, enum.Enum, jnp.dtype,
              types.FunctionType, types.BuiltinFunctionType, types.MethodType, jax.sharding.Sharding)


def immutable_value(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` can never change: numbers, strings, dtypes, classes, functions,
    shardings, and tuples / frozensets / frozen dataclasses of those."""
    if depth > 20:
        return False
    if isinstance(value, _IMMUTABLE_TYPES) or value is Ellipsis:
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(immutable_value(v, depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.__dataclass_params__.frozen and all(
            immutable_value(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    return False


def _shareable(graphdef: Any) -> bool:
    """Whether modules merged from ``graphdef`` may share its static attributes: each is an
    immutable value (flax's own bookkeeping, ``_pytree__nodes``, is flax's to share)."""
    from flax.nnx.graphlib import Static
    for attr in getattr(graphdef, "attributes", None) or ():
        if not (isinstance(attr, tuple) and len(attr) == 2):
            return False
        name, value = attr
        if isinstance(value, Static) and name != "_pytree__nodes" and not immutable_value(value.value):
            return False
    return getattr(graphdef, "attributes", None) is not None


def _trace_context() -> Any:
    """What besides the arguments decides a trace's shardings: the meshes in context."""
    get_mesh = getattr(jax.sharding, "get_mesh", None)
    return jax.sharding.get_abstract_mesh(), get_mesh() if get_mesh is not None else None


def _cached(cache: OrderedDict, key: Any, build: Callable[[], Any], shareable: Callable[[Any], bool]) -> Any:
    """``build()``'s (graphdef, state), cached under ``key`` (None, or an unhashable key:
    not cached) when ``shareable(graphdef)``."""
    if key is not None:
        try:
            key = (key, _trace_context())
            hit = cache.get(key)
        except TypeError:
            key = hit = None
        if hit is not None:
            cache.move_to_end(key)
            return hit
    out = build()
    if key is not None and shareable(out[0]):
        cache[key] = out
        while len(cache) > TRACE_CACHE_SIZE:
            cache.popitem(last=False)
    return out


def cached_traces() -> tuple[int, int]:
    """How many model and optimizer traces are cached."""
    return len(_MODEL_TRACES), len(_OPTIMIZER_TRACES)


def clear_trace_cache() -> None:
    """Forget the cached abstract traces (a module class changed its ``__init__``)."""
    _MODEL_TRACES.clear()
    _OPTIMIZER_TRACES.clear()


def abstract_module(factory: Callable[[], nnx.Module]) -> tuple[Any, Any]:
    """``nnx.split(nnx.eval_shape(factory))``, traced once per ``factory.key`` (a
    ``ModelFactory``; any other constructor is traced every time)."""
    return _cached(_MODEL_TRACES, getattr(factory, "key", None), lambda: nnx.split(nnx.eval_shape(factory)),
                   _shareable)


def default_model_hint(model_cls: type | None, config_cls: type | None) -> str:
    """What to say when a model built from the defaults does not fit the checkpoint."""
    if model_cls is not None:
        return ""
    return (" (the model was built as the reference LMModel from the saved config, since no model_cls= was "
            "given: for another module pass model_cls= and config_cls=, or model= a module or "
            "nnx.eval_shape(lambda: MyModel(...)) to fill)")


def _is_param(leaf: Any) -> bool:
    return isinstance(leaf, nnx.Param)


def _abstract_keys(tree: Any) -> list[str]:
    return [k for k, v in FlatTree.of(tree).values().items() if isinstance(v, jax.ShapeDtypeStruct)]


def restore_module_state(ck: Checkpoint, item: str, target: nnx.Module | Callable[[], nnx.Module],
                         *, partial: bool = False, hint: str = "", verify: bool = True, executor=None,
                         progress=None, shardings: Any = None,
                         select: Callable[[str], bool] | None = None) -> nnx.Module:
    """Restore ``item`` into a module: a concrete one (updated in place), an abstract one
    (``nnx.eval_shape(...)``, filled), or a constructor, evaluated abstractly with
    ``nnx.eval_shape`` so no weights are initialised just to be overwritten.

    Parameters must fit: one missing, unexpected or of another shape raises
    StructureMismatchError (``hint`` says how the module was chosen). Other state absent
    from the checkpoint (the RNG streams of original-layout checkpoints) is freshly
    initialised (a constructor) or kept from the module given, with a warning. ``partial``
    (``restore(path, module, strict=False)``): what does not fit keeps the given module's
    values, with a warning; an abstract leaf with no saved data still raises.
    """
    concrete = isinstance(target, nnx.Module)
    if not concrete and (isinstance(target, type) or not callable(target)):
        check_module(target, ck.where)
    if select is not None and not concrete:
        raise CheckpointError(f"{ck.where}: select= restores part of a model: pass the model to fill "
                              "(the keys not selected keep its values)")
    if concrete:
        module = target
        graphdef, state = nnx.split(module)
    else:
        try:
            graphdef, state = abstract_module(target)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{ck.where}: building the model to restore into failed ({type(e).__name__}: "
                                  f"{str(e):.200}){hint}") from e
    restored, report = ck.restore(item, state, strict=False, verify=verify, executor=executor,
                                  progress=progress, shardings=shardings, select=select)
    leaves = FlatTree.of(state).leaves
    missing_params = [k for k in report.missing if _is_param(leaves[k])]
    if not (partial and concrete) and (report.mismatched or report.unexpected or missing_params):
        report.missing = missing_params or report.missing
        raise StructureMismatchError(f"{ck.where}: the saved {item!r} does not fit the target module: "
                                     f"{report.describe()}{hint}")
    if concrete:
        empty = _abstract_keys(restored)
        if empty:
            raise StructureMismatchError(f"{ck.where}: the saved {item!r} has no data for the abstract module's "
                                         f"leaves {bounded(empty)} (an abstract target has no values to keep): "
                                         f"{report.describe()}{hint}")
        if not report.complete:
            what = "restored where it fits; the rest keeps the module's values" if partial else \
                "not in the checkpoint, the module's own values kept"
            warnings.warn(f"{ck.where}: {item!r} {what}: {report.describe()}", stacklevel=3)
        nnx.update(module, restored)
        return module
    if report.missing:
        warnings.warn(f"{ck.where}: not in the checkpoint, freshly initialised: {bounded(report.missing)}",
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


def optimizer_target(model: nnx.Module, tx: optax.GradientTransformation,
                     wrt: Any = nnx.Param) -> tuple[Any, Any]:
    """``nnx.split(abstract_optimizer(model, tx, wrt))``, traced once per layout: the key is
    ``jax.eval_shape(tx.init, params)`` (its tree, shapes, dtypes and shardings: what the
    optimizer's state is made of) with ``wrt``, a few ms where tracing ``nnx.Optimizer``
    costs ~0.1 s. The graphdef holds ``tx`` as a static attribute: a hit traced with another
    ``tx`` of the same layout; ``restored_optimizer`` sets the caller's ``tx`` on the result."""
    params = nnx.state(model, wrt)
    try:
        leaves, treedef = jax.tree.flatten(jax.eval_shape(tx.init, params))
        key = (treedef, tuple((tuple(x.shape), x.dtype, getattr(x, "sharding", None)) for x in leaves), wrt)
    except Exception:   # the trace below raises it again, as before
        key = None
    return _cached(_OPTIMIZER_TRACES, key,
                   lambda: nnx.split(nnx.eval_shape(lambda p: nnx.Optimizer(p, tx, wrt=wrt), params)), _shareable)


def restored_optimizer(graphdef: Any, state: Any, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """The optimizer of ``optimizer_target``'s graphdef and a restored state, with ``tx``."""
    optimizer = nnx.merge(graphdef, state)
    if optimizer.tx is not tx:
        optimizer.tx = tx
    return optimizer


# --- describing optimizer states ---------------------------------------------------------------

#: Leaf names of optax states -> the transformations that keep them (for error messages).
_FAMILIES = ((frozenset({"mu", "nu"}), "the state of optax.adam / adamw / nadam / lamb"),
             (frozenset({"trace"}), "the state of optax.sgd(momentum=...) / optax.trace"),
             (frozenset({"sum_of_squares"}), "the state of optax.adagrad"),
             (frozenset({"nu"}), "the state of optax.rmsprop"))


def _variable_types(model: nnx.Module) -> dict[str, type]:
    """Dotted path -> Variable type of every variable of ``model``."""
    return {".".join(map(str, p)): type(v) for p, v in nnx.to_flat_state(nnx.state(model))}


@dataclasses.dataclass
class OptimizerLayout:
    """An optimizer state's keys, with the parameter paths folded: ``opt_state.0.mu.*``
    (over N parameters) instead of one key per parameter."""

    per_param: dict[str, set[str]]     # prefix (opt_state.0.mu) -> parameter paths under it
    plain: list[str]                   # keys that are not per parameter (step, opt_state.0.count)

    @classmethod
    def of(cls, keys: Any, params: Any) -> OptimizerLayout:
        params = set(params)
        per_param: dict[str, set[str]] = {}
        plain = []
        for key in keys:
            parts = key.split(".")
            for i in range(1, len(parts)):
                rest = ".".join(parts[i:])
                if rest in params:
                    per_param.setdefault(".".join(parts[:i]), set()).add(rest)
                    break
            else:
                plain.append(key)
        return cls(per_param, sorted(plain))

    @property
    def params(self) -> set[str]:
        return set().union(*self.per_param.values()) if self.per_param else set()

    def names(self) -> dict[str, str]:
        """Leaf name (mu, nu, count, trace) -> where it sits (opt_state.0)."""
        out = {}
        for prefix in [*self.per_param, *self.plain]:
            head, _, name = prefix.rpartition(".")
            if head.startswith("opt_state"):
                out.setdefault(name, head)
        return out

    def family(self) -> str:
        names = set(self.names())
        return next((label for need, label in _FAMILIES if need <= names), "")

    def describe(self) -> str:
        entries = self.plain + [f"{prefix}.* ({len(ps)} parameters)" for prefix, ps in sorted(self.per_param.items())]
        family = self.family()
        return (bounded(entries, 6) or "no leaves") + (f" ({family})" if family else "")


def _filter_name(types: set[type]) -> str:
    names = sorted(f"nnx.{t.__name__}" if getattr(nnx, t.__name__, None) is t else t.__name__ for t in types)
    return names[0] if len(names) == 1 else f"nnx.Any({', '.join(names)})"


def _saved_keys(ck: Checkpoint) -> list[str]:
    rec = ck.item_record("optimizer")   # also the original layout's pickle refusal
    return [*rec.arrays, *rec.scalars]


#: How to start a new optimizer instead, by entry point (the end of a mismatch message).
FRESH_HINTS = {
    "manager": "fresh_optimizer=True keeps the restored weights and starts the optimizer given afresh",
    "function": "to start afresh instead, build nnx.Optimizer(model, tx, wrt=...) rather than loading one",
}


def optimizer_mismatch(ck: Checkpoint, model: nnx.Module, target_keys: list[str], report: RestoreReport,
                       *, what: str = "the new optimizer", fresh: str = FRESH_HINTS["manager"]) -> str:
    """Why the saved optimizer state does not fit ``target_keys``: both layouts (per
    parameter state folded), a few mismatching keys and how many, and what to pass."""
    types = _variable_types(model)
    saved = OptimizerLayout.of(_saved_keys(ck), types)
    new = OptimizerLayout.of(target_keys, types)
    parts = [f"{ck.where}: the saved optimizer state does not match {what}",
             f"saved: {saved.describe()}", f"{what}: {new.describe()}",
             f"mismatching keys: {report.describe(4)}"]
    fixes = []
    saved_names, new_names = saved.names(), new.names()
    moved = sorted({f"{saved_names[n]} -> {new_names[n]}" for n in set(saved_names) & set(new_names)
                    if saved_names[n] != new_names[n]})
    if moved:
        parts.append(f"the same kinds of state sit elsewhere ({bounded(moved, 4)}): the tx= given chains other "
                     "transformations around the saved one (optax.chain, clip_by_global_norm, ...) or the saved "
                     "one did")
    if saved.params and saved.params != new.params:
        saved_types = {types[p] for p in saved.params if p in types}
        saved_types = {t for t in saved_types if not any(t is not u and issubclass(t, u) for u in saved_types)}
        selects = bool(saved_types) and {p for p, t in types.items()
                                         if issubclass(t, tuple(saved_types))} == saved.params
        parts.append(f"the saved state covers {len(saved.params)} parameters ({bounded(sorted(saved.params), 3)}), "
                     f"{what} {len(new.params)} ({bounded(sorted(new.params), 3)})")
        fixes.append(f"wrt={_filter_name(saved_types)} (the saved parameters are exactly those variables)"
                     if selects else "the wrt= filter the optimizer was built with (and the model it was saved with)")
    if saved_names != new_names or set(saved.per_param) != set(new.per_param) or saved.plain != new.plain:
        fixes.insert(0, "the tx= the checkpoint was saved with" + (f" ({saved.family()})" if saved.family() else ""))
    if not fixes:     # the same keys, other shapes: another model
        fixes.append("the model the optimizer was saved with (the shapes differ)")
    parts.append("likely fix: pass " + " and ".join(fixes) + f"; {fresh}; strict=False restores only the leaves "
                 "that match")
    return ". ".join(parts)


def missing_tx_error(ck: Checkpoint, model: Any) -> CheckpointError:
    """No tx= for a checkpoint that holds an optimizer: an optax transformation cannot be
    rebuilt from its state, and guessing one would restart the run's schedule."""
    keys = _saved_keys(ck)
    params = _variable_types(model) if isinstance(model, nnx.Module) else {}
    return CheckpointError(
        f"{ck.where}: the checkpoint holds an optimizer ({OptimizerLayout.of(keys, params).describe()}) and no tx= "
        "was given; an optax transformation cannot be rebuilt from its saved state. Pass the tx= it was saved "
        "with (load_latest(tx=optax.adamw(...))), optimizer= an nnx.Optimizer to fill, fresh_optimizer=True with "
        "tx= to keep only the weights, or should_load_optimizer=False to load the model alone")


def check_optimizer_target(optimizer: Any, where: str) -> None:
    if not isinstance(optimizer, nnx.Optimizer):
        raise CheckpointError(f"{where}: optimizer= is {summarize(optimizer)}; it takes an nnx.Optimizer to fill "
                              "(concrete, or nnx.eval_shape(lambda: nnx.Optimizer(model, tx, wrt=...))); other "
                              "optimizer state is an extra item: items={'name': target}")


def check_tx(tx: Any, where: str) -> None:
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise CheckpointError(f"{where}: tx= is {summarize(tx)}, not an optax.GradientTransformation")


def fresh_optimizer(model: nnx.Module, tx: Any, wrt: Any, optimizer: nnx.Optimizer | None) -> nnx.Optimizer:
    """A new optimizer over ``model`` (``fresh_optimizer=True``): ``optimizer`` itself when it
    is concrete, else ``nnx.Optimizer(model, tx, wrt=wrt)`` (the abstract one's tx and wrt)."""
    if optimizer is not None:
        if not _abstract_keys(nnx.state(optimizer)):
            return optimizer
        tx, wrt = optimizer.tx, optimizer.wrt
    return nnx.Optimizer(model, tx, wrt=wrt)


def restore_optimizer(ck: Checkpoint, model: nnx.Module, tx: optax.GradientTransformation | None = None, *,
                      optimizer: nnx.Optimizer | None = None, wrt: Any = nnx.Param, strict: bool = True,
                      verify: bool = True, executor=None, progress=None, shardings: Any = None,
                      fresh_hint: str = FRESH_HINTS["manager"]) -> tuple[nnx.Optimizer, RestoreReport]:
    """Restore the saved optimizer into ``optimizer`` (an ``nnx.Optimizer``, concrete: filled
    in place, or abstract: filled and returned) or into a new ``nnx.Optimizer(model, tx,
    wrt=wrt)``, by key path.

    ``strict`` (the default): the saved state must be the target's, leaf for leaf, else
    OptimizerMismatchError describes both layouts and the likely fix (the tx= or wrt= it was
    saved with; ``fresh_hint`` says how to start afresh instead). ``strict=False``: the
    matching leaves are restored, the others keep the target's (or fresh ``tx.init``)
    values, and a warning lists them; when no leaf at all matches it raises all the same:
    never a silently fresh optimizer. The original layout never saved ``optimizer.step``: it
    keeps the target's value (0), with a warning.
    """
    check_module(model, ck.where)
    bind = getattr(ck, "bind_optimizer", None)   # the original layout: leaves by position
    if optimizer is not None:
        check_optimizer_target(optimizer, ck.where)
        tx, wrt = optimizer.tx, optimizer.wrt
        if bind is not None:
            bind(optimizer)
        graphdef, state = nnx.split(optimizer)
    else:
        if tx is None:
            raise missing_tx_error(ck, model)
        check_tx(tx, ck.where)
        if bind is not None:
            target = abstract_optimizer(model, tx, wrt)
            bind(target)
            graphdef, state = nnx.split(target)
        else:
            graphdef, state = optimizer_target(model, tx, wrt)
    restored, report = ck.restore("optimizer", state, strict=False, verify=verify,
                                  executor=executor, progress=progress, shardings=shardings)
    what = "the optimizer given" if optimizer is not None else "the new optimizer"

    def mismatch(note: str = "") -> OptimizerMismatchError:
        return OptimizerMismatchError(optimizer_mismatch(ck, model, list(FlatTree.of(state).leaves), report,
                                                         what=what, fresh=fresh_hint) + note)

    if not report.restored:
        raise mismatch(" (no leaf of the saved optimizer matches: refusing to return a freshly initialised one)")
    legacy_step = ck.legacy and report.missing == ["step"] and not (report.unexpected or report.mismatched)
    if not report.complete:
        if legacy_step:
            warnings.warn(f"{ck.where}: the original layout never saved optimizer.step: it starts at "
                          f"{'the value of the optimizer given' if optimizer is not None else 0} (the optax state, "
                          "Adam's count included, is restored)", stacklevel=3)
        elif strict:
            raise mismatch()
        else:
            warnings.warn(f"{ck.where}: optimizer state restored only where it matches {what} (strict=False); "
                          f"{report.describe()}", stacklevel=3)
    if optimizer is not None and not _abstract_keys(state):
        nnx.update(optimizer, restored if report.complete else only(restored, report.restored))
        return optimizer, report
    if report.complete:
        return restored_optimizer(graphdef, restored, tx), report
    fresh = nnx.Optimizer(model, tx, wrt=wrt)
    nnx.update(fresh, only(restored, report.restored))
    return fresh, report
