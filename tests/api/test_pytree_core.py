"""The pytree core (``shardckpt.save`` / ``shardckpt.restore``) and the nnx functions built
on it: pytree targets for ``load_model`` and the manager, extra items in one atomic
checkpoint, optimizers over a subset of the parameters (LoRA, ``wrt=``), clear errors for
arguments that are no module, and every ``python`` and ``bash`` block of docs/checkpointing_guide.md."""

from __future__ import annotations

import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shardckpt
from shardckpt import (
    CheckpointError,
    CheckpointManager,
    SaveAbortedError,
    StructureMismatchError,
    load_model,
    load_optimizer,
    restore,
    save,
    save_model,
    save_optimizer,
)
from shardckpt.api.nnx_state import abstract_optimizer
from tests.scenarios.guide import GUIDE, RUNNABLE, run_block
from tests.scenarios.guide import blocks as guide_blocks

LR = 1e-3   # the conftest optimizer's learning rate (optax.adamw(LR))


def bits(tree) -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = jax.random.key_data(leaf) if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key) \
            else leaf
        a = np.asarray(a)
        out[jax.tree_util.keystr(path)] = (a.dtype.str, a.shape, a.tobytes())
    return out


def sample_tree():
    return {
        "w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        "layers": [{"k": np.arange(4, dtype=np.int8)}, {"k": np.full(4, 7, np.int8)}],
        "count": 3, "name": "run-1", "lr": 0.5, "flag": True,
        "key": jax.random.key(7),
        "f8": jnp.ones(2, jnp.float8_e4m3fn),
    }


# --- shardckpt.save / shardckpt.restore ---------------------------------------------------------

def test_restore_without_target_gives_host_arrays_in_a_nested_dict(tmp_path):
    tree = sample_tree()
    assert save(tmp_path / "c", tree, step=3, metrics={"loss": 0.25}) == tmp_path / "c"
    out = restore(tmp_path / "c")
    assert set(out) == {"w", "layers", "count", "name", "lr", "flag", "key", "f8"}
    assert isinstance(out["w"], np.ndarray) and out["w"].dtype == jnp.bfloat16
    assert out["f8"].dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(out["w"].astype(np.float32), np.arange(6).reshape(2, 3))
    # lists come back as lists (their container kind is recorded), scalars with their type
    assert isinstance(out["layers"], list) and len(out["layers"]) == 2 and out["layers"][1]["k"].dtype == np.int8
    assert (out["count"], out["name"], out["lr"], out["flag"]) == (3, "run-1", 0.5, True)
    assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))
    ck = shardckpt.open_checkpoint(tmp_path / "c")
    assert ck.items == ["state"] and ck.step == 3 and ck.metrics == {"loss": 0.25}


def test_restore_into_abstract_and_concrete_targets_is_bit_exact(tmp_path):
    tree = sample_tree()
    save(tmp_path / "c", tree)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree)
    back = restore(tmp_path / "c", abstract)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert bits(back) == bits(tree)
    assert isinstance(back["w"], jax.Array)
    zeros = jax.tree.map(lambda x: jnp.zeros_like(x) if isinstance(x, jax.Array) and
                         not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)
    assert bits(restore(tmp_path / "c", zeros)) == bits(tree)


def test_restore_onto_a_sharding_and_a_selection(tmp_path):
    save(tmp_path / "c", {"a": jnp.arange(8.0), "b": jnp.ones(3)})
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"a": jax.ShapeDtypeStruct((8,), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    out = restore(tmp_path / "c", target, shardings=sharding)
    assert out["a"].sharding == sharding
    assert set(restore(tmp_path / "c", select=lambda k: k == "a")) == {"a"}
    with pytest.raises(CheckpointError, match="target="):
        restore(tmp_path / "c", shardings=sharding)


def test_strict_restore_refuses_a_target_of_another_shape(tmp_path):
    save(tmp_path / "c", {"a": jnp.arange(8.0), "b": jnp.ones(3)})
    with pytest.raises(StructureMismatchError, match="a: saved shape"):
        restore(tmp_path / "c", {"a": jnp.zeros(4), "b": jnp.zeros(3)})
    with pytest.raises(StructureMismatchError, match="missing from the checkpoint: c"):
        restore(tmp_path / "c", {"a": jnp.zeros(8), "b": jnp.zeros(3), "c": jnp.zeros(1)})
    with pytest.warns(UserWarning, match="keep the target's values"):
        out = restore(tmp_path / "c", {"a": jnp.zeros(8), "c": jnp.full(1, 5.0)}, strict=False)
    assert float(out["c"][0]) == 5.0 and float(out["a"][7]) == 7.0
    with pytest.raises(StructureMismatchError, match="no data for the abstract"):
        restore(tmp_path / "c", {"a": jax.ShapeDtypeStruct((8,), jnp.float32),
                                 "c": jax.ShapeDtypeStruct((1,), jnp.float32)}, strict=False)


def test_extra_items_in_one_commit_and_the_item_choice(tmp_path):
    params, ema, data = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}, {"epoch": 2, "offset": np.int64(1234)}
    save(tmp_path / "c", params, items={"ema": ema, "data": data})
    assert sorted(shardckpt.open_checkpoint(tmp_path / "c").items) == ["data", "ema", "state"]
    assert float(restore(tmp_path / "c")["w"][0]) == 1.0
    assert float(restore(tmp_path / "c", item="ema")["w"][0]) == 0.5
    assert restore(tmp_path / "c", item="data") == {"epoch": 2, "offset": 1234}
    with pytest.raises(StructureMismatchError, match="has no 'opt'"):
        restore(tmp_path / "c", item="opt")
    # items alone: no "state"; with several items, restore asks which
    save(tmp_path / "d", items={"ema": ema, "data": data})
    with pytest.raises(StructureMismatchError, match="pass item="):
        restore(tmp_path / "d")
    save(tmp_path / "e", items={"ema": ema})
    assert float(restore(tmp_path / "e")["w"][0]) == 0.5          # the only item
    # a re-save replaces the whole checkpoint
    save(tmp_path / "c", params)
    assert shardckpt.open_checkpoint(tmp_path / "c").items == ["state"]


@pytest.mark.parametrize("bad, match", [
    ({"state": {"w": jnp.ones(1)}}, "give the tree either way"),
    ({"bad name": {"w": jnp.ones(1)}}, "not allowed"),
    ({"x": None}, "nothing to save"),
    ({"x": dict}, "is a class"),
    ({"x": "weights.npz"}, "is a str"),
])
def test_save_refuses_bad_items(tmp_path, bad, match):
    with pytest.raises(CheckpointError, match=match):
        save(tmp_path / "c", {"w": jnp.ones(1)}, items=bad)
    assert not (tmp_path / "c").exists()


def test_save_takes_modules_as_their_state(tmp_path, model):
    save(tmp_path / "c", model)
    back = restore(tmp_path / "c", nnx.state(model))
    assert bits(back) == bits(nnx.state(model))
    restored = restore(tmp_path / "c", nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(1))))
    assert bits(nnx.state(restored)) == bits(nnx.state(model))


# --- the nnx functions over pytrees ---------------------------------------------------------------

def test_save_model_of_a_pytree_loads_back_with_a_pytree_target(tmp_path):
    save_model(tmp_path / "p", {"w": jnp.arange(3.0)})
    tree, config = load_model(tmp_path / "p", model={"w": jnp.zeros(3)})
    assert config is None and float(tree["w"][2]) == 2.0
    tree, _ = load_model(tmp_path / "p", model={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert float(tree["w"][2]) == 2.0
    with pytest.raises(CheckpointError, match="pass model="):
        load_model(tmp_path / "p")                      # no config: nothing to build
    assert float(restore(tmp_path / "p")["w"][1]) == 1.0   # its only item, "model"
    # save(path, tree) checkpoints load through load_model too (item "state")
    save(tmp_path / "s", {"w": jnp.arange(3.0)})
    tree, _ = load_model(tmp_path / "s", model={"w": jnp.zeros(3)})
    assert float(tree["w"][2]) == 2.0


@pytest.mark.parametrize("bad, match", [
    (dict, "is a class"), ("./model", "is a str"), (shardckpt.LMModel, "model_cls="), (print, "builtin"),
])
def test_bad_model_arguments_say_what_to_pass(tmp_path, model, optimizer, bad, match):
    save_model(tmp_path / "p", model)
    save_optimizer(tmp_path / "p", optimizer)
    manager = CheckpointManager(tmp_path / "m")
    manager.save(1, model, optimizer)
    calls = [lambda: load_model(tmp_path / "p", model=bad), lambda: manager.load_latest(model=bad),
             lambda: load_optimizer(tmp_path / "p", bad), lambda: save_model(tmp_path / "q", bad),
             lambda: manager.save(2, bad)]
    for call in calls:
        with pytest.raises(CheckpointError, match=match):
            call()
    assert manager.all_steps() == [1] and not (tmp_path / "q").exists()


def test_manager_optimizer_needs_a_module_not_a_pytree(tmp_path, model, optimizer):
    manager = CheckpointManager(tmp_path / "m")
    manager.save(1, model, optimizer)
    with pytest.raises(CheckpointError, match="should_load_optimizer=False"):
        manager.load_latest(model=nnx.state(model))
    state = manager.load_latest(model=nnx.state(model), should_load_optimizer=False)
    assert bits(state.model) == bits(nnx.state(model)) and state.optimizer is None
    with pytest.raises(CheckpointError, match="not an nnx.Optimizer"):
        manager.save(2, model, {"mu": jnp.ones(1)})


def test_manager_extra_items(tmp_path, model, optimizer):
    ema = jax.tree.map(lambda x: x * 0.5, nnx.state(model, nnx.Param))
    loader = {"epoch": 3, "position": np.int64(4096), "seed": jax.random.key(3)}
    manager = CheckpointManager(tmp_path / "m", max_to_keep=2)
    manager.save(10, model, optimizer, items={"ema": ema, "data": loader}, metrics={"loss": 1.0})
    state = manager.load_latest(tx=optax.adamw(LR))
    assert sorted(state.items) == ["data", "ema"]
    assert state.items["data"]["epoch"] == 3 and state.items["data"]["position"] == 4096
    host_ema = state.items["ema"]                       # no target: host arrays, nested dicts
    assert isinstance(host_ema["embed"]["embedding"], np.ndarray)
    target = nnx.eval_shape(lambda: ema)
    state = manager.load_latest(items={"ema": target}, should_load_optimizer=False)
    assert bits(state.items["ema"]) == bits(ema) and isinstance(state.items["ema"], nnx.State)
    assert bits(nnx.state(state.model)) == bits(nnx.state(model))
    with pytest.raises(StructureMismatchError, match="does not hold"):
        manager.load_latest(items={"emma": target}, tx=optax.adamw(LR))
    # "model" is what model= writes; "optimizer" too when optimizer= is given (else it is a
    # plain pytree item: see tests/api/test_orbax_port.py)
    with pytest.raises(CheckpointError, match="what model= writes"):
        manager.save(11, model, items={"model": ema})
    with pytest.raises(CheckpointError, match="what optimizer= writes"):
        manager.save(11, model, optimizer, items={"optimizer": ema})
    assert manager.all_steps() == [10]
    # the guide's loads are unchanged: items defaults to {}
    manager.save(12, model)
    assert manager.load_latest().items == {}


def test_manager_async_save_with_items(tmp_path, model):
    ema = {"w": jnp.arange(4.0)}
    with CheckpointManager(tmp_path / "m", async_save=True) as manager:
        manager.save(1, model, items={"ema": ema})
    assert float(CheckpointManager(tmp_path / "m").load_latest().items["ema"]["w"][3]) == 3.0


def test_manager_with_a_pytree_model(tmp_path):
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    manager = CheckpointManager(tmp_path / "m")
    manager.save(5, params, items={"ema": params})
    state = manager.load_latest(model=jax.eval_shape(lambda: params))
    assert bits(state.model) == bits(params) and state.step == 5 and state.config == {}
    with pytest.raises(CheckpointError, match="no model_config"):
        manager.load_latest()


# --- optimizers over a subset of the parameters (wrt=) ------------------------------------------------

class Trainable(nnx.Variable):
    """A custom Variable type an optimizer can be restricted to."""


class LoRANet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, rank: int = 2):
        self.l1 = nnx.LoRALinear(8, 16, lora_rank=rank, rngs=rngs)
        self.l2 = nnx.LoRALinear(16, 4, lora_rank=rank, rngs=rngs)
        self.scale = Trainable(jnp.ones(4))

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x))) * self.scale[...]


def lora_train(model, optimizer, wrt, steps, seed=0):
    def loss_fn(m, x):
        return (m(x) ** 2).mean()

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, x)
        optimizer.update(model, grads)

    for i in range(steps):
        step(model, optimizer, jax.random.normal(jax.random.key(seed + i), (4, 8)))


@pytest.mark.parametrize("wrt", [nnx.LoRAParam, Trainable, nnx.Any(nnx.LoRAParam, Trainable)],
                         ids=["LoRAParam", "custom-variable", "both"])
def test_lora_optimizer_round_trip_through_the_manager(tmp_path, wrt):
    tx = optax.adamw(1e-2)
    model = LoRANet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    lora_train(model, optimizer, wrt, 3)
    manager = CheckpointManager(tmp_path / "m")
    manager.save(3, model, optimizer)
    # reference: train on
    ref_model = nnx.clone(model)
    ref_opt = nnx.Optimizer(ref_model, tx, wrt=wrt)
    nnx.update(ref_opt, nnx.state(optimizer))
    lora_train(ref_model, ref_opt, wrt, 2, seed=3)

    fresh = LoRANet(nnx.Rngs(42))
    state = manager.load_latest(model=fresh, tx=tx, wrt=wrt)
    assert bits(nnx.state(state.optimizer)) == bits(nnx.state(optimizer))
    assert bits(nnx.state(state.model)) == bits(nnx.state(model))
    lora_train(state.model, state.optimizer, wrt, 2, seed=3)
    assert bits(nnx.state(state.model)) == bits(nnx.state(ref_model))
    # the plain functions take wrt= too
    save_model(tmp_path / "p", model)
    save_optimizer(tmp_path / "p", optimizer)
    opt = load_optimizer(tmp_path / "p", LoRANet(nnx.Rngs(1)), tx, wrt=wrt)
    assert bits(nnx.state(opt)) == bits(nnx.state(optimizer))


def test_lora_optimizer_with_the_default_wrt_is_refused_clearly(tmp_path):
    tx = optax.adam(1e-2)
    model = LoRANet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    manager = CheckpointManager(tmp_path / "m")
    manager.save(1, model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StructureMismatchError):
            manager.load_latest(model=LoRANet(nnx.Rngs(1)), tx=tx, strict=True)   # wrt=nnx.Param: other keys


@pytest.mark.parametrize("make, wrt", [
    (lambda: shardckpt.LMModel(shardckpt.ModelConfig(), rngs=nnx.Rngs(0)), nnx.Param),
    (lambda: LoRANet(nnx.Rngs(0)), nnx.LoRAParam),
    (lambda: LoRANet(nnx.Rngs(0)), Trainable),
])
def test_abstract_optimizer_equals_tracing_the_whole_model(make, wrt):
    model = make()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    ga, sa = nnx.split(nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=wrt), model))
    gb, sb = nnx.split(abstract_optimizer(model, tx, wrt))
    assert ga == gb
    def flat(s):
        return [(p, type(v), v.shape, v.dtype) for p, v in nnx.to_flat_state(s)]
    assert flat(sa) == flat(sb)


# --- the user guide ---------------------------------------------------------------------------------

def test_every_python_block_of_the_guide_runs_in_order(tmp_path, monkeypatch):
    """docs/checkpointing_guide.md promises that its ```python and ```bash blocks (the
    ``shardckpt`` commands, e.g. the Orbax conversions) run, in order, in one session
    started in an empty directory (``tests.scenarios.guide``)."""
    runnable = [(lang, code) for lang, code in guide_blocks(GUIDE.read_text()) if lang in RUNNABLE]
    assert len(runnable) > 10
    assert "from shardckpt import save, restore" in runnable[0][1], "the pytree API comes first"
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("shardckpt_guide")    # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    scope = module.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (lang, code) in enumerate(runnable):
            try:
                run_block(lang, code, scope, f"checkpointing_guide.md block {i}")
            except Exception as e:
                raise AssertionError(f"guide block {i} failed: {type(e).__name__}: {e}\n{code}") from e


def test_join_timeout_is_a_manager_option(tmp_path):
    assert CheckpointManager(tmp_path / "m").join_timeout == 20.0
    assert CheckpointManager(tmp_path / "m", join_timeout=None).join_timeout is None
    assert issubclass(SaveAbortedError, CheckpointError)
