"""A tiny, deterministic LMModel training loop: the demo's and the tests' workload.

Everything that decides the next step (parameters, optimizer moments, dropout RNG state,
the data) is either in the checkpoint or a pure function of the step number, so a run that
is killed and resumed from a checkpoint must end bit-identical to one that never stopped.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shardckpt.lm.models import LMModel, ModelConfig, lm_loss

DEMO_CONFIG = ModelConfig(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, max_seq_len=32,
                          dropout=0.1)
BATCH, SEQ = 4, 32


def make_tx() -> optax.GradientTransformation:
    return optax.adamw(3e-3)


def new_run(config: ModelConfig = DEMO_CONFIG, seed: int = 0) -> tuple[LMModel, nnx.Optimizer]:
    model = LMModel(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, make_tx(), wrt=nnx.Param)


def batch_for_step(step: int, config: ModelConfig = DEMO_CONFIG) -> jax.Array:
    """The data of ``step``: a pure function of the step (a resumable data pipeline)."""
    rng = np.random.default_rng(1000 + step)
    return jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, SEQ), dtype=np.int32))


@nnx.jit
def train_step(model: LMModel, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lm_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss


def state_digest(*modules: Any) -> str:
    """SHA-256 over the raw bytes of every leaf (PRNG keys by their key data): equal
    digests mean bit-identical states."""
    h = hashlib.sha256()
    for module in modules:
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]:
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            arr = np.asarray(leaf)
            h.update(jax.tree_util.keystr(path).encode())
            h.update(str(arr.dtype).encode())
            h.update(arr.tobytes())
    return h.hexdigest()
