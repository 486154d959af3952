"""A leaf saved as a Python scalar never lands where the target holds an array (#17.8).

A checkpoint can hold ``embed.embedding`` as a scalar leaf: written honestly by our own
writer from a state dict whose leaf is a string, or by a hostile writer who moves the array
into the manifest's scalars and reseals it. Either way a restore into a model must not
return an ``nnx.Param`` holding that string (or an int, or None): the array-vs-scalar kind
is compared with the target's, and the key is named. A number does fit a 0-d target (what
``jax.eval_shape`` makes of a Python number) when the target's dtype holds it.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
import xxhash
from flax import nnx

from shardckpt import CheckpointManager, LMModel, ModelConfig, StructureMismatchError, load_model, restore, save, save_model
from shardckpt.format.manifest import seal_manifest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import dump_index_v1

KEY = "embed.embedding"


def _state_with(model: nnx.Module, key: str, value) -> dict:
    """The module's state as a pure dict with the leaf at dotted ``key`` replaced."""
    state = nnx.to_pure_dict(nnx.state(model))
    node = state
    *parents, last = key.split(".")
    for part in parents:
        node = node[part] if part in node else node[int(part)]     # nnx.List positions are ints
    node[last] = value
    return state


def _honest(tmp_path, model, value):
    """Our own writer, given a state dict whose ``embed.embedding`` is ``value``."""
    return save_model(tmp_path / "honest", _state_with(model, KEY, value), config=model.config)


def _resealed(tmp_path, model, value):
    """A hostile writer: a real checkpoint whose array ``embed.embedding`` is moved into the
    scalars (its index rows removed), every checksum made consistent again."""
    path = save_model(tmp_path / "hostile", model)
    m = json.loads((path / "manifest.json").read_text())
    m.pop("checksum")
    del m["items"]["model"]["arrays"][KEY]
    m["items"]["model"].get("digests", {}).pop(KEY, None)    # a careful forger drops its digest too
    m["items"]["model"]["scalars"][KEY] = {"type": type(value).__name__ if value is not None else "none",
                                           "value": value}
    index = {item: {k: rows for k, rows in keys.items() if k != KEY}
             for item, keys in Checkpoint(path).index().items()}
    raw = dump_index_v1(index)
    (path / m["index"]).write_bytes(raw)
    m["meta_files"][m["index"]] = {"size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    assert msgpack.unpackb(raw, raw=False)["version"] == 1
    return path


@pytest.mark.parametrize("value", ["pwned", 5, 2.5, True, None], ids=["str", "int", "float", "bool", "none"])
@pytest.mark.parametrize("writer", [_honest, _resealed], ids=["our-writer", "resealed-manifest"])
def test_a_scalar_never_becomes_a_parameter(tmp_path, model, writer, value):
    path = writer(tmp_path, model, value)
    other = LMModel(ModelConfig(), rngs=nnx.Rngs(7))
    before = np.asarray(other.embed.embedding[...]).copy()
    manager = CheckpointManager(tmp_path / "run")
    # None is no jax leaf: our writer leaves the key out (a missing parameter, refused by name)
    why = (rf"missing from the checkpoint: {KEY}" if value is None and writer is _honest else
           rf"{KEY}: saved a Python \w+ scalar, the target holds an array \(256, 64\) float32")
    loads = {
        "load_model": lambda: load_model(path),
        "load_model(model=)": lambda: load_model(path, model=other),
        "manager.load": lambda: manager.load(path),
        "restore(abstract state)": lambda: restore(path, nnx.state(nnx.eval_shape(lambda: LMModel(ModelConfig(),
                                                                                               rngs=nnx.Rngs(0))))),
        "restore(module)": lambda: restore(path, other),
    }
    for what, load in loads.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(StructureMismatchError, match=why) as e:
                load()
        assert "pwned" not in str(e.value), what          # the message names the key, never the value
    np.testing.assert_array_equal(np.asarray(other.embed.embedding[...]), before)   # not half-filled


def test_a_number_fits_a_zero_d_target_of_a_dtype_that_holds_it(tmp_path):
    """``jax.eval_shape`` turns Python numbers into 0-d ShapeDtypeStructs: they restore as
    0-d arrays of the target's dtype; a string, a number the dtype cannot hold (out of
    range, wrapped) or a target that is not 0-d is refused by key; a rounding warns."""
    tree = {"step": 5, "lr": 0.5, "flag": True, "name": "run", "none": None, "big": 2 ** 40, "neg": -1,
            "third": 1 / 3, "huge": 1e10}
    save(tmp_path / "c", tree)
    got = restore(tmp_path / "c", {"step": jax.ShapeDtypeStruct((), jnp.int32), "lr": jax.ShapeDtypeStruct((), jnp.float32),
                                   "flag": jax.ShapeDtypeStruct((), jnp.bool_), "name": "", "none": None, "big": 0,
                                   "neg": np.zeros((), np.int8), "third": 0.0, "huge": 0.0})
    assert isinstance(got["step"], jax.Array) and got["step"].dtype == jnp.int32 and int(got["step"]) == 5
    assert got["lr"].dtype == jnp.float32 and float(got["lr"]) == 0.5
    assert got["flag"].dtype == jnp.bool_ and bool(got["flag"])
    assert isinstance(got["neg"], np.ndarray) and got["neg"].dtype == np.int8 and int(got["neg"]) == -1
    assert (got["name"], got["big"], got["third"]) == ("run", 2 ** 40, 1 / 3)     # Python targets: as saved
    refused = {"name": jax.ShapeDtypeStruct((), jnp.float32), "flag": jax.ShapeDtypeStruct((1,), jnp.bool_),
               "big": jax.ShapeDtypeStruct((), jnp.int32), "neg": jax.ShapeDtypeStruct((), jnp.uint8),
               "huge": jax.ShapeDtypeStruct((), jnp.float16), "step": jax.ShapeDtypeStruct((2,), jnp.int32),
               "lr": jax.ShapeDtypeStruct((), jnp.int8)}
    for key, target in refused.items():
        full = {k: v for k, v in tree.items()}
        full[key] = target
        if key == "lr":       # 0.5 rounds to 0 in an int: a lossy cast, warned, not refused
            with pytest.warns(UserWarning, match=r"Python float values restored into int8 targets .*lossy.* lr"):
                assert int(restore(tmp_path / "c", full)["lr"]) == 0
            continue
        with pytest.raises(StructureMismatchError, match=rf"{key}: saved a Python \w+ scalar, the target holds an array"):
            restore(tmp_path / "c", full)
    with pytest.warns(UserWarning, match=r"Python float values restored into float32 targets .*third.*keep them as "
                                         r"Python values in the target"):
        got = restore(tmp_path / "c", {**tree, "third": jax.ShapeDtypeStruct((), jnp.float32)})
    assert float(got["third"]) == np.float32(1 / 3)


def test_rng_counter_of_a_model_takes_an_exact_integer_only(tmp_path, dropout_config):
    """A 0-d variable of a module (a dropout RNG counter, uint32): an int restores into it
    as a uint32 array, a negative one or a string is refused by key."""
    model = LMModel(dropout_config, rngs=nnx.Rngs(0))
    counters = [k for k in (".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model)))
                if k.endswith("rngs.count")]
    assert counters
    key = counters[0]
    save_model(tmp_path / "ok", _state_with(model, key, 7), config=model.config)
    loaded, _ = load_model(tmp_path / "ok")
    leaf = dict((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(loaded)))[key]
    assert isinstance(leaf[...], jax.Array) and leaf[...].dtype == jnp.uint32 and int(leaf[...]) == 7
    for bad in (-1, "seven", 2 ** 33, 1e40):
        save_model(tmp_path / "bad", _state_with(model, key, bad), config=model.config)
        with pytest.raises(StructureMismatchError, match=rf"{key}: saved a Python \w+ scalar"):
            load_model(tmp_path / "bad")
    # a healthy model trains on after the exact restore
    opt = nnx.Optimizer(loaded, optax.sgd(0.1), wrt=nnx.Param)
    assert int(opt.step[...]) == 0
