"""Porting an Orbax training script to the manager (#18.10).

What a Flax team's NNX example did with Orbax, and what it hit here: saving the optimizer
state as a plain pytree under the manager's own names (``items={"optimizer": ...}``) or
the whole ``{"model", "optimizer", "step"}`` dict; filling the optimizer the script already
has; ``restore(path, item=state)`` (Orbax's spelling of the target); error messages that
listed the whole state with its values; host NumPy arrays without a target; ``strict=False``
with an ``nnx.Module`` target.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LR, assert_bit_equal, bits_of, train_steps
from flax import nnx

from shardckpt import (
    CheckpointError,
    CheckpointManager,
    LMModel,
    StructureMismatchError,
    load_model,
    restore,
    save,
    save_model,
)


def test_items_optimizer_takes_a_plain_optax_state(tmp_path, model, optimizer):
    train_steps(model, optimizer, 2)
    opt_state = jax.tree.map(lambda v: v, optimizer.opt_state)   # the optax state as a script keeps it
    mgr = CheckpointManager(tmp_path / "m")
    mgr.save(2, model, items={"optimizer": opt_state, "data": {"epoch": 1, "order": [3, 1, 2]}})
    # no tx needed: it is no nnx.Optimizer's state, it comes back as saved (host arrays, tuples kept)
    state = mgr.load_latest()
    assert state.optimizer is None and isinstance(state.items["optimizer"], tuple)
    assert state.items["data"] == {"epoch": 1, "order": [3, 1, 2]}
    assert_bit_equal(state.items["optimizer"], opt_state)
    # into a target: the optax types back
    target = jax.eval_shape(lambda: opt_state)
    state = mgr.load_latest(items={"optimizer": target})
    assert jax.tree.structure(state.items["optimizer"]) == jax.tree.structure(opt_state)
    assert_bit_equal(state.items["optimizer"], opt_state)
    # an nnx.Optimizer cannot be rebuilt from it: said so, with what to do
    with pytest.raises(StructureMismatchError, match=r"'optimizer' item is a plain pytree.*state\.items\['optimizer'\]"):
        mgr.load_latest(tx=optax.adamw(LR))
    with pytest.raises(StructureMismatchError, match="plain pytree"):
        mgr.load_latest(optimizer=optimizer)
    with pytest.raises(CheckpointError, match="give one of them"):
        mgr.load_latest(tx=optax.adamw(LR), items={"optimizer": target})
    assert "optimizer" not in mgr.load_latest(should_load_optimizer=False).items
    # a fresh nnx.Optimizer over the restored model remains one argument away
    state = mgr.load_latest(tx=optax.adamw(LR), fresh_optimizer=True)
    assert int(state.optimizer.step[...]) == 0 and "optimizer" in state.items


def test_items_optimizer_of_an_nnx_optimizer_is_the_optimizer(tmp_path, model, optimizer):
    """items={"optimizer": nnx.Optimizer or its nnx.state} is saved as optimizer= would."""
    train_steps(model, optimizer, 2)
    for i, value in enumerate((optimizer, nnx.state(optimizer))):
        mgr = CheckpointManager(tmp_path / f"m{i}")
        mgr.save(2, model, items={"optimizer": value})
        state = mgr.load_latest(tx=optax.adamw(LR))
        assert_bit_equal(state.optimizer, optimizer)
        assert state.items == {}
    with pytest.raises(CheckpointError, match="what optimizer= writes"):
        mgr.save(3, model, optimizer, items={"optimizer": nnx.state(optimizer)})


def test_the_orbax_train_state_dict_round_trips(tmp_path, model, optimizer):
    train_steps(model, optimizer, 2)
    ref_model, ref_opt = nnx.clone(model), nnx.clone(optimizer)
    train_state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "step": 2}
    mgr = CheckpointManager(tmp_path / "m", max_to_keep=2)
    mgr.save(2, train_state, metrics={"loss": 1.0})
    restored = mgr.load_latest(model=jax.eval_shape(lambda: train_state)).model
    assert int(restored["step"]) == 2 and isinstance(restored["step"], jax.Array)
    fresh = LMModel(model.config, rngs=nnx.Rngs(3))
    fresh_opt = nnx.Optimizer(fresh, optax.adamw(LR), wrt=nnx.Param)
    nnx.update(fresh, restored["model"])
    nnx.update(fresh_opt, restored["optimizer"])
    train_steps(ref_model, ref_opt, 1)
    train_steps(fresh, fresh_opt, 1)
    assert_bit_equal(fresh_opt, ref_opt)
    assert_bit_equal(fresh, ref_model)
    # as saved, without a target
    assert restore(mgr.step_path(2), item="model")["step"] == 2


def test_restore_item_as_the_target_orbax_spelling(tmp_path):
    tree = {"w": jnp.arange(4.0), "layers": [jnp.ones(2), jnp.zeros(2)], "step": 7}
    save(tmp_path / "c", tree)
    abstract = jax.eval_shape(lambda: tree)
    by_item = restore(tmp_path / "c", item=abstract)
    by_target = restore(tmp_path / "c", abstract)
    assert jax.tree.structure(by_item) == jax.tree.structure(by_target) == jax.tree.structure(tree)
    assert bits_of(by_item) == bits_of(by_target)
    with pytest.raises(CheckpointError, match="with target= given as well"):
        restore(tmp_path / "c", abstract, item=abstract)
    assert float(restore(tmp_path / "c", item="state")["w"][3]) == 3.0    # a str is still the item's name


VALUE = 7654321.0      # distinctive: its digits must appear in no message


def _messages(tmp_path, model) -> dict[str, str]:
    """Error messages of mismatches against states full of VALUE."""
    big = {"w": jnp.full((64, 64), VALUE), "b": jnp.full((3,), VALUE), "n": 4321987}
    save(tmp_path / "c", big)
    save_model(tmp_path / "m", model)
    state_of_values = {"w": jnp.full((2, 2), VALUE), "extra": jnp.full((5,), VALUE)}
    calls = {
        "wrong shape": lambda: restore(tmp_path / "c", {"w": jnp.full((2, 2), VALUE), "b": jnp.full((3,), VALUE),
                                                        "n": 0}),
        "missing key": lambda: restore(tmp_path / "c", {"w": jnp.full((64, 64), VALUE)}),
        "unexpected key": lambda: restore(tmp_path / "c", {**state_of_values, "b": jnp.zeros(3)}),
        "item= a dict with a target too": lambda: restore(tmp_path / "c", state_of_values, item=state_of_values),
        "item= a dict": lambda: restore(tmp_path / "m", item=state_of_values),
        "target a str": lambda: restore(tmp_path / "c", str(VALUE)),
        "model= a pytree that does not fit": lambda: load_model(tmp_path / "m", model=state_of_values),
        "manager items= a list": lambda: CheckpointManager(tmp_path / "run").save(1, model, items=[state_of_values]),
        "manager items target that does not fit": lambda: (
            CheckpointManager(tmp_path / "run2").save(1, model, items={"ema": big}),
            CheckpointManager(tmp_path / "run2").load_latest(items={"ema": state_of_values}))[1],
        "manager model= a pytree": lambda: CheckpointManager(tmp_path / "run3").load(tmp_path / "m",
                                                                                     model=state_of_values),
        "tx= an array": lambda: CheckpointManager(tmp_path / "run4").load_latest(tx=jnp.full((3,), VALUE)),
        "optimizer= a dict": lambda: CheckpointManager(tmp_path / "run5").load_latest(optimizer=state_of_values),
        "num_writers= an array": lambda: save(tmp_path / "o", big, num_writers=jnp.full((3,), VALUE)),
        "save_timeout= an array": lambda: CheckpointManager(tmp_path / "run6", save_timeout=np.full(2, VALUE)),
        "compress= an array": lambda: save(tmp_path / "o", big, compress=np.full(2, VALUE)),
    }
    out = {}
    for what, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError) as e:
                call()
        out[what] = str(e.value)
    return out


def test_error_messages_list_keys_and_shapes_never_values(tmp_path, model):
    for what, msg in _messages(tmp_path, model).items():
        assert "7654" not in msg and "4321987" not in msg and "e+06" not in msg, (what, msg)
        assert len(msg) < 2000, (what, len(msg))
    msgs = _messages(tmp_path / "again", model)
    assert "saved shape (64, 64), target shape (2, 2)" in msgs["wrong shape"]
    assert re.search(r"a dict of 2 leaves \(extra: \(5,\) float32, w: \(2, 2\) float32\)",
                     msgs["item= a dict with a target too"])
    assert "not in the target: embed.embedding" in msgs["item= a dict"]      # taken as the target
    assert "an array (3,) float32 (jax.Array)" in msgs["tx= an array"]


def test_without_a_target_numpy_arrays_or_jax_arrays_on_request(tmp_path):
    save(tmp_path / "c", {"w": jnp.arange(3.0), "k": jax.random.key(1)})
    host = restore(tmp_path / "c")
    assert type(host["w"]) is np.ndarray and jax.dtypes.issubdtype(host["k"].dtype, jax.dtypes.prng_key)
    dev = restore(tmp_path / "c", as_jax=True)
    assert isinstance(dev["w"], jax.Array) and isinstance(dev["k"], jax.Array)
    np.testing.assert_array_equal(np.asarray(dev["w"]), host["w"])
    with pytest.raises(CheckpointError, match="as_jax=True is for restores without a target"):
        restore(tmp_path / "c", {"w": jnp.zeros(3)}, as_jax=True)
    with pytest.raises(CheckpointError, match="as_jax= takes True or False"):
        restore(tmp_path / "c", as_jax="yes")


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, extra: bool = False, width: int = 4):
        self.a = nnx.Linear(3, width, rngs=rngs)
        if extra:
            self.b = nnx.Linear(width, 2, rngs=rngs)


def test_a_module_target_with_strict_false_keeps_what_does_not_fit(tmp_path):
    save(tmp_path / "small", Net(nnx.Rngs(0)))
    bigger = Net(nnx.Rngs(1), extra=True)
    kept = bits_of(bigger.b)
    with pytest.raises(StructureMismatchError, match=r"missing from the checkpoint: b\.bias, b\.kernel"):
        restore(tmp_path / "small", bigger)                          # strict (the default)
    with pytest.warns(UserWarning, match=r"restored where it fits; the rest keeps the module's values: missing "
                                         r"from the checkpoint: b\.bias, b\.kernel"):
        out = restore(tmp_path / "small", bigger, strict=False)
    assert out is bigger
    assert_bit_equal(bigger.a, Net(nnx.Rngs(0)).a)                  # restored
    assert_bit_equal(bigger.b, kept)                                 # kept
    # a parameter of another shape, and one the module lacks: kept / ignored, with the warning
    save(tmp_path / "wide", Net(nnx.Rngs(0), extra=True, width=5))
    narrow = Net(nnx.Rngs(2))
    with pytest.warns(UserWarning, match=r"not in the target: b\.bias, b\.kernel; mismatched: a\.bias"):
        restore(tmp_path / "wide", narrow, strict=False)
    # an abstract module has no values to keep: it still raises
    with pytest.raises(StructureMismatchError, match=r"no data for the abstract module's leaves b\.bias, b\.kernel"):
        restore(tmp_path / "small", nnx.eval_shape(lambda: Net(nnx.Rngs(0), extra=True)), strict=False)
