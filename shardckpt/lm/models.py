"""A small decoder-only transformer language model used to exercise checkpointing.

The model is deliberately "real" (embeddings, RoPE attention, SwiGLU MLP,
RMSNorm, dropout with its own RNG state, optional weight tying) so that its
state has the same kinds of leaves a production model has: parameters of
several shapes and dtypes, shared (tied) variables, and ``nnx.RngState``
(dropout key + counter).  A checkpointing library that round-trips this model
exactly is likely to round-trip bigger ones too.

Public API::

    ModelConfig            # plain dataclass, JSON-serialisable via to_dict()/from_dict()
    ModelConfig.preset(name, **overrides)   # "tiny", "small", "100m"
    LMModel(config, rngs=nnx.Rngs(0))       # nnx.Module
    count_params(model) -> int
    lm_loss(model, tokens) -> scalar
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["ModelConfig", "LMModel", "count_params", "lm_loss", "PRESETS"]

# Floating dtypes accepted for ``dtype`` / ``param_dtype``.  Kept as names
# (not dtype objects) so that the config stays JSON-safe.
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _default_intermediate_size(hidden_size: int, multiple_of: int = 8) -> int:
    """SwiGLU hidden width: ~8/3 * hidden, rounded up to a multiple of 8.

    8/3 keeps the parameter count of the 3-matrix SwiGLU MLP equal to a
    classic 4x GELU MLP; rounding to a multiple of 8 keeps matmuls friendly
    to accelerators and shardable.
    """
    raw = int(8 * hidden_size / 3)
    return multiple_of * math.ceil(raw / multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`LMModel`.

    The dataclass is frozen (hence hashable) because it is stored on the
    module as *static* metadata: ``nnx.jit`` and friends hash the graph
    definition, and a mutable config silently changing under a compiled
    function would be a bug.  Use :func:`dataclasses.replace` to derive
    variants.

    ``intermediate_size=None`` is resolved in ``__post_init__`` to a concrete
    integer, so that ``to_dict()`` always records the actual MLP width; a
    checkpoint must not depend on a default formula that a later version of
    this library might change.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    intermediate_size: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    # ------------------------------------------------------------------ #
    # validation
    # ------------------------------------------------------------------ #
    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            # Validate hidden_size first so the computed default is meaningful.
            _check_int(self, "hidden_size", minimum=1)
            object.__setattr__(
                self, "intermediate_size", _default_intermediate_size(self.hidden_size)
            )
        # Coerce dtype-like values (e.g. jnp.bfloat16) to canonical names so
        # the config stays JSON-safe and comparable.
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, _canonical_dtype_name(self, name))
        # JSON has a single number type: accept ints for float fields.
        for name in ("dropout", "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"ModelConfig.{name} must be a float, got {value!r}"
                )
            object.__setattr__(self, name, float(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if the config is unusable."""
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads",
                     "max_seq_len", "intermediate_size"):
            _check_int(self, name, minimum=1)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}"
            )
        if self.hidden_size % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible "
                f"by n_heads ({self.n_heads})"
            )
        if self.head_dim % 2 != 0:
            # RoPE rotates pairs of features.
            raise ValueError(
                f"ModelConfig.hidden_size / n_heads (head_dim={self.head_dim}) "
                "must be even for rotary position embeddings"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")

    # ------------------------------------------------------------------ #
    # derived values
    # ------------------------------------------------------------------ #
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def jnp_dtype(self) -> jnp.dtype:
        """Compute dtype as a ``jnp.dtype``."""
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        """Parameter storage dtype as a ``jnp.dtype``."""
        return jnp.dtype(self.param_dtype)

    # ------------------------------------------------------------------ #
    # (de)serialisation
    # ------------------------------------------------------------------ #
    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of JSON-native values (int/float/bool/str)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build a config from ``to_dict()`` output (e.g. read from a checkpoint).

        Unknown keys are dropped with a warning rather than an error so that a
        checkpoint written by a newer version (which may have added fields)
        can still be loaded.  Missing keys take their defaults, which is what
        lets older checkpoints load.  Values are validated.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"ModelConfig.from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            warnings.warn(
                f"ModelConfig.from_dict: ignoring unknown keys {unknown} "
                "(checkpoint written by a newer version?)",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Named configurations; keyword ``overrides`` replace preset fields.

        * ``"tiny"``:  the defaults (~0.1M params), for unit tests.
        * ``"small"``: ~10M params, for quick demos on CPU.
        * ``"100m"``:  ~110M params (GPT-2-small-like shapes), for benchmarks.
        """
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown ModelConfig preset {name!r}; available: {sorted(PRESETS)}"
            ) from None
        return cls(**{**base, **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": dict(vocab_size=8192, hidden_size=256, n_layers=10, n_heads=4, max_seq_len=512),
    "100m": dict(vocab_size=32000, hidden_size=768, n_layers=12, n_heads=12, max_seq_len=1024),
}


def _check_int(cfg: ModelConfig, name: str, *, minimum: int) -> None:
    value = getattr(cfg, name)
    # bool is an int subclass; a bool here is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ModelConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"ModelConfig.{name} must be >= {minimum}, got {value}")


def _canonical_dtype_name(cfg: ModelConfig, name: str) -> str:
    value = getattr(cfg, name)
    try:
        canonical = jnp.dtype(value).name
    except TypeError:
        canonical = None
    if canonical not in _FLOAT_DTYPES:
        raise ValueError(
            f"ModelConfig.{name} must be one of {list(_FLOAT_DTYPES)}, got {value!r}"
        )
    return canonical


# ---------------------------------------------------------------------- #
# model
# ---------------------------------------------------------------------- #
def _rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Apply rotary position embeddings to ``x`` of shape [batch, seq, heads, head_dim].

    Computed on the fly from integer positions rather than stored as a buffer:
    it has no state, so nothing position-related needs checkpointing, and the
    model is not tied to a table size.  Uses the "rotate half" layout
    (GPT-NeoX / LLaMA).  Trig is done in float32 for accuracy under bf16.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [seq, half]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dropout_rngs(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Rngs | None:
    """Rngs handed to ``nnx.Dropout``, or None when dropout is disabled.

    With ``dropout == 0`` no RNG state is created at all, so the checkpoint of
    a dropout-free model contains only parameters.  With ``dropout > 0`` the
    ``dropout`` stream (or the ``default`` stream that ``nnx.Rngs(0)``
    provides, which nnx falls back to) must exist; each Dropout forks its own
    stream so its key/counter live in the model state and are checkpointed.
    """
    if config.dropout == 0.0:
        return None
    try:
        rngs["dropout"]
    except KeyError:
        raise ValueError(
            f"ModelConfig.dropout={config.dropout} > 0 needs a 'dropout' (or 'default') "
            "RNG stream, e.g. nnx.Rngs(params=0, dropout=1) or nnx.Rngs(0)"
        ) from None
    return rngs


class Attention(nnx.Module):
    """Causal multi-head self-attention with RoPE, written with plain jnp ops.

    Separate q/k/v/o projections (no bias) rather than a fused qkv matrix, so
    each parameter has an obvious name and a shape that shards cleanly along
    the head dimension.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.dtype = config.jnp_dtype
        kw = dict(use_bias=False, dtype=config.jnp_dtype,
                  param_dtype=config.jnp_param_dtype, rngs=rngs)
        h = config.hidden_size
        self.q_proj = nnx.Linear(h, h, **kw)
        self.k_proj = nnx.Linear(h, h, **kw)
        self.v_proj = nnx.Linear(h, h, **kw)
        self.o_proj = nnx.Linear(h, h, **kw)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        def split(t):
            return t.reshape(b, s, self.n_heads, self.head_dim)
        q = _rope(split(self.q_proj(x)), positions, self.rope_theta)
        k = _rope(split(self.k_proj(x)), positions, self.rope_theta)
        v = split(self.v_proj(x))
        # Scores and softmax in float32: bf16 softmax over long rows loses
        # too much precision.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                            preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(self.head_dim)
        causal = jnp.tril(jnp.ones((s, s), dtype=jnp.bool_))
        scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1)
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=config.jnp_dtype,
                  param_dtype=config.jnp_param_dtype, rngs=rngs)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(h, i, **kw)
        self.up_proj = nnx.Linear(h, i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm transformer block: x + drop(attn(norm(x))); x + drop(mlp(norm(x)))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm_kw = dict(epsilon=config.norm_eps, dtype=config.jnp_dtype,
                       param_dtype=config.jnp_param_dtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(config.hidden_size, **norm_kw)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(config.hidden_size, **norm_kw)
        self.mlp = MLP(config, rngs=rngs)
        drop_rngs = _dropout_rngs(config, rngs)
        self.attn_dropout = nnx.Dropout(config.dropout, rngs=drop_rngs)
        self.mlp_dropout = nnx.Dropout(config.dropout, rngs=drop_rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, *,
                 deterministic: bool | None = None) -> jax.Array:
        h = self.attn(self.attn_norm(x), positions)
        x = x + self.attn_dropout(h, deterministic=deterministic)
        h = self.mlp(self.mlp_norm(x))
        x = x + self.mlp_dropout(h, deterministic=deterministic)
        return x


class LMModel(nnx.Module):
    """Decoder-only transformer LM.

    ``LMModel(config, rngs=nnx.Rngs(0))``; ``rngs`` may also be passed
    positionally.  Parameters are drawn from the ``params`` stream (or
    ``default``); dropout keys from ``dropout`` (or ``default``), so the same
    ``Rngs`` seeds give bit-identical models and dropout masks.

    The config is kept as static metadata (``self.config``), not as state: it
    is part of the graph definition, and checkpoints should store it via
    ``config.to_dict()``.

    Train/eval: dropout follows ``model.train()`` / ``model.eval()`` unless
    ``deterministic`` is passed to ``__call__``, which takes precedence.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        if isinstance(config, Mapping):
            config = ModelConfig.from_dict(config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size, config.hidden_size,
            dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
            # Small init (GPT-2 style): with tied weights the same matrix is
            # the output head, and unit-variance rows would give huge initial
            # logits (~sqrt(hidden)) and a loss far above log(vocab).
            embedding_init=nnx.initializers.normal(stddev=0.02),
            rngs=rngs,
        )
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = nnx.RMSNorm(
            config.hidden_size, epsilon=config.norm_eps, dtype=config.jnp_dtype,
            param_dtype=config.jnp_param_dtype, rngs=rngs,
        )
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False,
                dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype, rngs=rngs,
            )

    def __call__(self, tokens: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """int ``[batch, seq]`` tokens -> float32 ``[batch, seq, vocab]`` logits."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be an integer array, got dtype {tokens.dtype}")
        seq_len = tokens.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds ModelConfig.max_seq_len "
                f"({self.config.max_seq_len})"
            )
        positions = jnp.arange(seq_len, dtype=jnp.int32)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions, deterministic=deterministic)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        # float32 logits regardless of compute dtype: the loss needs them.
        return logits.astype(jnp.float32)


# ---------------------------------------------------------------------- #
# helpers
# ---------------------------------------------------------------------- #
def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` only; RNG state excluded).

    Works on abstract models from ``nnx.eval_shape`` too, since only shapes
    are read.  Tied weights are counted once because they are one variable.
    """
    params = nnx.state(model, nnx.Param)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def lm_loss(model: LMModel, tokens: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """Mean next-token cross-entropy over all predicted positions.

    ``tokens[:, :-1]`` is the input and ``tokens[:, 1:]`` the target, so a
    ``[batch, seq]`` batch yields ``batch * (seq - 1)`` predictions.

    ``deterministic`` is deliberately positional-or-keyword, not keyword-only:
    ``nnx.grad`` / ``nnx.value_and_grad`` (flax 0.12) reject functions with
    keyword-only parameters ("keyword arguments could not be resolved to
    positions").
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape [batch, seq>=2], got {tokens.shape}")
    logits = model(tokens[:, :-1], deterministic=deterministic)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return losses.mean()
