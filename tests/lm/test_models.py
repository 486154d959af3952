"""Tests for shardckpt.models (tiny configs only; the whole file runs in seconds)."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shardckpt.lm.models import LMModel, ModelConfig, count_params, lm_loss

# Eager execution compiles every op separately (slow on CPU), so forward
# passes go through nnx.jit and tests reuse one (batch, seq) shape where they can.
_forward = nnx.jit(lambda model, tokens: model(tokens))
_loss = nnx.jit(lm_loss)


@pytest.fixture(scope="module")
def tiny_model():
    return LMModel(ModelConfig(), rngs=nnx.Rngs(0))


def _tokens(batch=2, seq=16, vocab=256, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


def _param_paths(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)) for path, _ in flat}


# --------------------------------------------------------------------------- #
# forward pass
# --------------------------------------------------------------------------- #
def test_output_shape_and_dtype(tiny_model):
    model, cfg = tiny_model, tiny_model.config
    logits = _forward(model, _tokens(2, 16, cfg.vocab_size))
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Other batch/seq shapes, checked abstractly (no compile).
    out = nnx.eval_shape(lambda m, t: m(t), model, jnp.zeros((3, 5), jnp.int32))
    assert (out.shape, out.dtype) == ((3, 5, cfg.vocab_size), jnp.float32)


def test_rngs_positional_and_split_streams():
    cfg = ModelConfig()
    m1 = LMModel(cfg, nnx.Rngs(0))
    m2 = LMModel(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    # Shapes only (eval_shape traces without compiling); the two Rngs use
    # different stream names, so their parameter values legitimately differ.
    for m in (m1, m2):
        out = nnx.eval_shape(lambda m, t: m(t), m, _tokens())
        assert (out.shape, out.dtype) == ((2, 16, cfg.vocab_size), jnp.float32)
    assert m1.config is cfg


def test_causality(tiny_model):
    model, cfg = tiny_model, tiny_model.config
    tokens = _tokens(2, 16, cfg.vocab_size)
    changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % cfg.vocab_size)
    a, b = _forward(model, tokens), _forward(model, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :8]), np.asarray(b[:, :8]))
    assert not np.allclose(np.asarray(a[:, 8:]), np.asarray(b[:, 8:]))


def test_rope_makes_position_matter(tiny_model):
    # No learned positional embedding: the same token at different positions
    # must still get different logits (beyond position 0) through RoPE.
    tokens = jnp.tile(jnp.array([5, 7], dtype=jnp.int32), (2, 8))
    logits = _forward(tiny_model, tokens)
    assert not np.allclose(np.asarray(logits[0, 1]), np.asarray(logits[0, 3]))


def test_seq_len_and_input_checks(tiny_model):
    model, cfg = tiny_model, tiny_model.config
    # The checks fire at trace time, before anything is compiled.
    with pytest.raises(ValueError, match="max_seq_len"):
        _forward(model, jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="shape"):
        model(jnp.zeros((8,), jnp.int32))
    with pytest.raises(TypeError):
        model(jnp.zeros((1, 8), jnp.float32))


def test_tied_vs_untied_params():
    tied = LMModel(ModelConfig(tie_embeddings=True), rngs=nnx.Rngs(0))
    untied = LMModel(ModelConfig(tie_embeddings=False), rngs=nnx.Rngs(0))
    tied_paths, untied_paths = _param_paths(tied), _param_paths(untied)
    assert "embed/embedding" in tied_paths
    assert not any(p.startswith("lm_head") for p in tied_paths)
    assert untied_paths - tied_paths == {"lm_head/kernel"}
    cfg = tied.config
    assert count_params(untied) - count_params(tied) == cfg.hidden_size * cfg.vocab_size
    out = nnx.eval_shape(lambda m, t: m(t), untied, _tokens())
    assert (out.shape, out.dtype) == ((2, 16, cfg.vocab_size), jnp.float32)


# --------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------- #
def test_config_roundtrip_json():
    cfg = ModelConfig(hidden_size=96, n_heads=6, dropout=0.1, tie_embeddings=False,
                      param_dtype="bfloat16")
    d = cfg.to_dict()
    assert isinstance(d, dict)
    restored = ModelConfig.from_dict(json.loads(json.dumps(d)))
    assert restored == cfg
    # None is resolved to a concrete SwiGLU width (multiple of 8, ~8/3 * hidden).
    assert isinstance(cfg.intermediate_size, int)
    assert cfg.intermediate_size % 8 == 0
    assert abs(cfg.intermediate_size - 8 / 3 * 96) < 8


def test_config_from_dict_unknown_keys_warn():
    d = ModelConfig().to_dict()
    d["future_field"] = 123
    with pytest.warns(UserWarning, match="future_field"):
        cfg = ModelConfig.from_dict(d)
    assert cfg == ModelConfig()


def test_config_from_dict_no_warning_for_known_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_dict(ModelConfig().to_dict())


def test_config_from_dict_missing_keys_use_defaults():
    assert ModelConfig.from_dict({"hidden_size": 32, "n_heads": 2}) == ModelConfig(
        hidden_size=32, n_heads=2)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 65}, "hidden_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"n_layers": 2.5}, "n_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"dtype": "int32"}, "dtype"),
        ({"param_dtype": "nonsense"}, "param_dtype"),
        ({"hidden_size": 12, "n_heads": 4}, "head_dim"),  # head_dim 3 is odd: no RoPE
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**overrides)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**ModelConfig().to_dict(), **overrides})


def test_config_is_hashable_and_frozen():
    cfg = ModelConfig()
    assert hash(cfg) == hash(ModelConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 8  # type: ignore[misc]


def test_presets():
    assert ModelConfig.preset("tiny") == ModelConfig()
    assert ModelConfig.preset("tiny", n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    small = nnx.eval_shape(lambda: LMModel(ModelConfig.preset("small"), rngs=nnx.Rngs(0)))
    assert 8_000_000 <= count_params(small) <= 12_000_000


def test_100m_preset_param_count_abstract():
    cfg = ModelConfig.preset("100m")
    abstract = nnx.eval_shape(lambda: LMModel(cfg, rngs=nnx.Rngs(0)))
    n = count_params(abstract)
    assert 90_000_000 <= n <= 130_000_000
    # Abstract: no real buffers were allocated.
    leaf = jax.tree.leaves(nnx.state(abstract, nnx.Param))[0]
    assert isinstance(leaf, jax.ShapeDtypeStruct)


# --------------------------------------------------------------------------- #
# determinism, dropout, training
# --------------------------------------------------------------------------- #
def test_same_seed_same_model():
    cfg = ModelConfig(dropout=0.1)
    a = nnx.state(LMModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    b = nnx.state(LMModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    c = nnx.state(LMModel(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, c))
    assert any(diffs)


def test_dropout_train_random_eval_deterministic():
    # 1 layer keeps the three compiles below (train, flag, eval graphs) cheap.
    cfg = ModelConfig(dropout=0.2, n_layers=1)
    model = LMModel(cfg, rngs=nnx.Rngs(0))  # dropout falls back to the default stream
    tokens = _tokens()

    # Train mode (the default): the dropout RNG state advances between calls.
    a, b = _forward(model, tokens), _forward(model, tokens)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # An explicit flag overrides the module mode.
    forward_det = nnx.jit(lambda m, t: m(t, deterministic=True))
    np.testing.assert_array_equal(np.asarray(forward_det(model, tokens)),
                                  np.asarray(forward_det(model, tokens)))

    model.eval()
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens)),
                                  np.asarray(_forward(model, tokens)))
    model.train()
    assert not np.allclose(np.asarray(_forward(model, tokens)),
                           np.asarray(_forward(model, tokens)))


def test_dropout_masks_reproducible_from_seed():
    cfg = ModelConfig(dropout=0.2, n_layers=1)
    tokens = _tokens()
    m1 = LMModel(cfg, rngs=nnx.Rngs(params=0, dropout=7))
    m2 = LMModel(cfg, rngs=nnx.Rngs(params=0, dropout=7))
    first = [_forward(m, tokens) for m in (m1, m2)]
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(first[1]))
    # ...and the masks still change from step to step.
    assert not np.allclose(np.asarray(_forward(m1, tokens)), np.asarray(first[0]))


def test_dropout_requires_a_usable_stream():
    with pytest.raises(ValueError, match="dropout"):
        LMModel(ModelConfig(dropout=0.1), rngs=nnx.Rngs(params=0))
    # Without dropout, a params-only Rngs is fine and no RNG state is stored.
    model = LMModel(ModelConfig(), rngs=nnx.Rngs(params=0))
    assert not jax.tree.leaves(nnx.state(model, nnx.RngState))


def test_training_reduces_loss():
    cfg = ModelConfig()
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    tokens = _tokens(4, 32, cfg.vocab_size, seed=3)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(lm_loss)(model, tokens)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, tokens)) for _ in range(10)]
    assert all(np.isfinite(losses))
    # Fresh model: loss starts near the uniform-prediction loss log(vocab).
    assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.5
    assert losses[-1] < losses[0] - 0.1


def test_abstract_construction_matches_concrete():
    cfg = ModelConfig(tie_embeddings=False)
    abstract = nnx.eval_shape(lambda: LMModel(cfg, rngs=nnx.Rngs(0)))
    concrete = LMModel(cfg, rngs=nnx.Rngs(0))
    assert count_params(abstract) == count_params(concrete)
    sa = nnx.state(abstract, nnx.Param)
    sc = nnx.state(concrete, nnx.Param)
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), sa)
            == jax.tree.map(lambda x: (x.shape, x.dtype), sc))


def test_bfloat16():
    cfg = ModelConfig(dtype="bfloat16", param_dtype="bfloat16")
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    out = nnx.eval_shape(lambda m, t: m(t), model, _tokens())
    assert out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    loss = _loss(model, _tokens())
    assert bool(jnp.isfinite(loss))
    assert abs(float(loss) - np.log(cfg.vocab_size)) < 0.5


def test_bfloat16_params_float32_compute():
    cfg = ModelConfig(dtype="float32", param_dtype="bfloat16")
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    out = nnx.eval_shape(lambda m, t: m(t), model, _tokens())
    assert out.dtype == jnp.float32
