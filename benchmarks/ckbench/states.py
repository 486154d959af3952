"""The states a run checkpoints, each an nnx model plus its AdamW optimizer.

Every state is described by a JSON-able ``spec`` so that a fresh subprocess (peak-memory
measurements) rebuilds exactly the same state or its abstract target. All floating arrays,
the Adam moments included, are filled with non-zero values, so no format gains by
compressing zeros.

* ``lm``: the guide's ``LMModel`` (a preset, or the shape closest to ``--size-params``).
* ``many_small``: ~5,000 small arrays in all (params, mu, nu), mixed 1-D/2-D shapes.
* ``few_huge``: three huge parameter matrices (nine arrays with mu and nu).

Add a state: write ``spec_<kind>(total_bytes, args) -> spec`` and the two builders, and add
the kind to ``KINDS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import common

BYTES_PER_PARAM = 12     # fp32 param + fp32 Adam mu + fp32 Adam nu


# --------------------------------------------------------------------------------------------
# LMModel
# --------------------------------------------------------------------------------------------

def config_for(size_params: int | None, preset: str):
    """A ModelConfig: the preset, or the LMModel shape closest to ``size_params``."""
    from shardckpt.lm.models import ModelConfig
    if not size_params:
        return ModelConfig.preset(preset)
    best = None
    for h in (64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 3072, 4096):
        inter = 8 * math.ceil(int(8 * h / 3) / 8)
        per_layer = 2 * h + 4 * h * h + 3 * h * inter
        for vocab in (32000, 8192, 2048, 512):
            base = vocab * h + h
            layers = round((size_params - base) / per_layer)
            if layers < 1:
                continue
            err = abs(base + layers * per_layer - size_params) / size_params
            # within 5 %, prefer transformer-like shapes: ~12 layers, a real vocabulary
            score = (err > 0.05, abs(math.log(layers / 12)) + (0.5 if vocab < 8192 else 0), err)
            if best is None or score < best[0]:
                best = (score, h, layers, vocab)
    if best is None:
        raise SystemExit(f"--size-params {size_params}: too small for an LMModel")
    _, h, layers, vocab = best
    return ModelConfig(vocab_size=vocab, hidden_size=h, n_layers=layers, n_heads=max(1, h // 64),
                       max_seq_len=1024)


def lm_param_count(cfg) -> int:
    """Parameters of an LMModel, from its abstract shape (nothing allocated)."""
    import jax
    from flax import nnx

    from shardckpt.lm.models import LMModel
    abs_model = nnx.eval_shape(lambda: LMModel(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abs_model, nnx.Param)))


def _lm_model(spec):
    from flax import nnx

    from shardckpt.lm.models import LMModel, ModelConfig
    return LMModel(ModelConfig.from_dict(spec["model_config"]), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# banks of plain parameters (many small / few huge)
# --------------------------------------------------------------------------------------------

def _array_bank_cls():
    from flax import nnx

    class ArrayBank(nnx.Module):
        """A module that is nothing but a list of parameters of the given shapes."""

        def __init__(self, shapes, rngs):
            self.w = nnx.List([nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), tuple(s)))
                               for s in shapes])

    return ArrayBank


def bank_shapes(spec) -> list[tuple[int, ...]]:
    """Deterministic shapes: ``n_params`` arrays of ~``param_bytes`` each (fp32), sizes
    varying 0.25x..2x around the mean, every other one 2-D."""
    n, mean_elems = spec["n_params"], max(1, spec["param_bytes"] // 4)
    factors = (0.25, 0.5, 1.25, 2.0)
    shapes = []
    for i in range(n):
        e = max(1, int(mean_elems * factors[i % 4]))
        if i % 2 and e >= 64:
            shapes.append((e // 64, 64))
        elif spec.get("cols") and e >= spec["cols"]:
            shapes.append((e // spec["cols"], spec["cols"]))
        else:
            shapes.append((e,))
    return shapes


def _bank_model(spec):
    from flax import nnx
    return _array_bank_cls()(bank_shapes(spec), rngs=nnx.Rngs(0))


def spec_lm(total_bytes: int | None, args) -> dict:
    cfg = config_for(args.size_params, args.preset)
    return {"kind": "lm", "model_config": cfg.to_dict()}


def spec_many_small(total_bytes: int, args) -> dict:
    n_params = max(1, args.small_arrays // 3)          # each parameter has mu and nu
    return {"kind": "many_small", "n_params": n_params,
            "param_bytes": max(4, total_bytes // BYTES_PER_PARAM * 4 // n_params)}


def spec_few_huge(total_bytes: int, args) -> dict:
    n_params = 3
    return {"kind": "few_huge", "n_params": n_params, "cols": 1024,
            "param_bytes": max(4096, total_bytes // BYTES_PER_PARAM * 4 // n_params)}


KINDS = {  # kind -> (spec builder, model builder, description)
    "lm": (spec_lm, _lm_model, "LMModel + AdamW"),
    "many_small": (spec_many_small, _bank_model, "many small arrays + AdamW"),
    "few_huge": (spec_few_huge, _bank_model, "a few huge arrays + AdamW"),
}


# --------------------------------------------------------------------------------------------
# the state object
# --------------------------------------------------------------------------------------------

def _optimizer(model):
    import optax
    from flax import nnx
    return nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)


def build_model_opt(spec):
    """The model and its AdamW optimizer, every floating array non-zero (Adam moments too)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = KINDS[spec["kind"]][1](spec)
    opt = _optimizer(model)
    state = nnx.state(opt)
    key = jax.random.key(1)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    new = []
    for i, x in enumerate(leaves):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim:
            x = (jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) * 1e-3).astype(x.dtype)
        new.append(x)
    nnx.update(opt, jax.tree_util.tree_unflatten(treedef, new))
    jax.block_until_ready(nnx.state(opt))
    return model, opt


def abstract_targets(spec) -> dict:
    """``{"model": ..., "optimizer": ...}`` of abstract arrays, built with ``nnx.eval_shape``."""
    from flax import nnx
    build = KINDS[spec["kind"]][1]
    abs_model = nnx.eval_shape(lambda: build(spec))
    abs_opt = nnx.eval_shape(_optimizer, abs_model)
    return {"model": nnx.state(abs_model), "optimizer": nnx.state(abs_opt)}


def flat_host_arrays(items: dict) -> dict[str, Any]:
    """Dotted key -> host numpy view (zero-copy on CPU) of every array leaf."""
    import jax
    import numpy as np
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(items)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        out[key] = np.asarray(leaf)
    return out


def tree_nbytes(tree) -> int:
    import jax
    return sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))


@dataclass
class State:
    """One state of a run. ``items`` is what Orbax and numpy save; shardckpt saves ``model``
    and ``opt`` through its manager (the same arrays). ``targets`` is abstract."""

    name: str
    spec: dict
    model: Any = None
    opt: Any = None
    items: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    nbytes: int = 0
    n_arrays: int = 0
    params: int = 0

    @classmethod
    def build(cls, name: str, spec: dict) -> State:
        import jax
        from flax import nnx
        model, opt = build_model_opt(spec)
        items = {"model": nnx.state(model), "optimizer": nnx.state(opt)}
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        return cls(name, spec, model, opt, items, abstract_targets(spec), tree_nbytes(items),
                   len(jax.tree.leaves(items)), params)

    @classmethod
    def abstract(cls, name: str, spec: dict) -> State:
        """Only the abstract target (a restore in a fresh process needs nothing else)."""
        return cls(name, spec, targets=abstract_targets(spec))

    def describe(self) -> str:
        return (f"{self.name}: {KINDS[self.spec['kind']][2]}, {self.params / 1e6:.1f}M params, "
                f"{self.n_arrays} arrays, {self.nbytes / common.GB:.3f} GB")


def make_specs(names: list[str], args) -> dict[str, dict]:
    """Specs of the requested states. The non-LM states get the LM state's byte size (so
    GB/s compare across states) unless ``--state-bytes`` is given."""
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise SystemExit(f"--states: unknown {unknown} (known: {', '.join(KINDS)})")
    lm = spec_lm(None, args)
    from shardckpt.lm.models import ModelConfig
    total = args.state_bytes or BYTES_PER_PARAM * lm_param_count(ModelConfig.from_dict(lm["model_config"]))
    return {n: (lm if n == "lm" else KINDS[n][0](int(total), args)) for n in names}
