"""Resuming an optimizer restores it or says why not (#18.1, #18.10).

A resume with an optimizer whose state differs from the saved one (a ``tx=`` wrapped in
``optax.chain``, another optimizer, a forgotten ``wrt=nnx.LoRAParam``) used to warn and
restart the unmatched state: Adam's ``count`` and ``optimizer.step`` at 0 in a run that
looked resumed. It is now ``OptimizerMismatchError`` by default, naming a few mismatching
keys and how many in all, and the likely fix. Starting a new optimizer over the restored
weights (``fresh_optimizer=True``) and restoring what matches (``strict=False``) are
explicit. Without ``tx=`` nothing is guessed. ``optimizer=`` fills the script's own
optimizer. Options of the wrong type are refused at the call, before anything is read.
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
    OptimizerMismatchError,
    StructureMismatchError,
    load_optimizer,
    restore,
    save_model,
    save_optimizer,
)


@pytest.fixture
def run(tmp_path, model, optimizer):
    """A manager with step 3 of an adamw(LR) run (count and step are 3)."""
    train_steps(model, optimizer, 3)
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(3, model, optimizer)
    return mgr, model, optimizer


def _count(optimizer) -> int:
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(optimizer.opt_state))[0]
              if "count" in jax.tree_util.keystr(path)]
    return int(np.asarray(counts[0]))


MISMATCHED = {
    "chain-around-the-saved": (optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR)),
                               [r"opt_state\.1\.0\.count", r"\(41 in all\)", r"opt_state\.0 -> opt_state\.1\.0",
                                r"pass the tx= the checkpoint was saved with \(the state of optax\.adam"]),
    "sgd-momentum": (optax.sgd(LR, momentum=0.9),
                     [r"opt_state\.0\.trace\.", r"\(20 in all\)", r"optax\.sgd\(momentum=\.\.\.\)", r"tx="]),
    "adagrad": (optax.adagrad(LR), [r"sum_of_squares", r"tx="]),
    "lion": (optax.lion(LR), [r"opt_state\.0\.mu\.", r"tx="]),
}


@pytest.mark.parametrize("name", sorted(MISMATCHED))
def test_a_mismatched_optimizer_is_refused_by_default(run, name):
    mgr, model, optimizer = run
    tx, expected = MISMATCHED[name]
    saved = bits_of(optimizer)
    calls = {"load_latest": lambda: mgr.load_latest(tx=tx), "load_step": lambda: mgr.load_step(3, tx=tx),
             "load_best": lambda: mgr.load_best(tx=tx), "load": lambda: mgr.load(mgr.step_path(3), tx=tx),
             "strict=True": lambda: mgr.load_latest(tx=tx, strict=True)}
    for what, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")            # refused, not warned about
            with pytest.raises(OptimizerMismatchError) as e:
                call()
        msg = str(e.value)
        assert isinstance(e.value, StructureMismatchError), what
        for pattern in expected:
            assert re.search(pattern, msg), (what, pattern, msg)
        # the explicit alternatives are named, and how many keys mismatch in all
        assert "fresh_optimizer=True" in msg and "strict=False" in msg, what
        assert "saved: opt_state.0.count, step, opt_state.0.mu.* (20 parameters)" in msg, what
        assert len(msg) < 3000, (what, len(msg))      # a few keys, not all of them
    # the right tx still resumes the run exactly
    state = mgr.load_latest(tx=optax.adamw(LR))
    assert int(state.optimizer.step[...]) == 3 and _count(state.optimizer) == 3
    assert_bit_equal(state.optimizer, saved)


def test_the_plain_functions_refuse_too(tmp_path, model, optimizer):
    train_steps(model, optimizer, 2)
    save_model(tmp_path / "p", model)
    save_optimizer(tmp_path / "p", optimizer)
    with pytest.raises(OptimizerMismatchError, match=r"build nnx\.Optimizer\(model, tx, wrt=\.\.\.\) rather") as e:
        load_optimizer(tmp_path / "p", model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR)))
    assert "fresh_optimizer" not in str(e.value)       # no such option there
    with pytest.warns(UserWarning, match="strict=False"):
        opt = load_optimizer(tmp_path / "p", model, optax.sgd(LR, momentum=0.9), strict=False)
    assert int(opt.step[...]) == 2
    assert int(load_optimizer(tmp_path / "p", model).step[...]) == 2     # the original's adamw default: same state


class LoRANet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.LoRALinear(8, 8, lora_rank=2, rngs=rngs)
        self.head = nnx.LoRALinear(8, 2, lora_rank=2, rngs=rngs)


@pytest.mark.parametrize("saved_wrt, loaded_wrt, fix", [
    (nnx.LoRAParam, nnx.Param, "wrt=nnx.LoRAParam"),        # the case: wrt= forgotten on load
    (nnx.Param, nnx.LoRAParam, "wrt=nnx.Param"),
])
def test_a_forgotten_or_wrong_wrt_names_the_filter(tmp_path, saved_wrt, loaded_wrt, fix):
    model = LoRANet(nnx.Rngs(0))
    tx = optax.adamw(1e-3)
    mgr = CheckpointManager(tmp_path / "lora")
    mgr.save(0, model, nnx.Optimizer(model, tx, wrt=saved_wrt))
    with pytest.raises(OptimizerMismatchError) as e:
        mgr.load_latest(model=LoRANet(nnx.Rngs(1)), tx=tx, wrt=loaded_wrt)
    msg = str(e.value)
    assert f"{fix} (the saved parameters are exactly those variables)" in msg
    assert re.search(r"the saved state covers \d+ parameters", msg)
    assert "pass the tx=" not in msg            # the tx is right: only the filter is named
    state = mgr.load_latest(model=LoRANet(nnx.Rngs(1)), tx=tx, wrt=saved_wrt)
    assert state.optimizer.wrt is saved_wrt


def test_fresh_optimizer_keeps_the_weights_and_starts_afresh(run):
    mgr, model, _ = run
    for tx in (optax.sgd(1e-2, momentum=0.9), optax.adamw(LR)):   # another optimizer, or the same anew
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state = mgr.load_latest(tx=tx, fresh_optimizer=True)
        assert int(state.optimizer.step[...]) == 0
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(nnx.state(state.optimizer.opt_state))
                   if np.asarray(x).dtype.kind == "f")      # moments at their init (zeros)
        assert_bit_equal(state.model, model)
    # optimizer= given: used as it is (the weights are still restored into the model)
    own = nnx.Optimizer(LMModel(model.config, rngs=nnx.Rngs(9)), optax.adamw(LR), wrt=nnx.Param)
    state = mgr.load_latest(model=LMModel(model.config, rngs=nnx.Rngs(9)), optimizer=own, fresh_optimizer=True)
    assert state.optimizer is own and int(own.step[...]) == 0
    assert_bit_equal(state.model, model)
    # also for a checkpoint without an optimizer
    mgr.save(4, model)
    state = mgr.load_latest(tx=optax.adamw(LR), fresh_optimizer=True)
    assert state.step == 4 and int(state.optimizer.step[...]) == 0


def test_strict_false_restores_what_matches_and_warns(run):
    mgr, _, _ = run
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR))
    with pytest.warns(UserWarning, match=r"restored only where it matches the new optimizer \(strict=False\)"):
        state = mgr.load_latest(tx=tx, strict=False)
    assert int(state.optimizer.step[...]) == 3        # step matched
    assert _count(state.optimizer) == 0               # the chained adam state did not: fresh


def test_no_tx_is_never_a_default_optimizer(run, tmp_path):
    mgr, model, _ = run
    with pytest.raises(CheckpointError, match=r"no tx= was given.*Pass the tx= it was saved with.*optimizer=.*"
                                              r"should_load_optimizer=False") as e:
        mgr.load_latest()
    assert "opt_state.0.mu.* (20 parameters)" in str(e.value)      # what it holds
    for call in (mgr.load_best, lambda: mgr.load_step(3), lambda: mgr.load(mgr.step_path(3))):
        with pytest.raises(CheckpointError, match="no tx= was given"):
            call()
    state = mgr.load_latest(should_load_optimizer=False)
    assert state.optimizer is None and state.step == 3
    # a checkpoint without an optimizer needs no tx
    other = CheckpointManager(tmp_path / "model-only")
    other.save(1, model)
    assert other.load_latest().optimizer is None


def test_optimizer_fills_the_scripts_own_optimizer(run):
    mgr, model, optimizer = run
    saved = bits_of(optimizer)
    own_model = LMModel(model.config, rngs=nnx.Rngs(5))
    own = nnx.Optimizer(own_model, optax.adamw(LR), wrt=nnx.Param)
    state = mgr.load_latest(model=own_model, optimizer=own)
    assert state.optimizer is own and state.model is own_model
    assert_bit_equal(own, saved)
    assert_bit_equal(own_model, model)
    # and it trains on exactly as the original would
    train_steps(model, optimizer, 1)
    train_steps(own_model, own, 1)
    assert_bit_equal(own, optimizer)
    # an abstract optimizer is filled and returned
    abstract = nnx.eval_shape(lambda: nnx.Optimizer(LMModel(model.config, rngs=nnx.Rngs(0)), optax.adamw(LR),
                                                    wrt=nnx.Param))
    state = mgr.load_step(3, optimizer=abstract)
    assert_bit_equal(state.optimizer, saved)
    # the optimizer given must match what was saved
    wrong = nnx.Optimizer(own_model, optax.sgd(LR, momentum=0.9), wrt=nnx.Param)
    with pytest.raises(OptimizerMismatchError, match="the optimizer given"):
        mgr.load_latest(model=own_model, optimizer=wrong)


def test_optimizer_given_for_a_checkpoint_without_one_is_refused(tmp_path, model, optimizer):
    mgr = CheckpointManager(tmp_path / "m")
    mgr.save(1, model)
    with pytest.raises(StructureMismatchError, match="holds no optimizer.*fresh_optimizer=True"):
        mgr.load_latest(optimizer=optimizer)
    assert mgr.load_latest(optimizer=optimizer, fresh_optimizer=True).optimizer is optimizer


BAD_OPTIONS = [
    ({"strict": "yes"}, "strict= takes True or False"),
    ({"strict": 1}, "strict= takes True or False"),
    ({"fresh_optimizer": "no"}, "fresh_optimizer= takes True or False"),
    ({"should_load_optimizer": None}, "should_load_optimizer= takes True or False"),
    ({"tx": "adamw"}, "tx= is a str of length 5, not an optax.GradientTransformation"),
    ({"optimizer": {"mu": 1}}, "optimizer= is a dict of 1 leaves"),
    ({"optimizer": "opt"}, "it takes an nnx.Optimizer to fill"),
    ({"fresh_optimizer": True}, "fresh_optimizer=True builds nnx.Optimizer.*pass tx="),
    ({"fresh_optimizer": True, "tx": optax.adamw(LR), "should_load_optimizer": False}, "give one of them"),
    ({"model_cls": "LMModel"}, "model_cls= is a str"),
    ({"items": ["ema"]}, "items= is a list"),
]


@pytest.mark.parametrize("kw, match", BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_load_options_are_checked_at_the_call(tmp_path, model, optimizer, kw, match):
    """Also in an empty directory, where load_latest would return None: a misspelt resume
    fails on the first run, not on the first resume hours later."""
    empty = CheckpointManager(tmp_path / "empty")
    mgr = CheckpointManager(tmp_path / "m")
    mgr.save(1, model, optimizer)
    for call in (lambda: empty.load_latest(**kw), lambda: empty.load_best(**kw), lambda: mgr.load_latest(**kw),
                 lambda: mgr.load_step(1, **kw), lambda: mgr.load(mgr.step_path(1), **kw)):
        with pytest.raises(CheckpointError, match=match):
            call()


def test_tx_and_optimizer_together_are_refused(tmp_path, optimizer):
    with pytest.raises(CheckpointError, match="tx= and optimizer= are both given"):
        CheckpointManager(tmp_path).load_latest(tx=optax.adamw(LR), optimizer=optimizer)


@pytest.mark.parametrize("strict", ["yes", 0, None, np.bool_(True)], ids=["str", "int", "None", "numpy-bool"])
def test_restore_and_load_optimizer_check_strict(tmp_path, model, optimizer, strict):
    from shardckpt import save
    save(tmp_path / "t", {"w": jnp.ones(3)})
    with pytest.raises(CheckpointError, match="strict= takes True or False"):
        restore(tmp_path / "t", strict=strict)
    with pytest.raises(CheckpointError, match="strict= takes True or False"):
        restore(tmp_path / "nowhere", {"w": jnp.ones(3)}, strict=strict)     # before the path is opened
    save_model(tmp_path / "p", model)
    save_optimizer(tmp_path / "p", optimizer)
    with pytest.raises(CheckpointError, match="strict= takes True or False"):
        load_optimizer(tmp_path / "p", model, strict=strict)
