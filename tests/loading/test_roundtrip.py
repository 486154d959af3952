"""Round trips are bit for bit: every dtype, shape and tree shape; RNG keys and counters;
optimizer state; NaN payloads; and a resumed training run equals an uninterrupted one."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from conftest import LR, assert_bit_equal, assert_not_bit_equal, bits_of, make_optimizer, raw_bits, train_steps
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from shardckpt import CheckpointManager, LMModel, load_optimizer, save_optimizer
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items

# dtype -> can it live in a jax array (x64 is off)?
DTYPES = {
    np.dtype(np.float64): False,
    np.dtype(np.float32): True,
    np.dtype(np.float16): True,
    np.dtype(ml_dtypes.bfloat16): True,
    np.dtype(ml_dtypes.float8_e4m3fn): True,
    np.dtype(ml_dtypes.float8_e5m2): True,
    np.dtype(np.int8): True,
    np.dtype(np.int16): True,
    np.dtype(np.int32): True,
    np.dtype(np.int64): False,
    np.dtype(np.uint8): True,
    np.dtype(np.uint16): True,
    np.dtype(np.uint32): True,
    np.dtype(np.uint64): False,
    np.dtype(np.bool_): True,
    np.dtype(np.complex64): True,
    np.dtype(ml_dtypes.int4): True,
    np.dtype(ml_dtypes.uint4): True,
}
_SUB_BYTE = {np.dtype(ml_dtypes.int4): (-8, 7), np.dtype(ml_dtypes.uint4): (0, 15)}

PROFILE = settings(max_examples=30, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def arrays(draw):
    """Arrays of every dtype with arbitrary bit patterns (NaN payloads, -0.0, subnormals,
    float8 specials) and shapes including 0-d, empty and odd sizes; numpy or jax."""
    dtype = draw(st.sampled_from(sorted(DTYPES, key=str)))
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    n = int(np.prod(shape))
    if dtype == np.bool_:
        arr = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_)
    elif dtype in _SUB_BYTE:
        lo, hi = _SUB_BYTE[dtype]
        arr = np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), np.int8).astype(dtype)
    else:
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        arr = np.frombuffer(raw, np.uint8).view(dtype).copy()
    arr = arr.reshape(shape)
    if DTYPES[dtype] and draw(st.booleans()):
        return jnp.asarray(arr)
    return arr


_KEYS = st.text(st.characters(blacklist_characters=".", blacklist_categories=("Cs",)), max_size=6)
_SCALARS = (st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True, allow_infinity=True)
            | st.booleans() | st.text(max_size=5) | st.none())


def trees():
    return st.recursive(arrays() | _SCALARS,
                        lambda children: st.lists(children, max_size=3)
                        | st.dictionaries(_KEYS, children, max_size=3),
                        max_leaves=8)


def _kind(x):
    if isinstance(x, jax.Array):
        return "jax"
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    return type(x).__name__


@PROFILE
@given(tree=trees(), num_shards=st.integers(1, 5), compress=st.booleans())
def test_any_tree_round_trips_bit_exact(tmp_path_factory, tree, num_shards, compress):
    path = tmp_path_factory.mktemp("rt") / "ck"
    save_items(path, {"state": tree}, num_shards=num_shards, compress=compress)
    ck = Checkpoint(path)
    restored, report = ck.restore("state", tree)
    assert report.complete, report.describe()
    assert_bit_equal(restored, tree, "restore into concrete target")
    assert (jax.tree.map(_kind, restored) == jax.tree.map(_kind, tree))

    # Host arrays in their real dtypes, straight from the files.
    flat = bits_of(tree)
    host = ck.read_arrays("state")
    for k, v in host.items():
        assert (str(v.dtype), tuple(v.shape), raw_bits(v).tobytes()) == flat[k], k


@PROFILE
@given(tree=trees(), num_shards=st.integers(1, 4))
def test_restore_into_abstract_target(tmp_path_factory, tree, num_shards):
    """Targets built with eval_shape-style ShapeDtypeStructs get jax arrays, bit exact."""
    # x64 is off: 64-bit values cannot become jax arrays, so keep them out of this one.
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32) if getattr(x, "dtype", None) is not None
                        and np.dtype(x.dtype).itemsize == 8 and np.dtype(x.dtype).kind in "fiu" else x, tree)
    path = tmp_path_factory.mktemp("abs") / "ck"
    save_items(path, {"state": tree}, num_shards=num_shards)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "dtype") else x, tree)
    restored, report = Checkpoint(path).restore("state", abstract)
    assert report.complete
    assert_bit_equal(restored, tree, "restore into abstract target")
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored) if hasattr(x, "dtype"))


NAN_PAYLOADS = {
    np.float64: [0x7FF8000000000001, 0x7FF0000000000001, 0xFFF8DEADBEEF0001, 0x8000000000000000, 1],
    np.float32: [0x7FC00001, 0x7F800001, 0xFFC12345, 0x80000000, 0x00000001, 0x7F800000],
    np.float16: [0x7E01, 0x7C01, 0xFE55, 0x8000, 0x0001],
    ml_dtypes.bfloat16: [0x7FC1, 0x7F81, 0xFFC3, 0x8000, 0x0001],
    ml_dtypes.float8_e4m3fn: [0x7F, 0xFF, 0x80, 0x01],
    ml_dtypes.float8_e5m2: [0x7D, 0x7E, 0xFF, 0x7C, 0x80],
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("as_jax", [False, True])
def test_nan_payloads_preserved(tmp_path, compress, as_jax):
    tree = {}
    for dtype, bits in NAN_PAYLOADS.items():
        dtype = np.dtype(dtype)
        if as_jax and dtype.itemsize == 8:
            continue
        arr = np.array(bits, dtype=f"u{dtype.itemsize}").view(dtype)
        tree[dtype.name] = jnp.asarray(arr) if as_jax else arr
        assert raw_bits(tree[dtype.name]).tolist() == bits  # the payload survives the setup
    save_items(tmp_path / "ck", {"state": tree}, num_shards=2, compress=compress)
    restored, _ = Checkpoint(tmp_path / "ck").restore("state", tree)
    for name, arr in tree.items():
        assert raw_bits(restored[name]).tolist() == raw_bits(arr).tolist(), name


def test_rngs_keys_and_counters(tmp_path):
    rngs = nnx.Rngs(0, dropout=1, noise=jax.random.key(5, impl="rbg"))
    for _ in range(3):
        rngs.dropout()
    rngs.noise()
    saved = bits_of(rngs)
    save_items(tmp_path / "ck", {"rngs": nnx.state(rngs)})

    other = nnx.Rngs(9, dropout=8, noise=jax.random.key(7, impl="rbg"))
    restored, report = Checkpoint(tmp_path / "ck").restore("rngs", nnx.state(other))
    assert report.complete
    nnx.update(other, restored)
    assert_bit_equal(other, saved, "rngs")
    assert int(other.dropout.count[...]) == 3
    assert str(jax.random.key_impl(other.noise.key[...])) == str(jax.random.key_impl(rngs.noise.key[...]))
    # Both streams continue identically.
    for stream in ("default", "dropout", "noise"):
        a, b = getattr(rngs, stream)(), getattr(other, stream)()
        assert raw_bits(a).tobytes() == raw_bits(b).tobytes(), stream


def test_typed_key_arrays_of_several_impls(tmp_path):
    tree = {"threefry": jax.random.split(jax.random.key(1), 5),
            "rbg": jax.random.split(jax.random.key(2, impl="rbg"), (2, 3)),
            "scalar": jax.random.key(3, impl="unsafe_rbg"),
            "legacy_uint32": jax.random.PRNGKey(4)}
    save_items(tmp_path / "ck", {"keys": tree}, num_shards=3)
    restored, report = Checkpoint(tmp_path / "ck").restore("keys", tree)
    assert report.complete
    assert_bit_equal(restored, tree)
    for k in ("threefry", "rbg", "scalar"):
        assert str(jax.random.key_impl(restored[k])) == str(jax.random.key_impl(tree[k]))


def test_optimizer_state_and_step(tmp_path, model, optimizer):
    train_steps(model, optimizer, 3)
    saved = bits_of(optimizer)
    save_optimizer(tmp_path / "ck", optimizer, num_shards=3)
    restored = load_optimizer(tmp_path / "ck", model, optax.adamw(LR))
    assert int(restored.step[...]) == 3
    assert int(restored.opt_state[0].count[...]) == 3
    assert_bit_equal(restored, saved, "optimizer")
    # Also the raw item through the low-level API.
    fresh = nnx.state(make_optimizer(model))
    tree, report = Checkpoint(tmp_path / "ck").restore("optimizer", fresh)
    assert report.complete
    assert_bit_equal(tree, saved)


@pytest.mark.parametrize("num_shards", [None, 3])
def test_resume_is_bit_exact(tmp_path, dropout_config, num_shards):
    n_total, n_first, seed = 5, 2, 11

    # Uninterrupted run.
    ref_model = LMModel(dropout_config, rngs=nnx.Rngs(0))
    ref_opt = make_optimizer(ref_model)
    train_steps(ref_model, ref_opt, n_total, seed)

    # Interrupted run: k steps, save, throw everything away.
    model = LMModel(dropout_config, rngs=nnx.Rngs(0))
    opt = make_optimizer(model)
    train_steps(model, opt, n_first, seed)
    counts = [int(c[...]) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
    assert counts and all(c > 0 for c in counts)   # dropout consumed randomness
    CheckpointManager(tmp_path / "ck", num_shards=num_shards).save(n_first, model, opt)
    del model, opt

    # Everything fresh from the checkpoint.
    state = CheckpointManager(tmp_path / "ck", num_shards=num_shards).load_latest(tx=optax.adamw(LR))
    assert state.step == n_first
    train_steps(state.model, state.optimizer, n_total - n_first, seed)

    assert_bit_equal(state.model, ref_model, "params and RNG state")
    assert_bit_equal(nnx.state(state.model, nnx.Param), nnx.state(ref_model, nnx.Param), "params")
    assert_bit_equal(nnx.state(state.model, nnx.RngState), nnx.state(ref_model, nnx.RngState), "rng")
    assert_bit_equal(state.optimizer, ref_opt, "optimizer state")

    # The check has teeth: restoring the parameters but not the RNG state diverges.
    state2 = CheckpointManager(tmp_path / "ck").load_latest(tx=optax.adamw(LR))
    nnx.update(state2.model, nnx.state(LMModel(dropout_config, rngs=nnx.Rngs(1)), nnx.RngState))
    train_steps(state2.model, state2.optimizer, n_total - n_first, seed)
    assert_not_bit_equal(nnx.state(state2.model, nnx.Param), nnx.state(ref_model, nnx.Param))


def test_dtype_cast_on_load_and_bfloat16_model(tmp_path):
    from shardckpt import ModelConfig, load_model, save_model

    cfg = ModelConfig(param_dtype="bfloat16", dtype="bfloat16")
    m = LMModel(cfg, rngs=nnx.Rngs(2))
    save_model(tmp_path / "ck", m)
    loaded, _ = load_model(tmp_path / "ck")
    assert_bit_equal(loaded, m, "bfloat16 model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cast, _ = load_model(tmp_path / "ck", dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(cast, nnx.Param)))
