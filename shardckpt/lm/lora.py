"""LoRA fine-tuning of the reference model: adapters on the attention projections, the
base frozen. The workload of incremental saves (a few MB change per step, the rest never),
written as a Flax user would, with ``nnx.LoRA``.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from shardckpt.lm.models import LMModel, lm_loss

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(model: LMModel, rank: int = 8, rngs: nnx.Rngs | None = None) -> LMModel:
    """Wrap each attention projection of ``model`` in ``nnx.LoRA(base_module=...)`` (in
    place; returns the model). The adapters are ``nnx.LoRAParam``s; the base stays
    ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only them.
    ``B`` starts at zero: the wrapped model computes what the base computed."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    h = model.config.hidden_size
    dtype, param_dtype = model.config.jnp_dtype, model.config.jnp_param_dtype
    for block in model.layers:
        for name in PROJECTIONS:
            base = getattr(block.attn, name)
            setattr(block.attn, name, nnx.LoRA(h, rank, h, base_module=base, dtype=dtype,
                                               param_dtype=param_dtype, rngs=rngs))
    return model


def lora_optimizer(model: LMModel, tx: optax.GradientTransformation | None = None) -> nnx.Optimizer:
    """An optimizer over the adapters only."""
    return nnx.Optimizer(model, tx if tx is not None else optax.adamw(1e-3), wrt=nnx.LoRAParam)


@jax.jit
def _lora_step(graphdef, lora, frozen, rest, opt_graphdef, opt_state, tokens):
    model = nnx.merge(graphdef, lora, frozen, rest)
    optimizer = nnx.merge(opt_graphdef, opt_state)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss, grads = nnx.value_and_grad(lm_loss, argnums=diff)(model, tokens)
    optimizer.update(model, grads)
    return loss, nnx.state(model, nnx.LoRAParam), nnx.state(model, nnx.Not(nnx.Param)), nnx.state(optimizer)


def lora_train_step(model: LMModel, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    """One step updating the adapters only (gradients with respect to ``nnx.LoRAParam``).

    The frozen base goes into the step but not out of it (``nnx.jit`` would hand every
    variable back as a new array): the base's arrays stay the same objects from step to
    step, which an incremental save knows unchanged without hashing them again."""
    graphdef, lora, frozen, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    opt_graphdef, opt_state = nnx.split(optimizer)
    loss, lora, rest, opt_state = _lora_step(graphdef, lora, frozen, rest, opt_graphdef, opt_state, tokens)
    nnx.update(model, lora, rest)
    nnx.update(optimizer, opt_state)
    return loss
