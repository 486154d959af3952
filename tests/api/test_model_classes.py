"""Loading a custom model without ``model=`` says what to pass (#18.3).

Without ``model=``/``model_cls=`` the reference ``LMModel`` is built from the saved
config. A custom model's config is not a ``ModelConfig``: the load names the unknown keys
and says to pass ``model_cls=``/``config_cls=`` or ``model=``, instead of warning about a
"newer version" and then failing on keys. ``model_cls=`` given a config class (or anything
that is no ``nnx.Module`` subclass) is our error at the call, not a ``TypeError``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax
import pytest
from conftest import assert_bit_equal
from flax import nnx

from shardckpt import CheckpointError, CheckpointManager, LMModel, ModelConfig, StructureMismatchError, load_model, save_model


@dataclasses.dataclass
class WidthConfig:
    width: int = 6
    depth: int = 2


class WidthModel(nnx.Module):
    def __init__(self, config: WidthConfig, rngs: nnx.Rngs):
        self.config = config
        self.layers = nnx.List([nnx.Linear(config.width, config.width, rngs=rngs) for _ in range(config.depth)])


class FromDict:
    """A config class with from_dict that rejects what it is given (a foreign exception)."""

    @classmethod
    def from_dict(cls, d):
        raise KeyError("no such field")


@pytest.fixture
def custom_run(tmp_path):
    model = WidthModel(WidthConfig(), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, model, optimizer)
    save_model(tmp_path / "model", model)
    return mgr, model, tmp_path / "model"


def test_a_custom_config_without_model_cls_says_what_to_pass(custom_run):
    mgr, model, path = custom_run
    for call in (lambda: load_model(path), lambda: mgr.load_latest(tx=optax.adam(1e-3)),
                 lambda: mgr.load(mgr.step_path(1), should_load_optimizer=False)):
        with pytest.raises(StructureMismatchError) as e:
            call()
        msg = str(e.value)
        assert "['depth', 'width']" in msg                  # the keys ModelConfig does not have
        assert "model_cls=" in msg and "config_cls=" in msg and "model=" in msg
        assert "newer version" not in msg.split("(Written")[0]
    # and what it says works
    state = mgr.load_latest(model_cls=WidthModel, config_cls=WidthConfig, tx=optax.adam(1e-3))
    assert isinstance(state.model, WidthModel) and state.model.config == WidthConfig()
    assert_bit_equal(state.model, model)
    loaded, _ = load_model(path, model=nnx.eval_shape(lambda: WidthModel(WidthConfig(), nnx.Rngs(0))))
    assert_bit_equal(loaded, model)


def test_model_cls_given_without_config_cls_asks_for_it(custom_run):
    _, _, path = custom_run
    with pytest.raises(StructureMismatchError, match="config_cls="):
        load_model(path, model_cls=WidthModel)              # the config would be built as a ModelConfig


BAD_CLASSES = [
    ({"model_cls": ModelConfig}, r"model_cls=ModelConfig is not an nnx.Module subclass.*config_cls=ModelConfig if it "
                                 r"is the config class"),
    ({"model_cls": WidthConfig}, r"model_cls=WidthConfig is not an nnx.Module subclass"),
    ({"model_cls": "LMModel"}, r"model_cls= is a str of length 7, not a class"),
    ({"model_cls": LMModel(ModelConfig(), rngs=nnx.Rngs(0))}, r"model_cls= is an nnx.Module \(LMModel\), not a class"),
    ({"config_cls": LMModel}, r"config_cls=LMModel is a module class.*model_cls=LMModel"),
    ({"config_cls": {"width": 3}}, r"config_cls= is a dict of 1 leaves"),
]


@pytest.mark.parametrize("kw, match", BAD_CLASSES, ids=[str(i) for i in range(len(BAD_CLASSES))])
def test_model_and_config_classes_are_checked_at_the_call(tmp_path, custom_run, kw, match):
    mgr, _, path = custom_run
    empty = CheckpointManager(tmp_path / "empty")
    for call in (lambda: load_model(path, **kw), lambda: load_model(tmp_path / "nowhere", **kw),
                 lambda: mgr.load_latest(tx=optax.adam(1e-3), **kw), lambda: empty.load_latest(**kw)):
        with pytest.raises(CheckpointError, match=match):
            call()


def test_a_config_class_that_raises_is_our_error(custom_run):
    _, _, path = custom_run
    with pytest.raises(CheckpointError, match=r"does not make a FromDict: KeyError"):
        load_model(path, model_cls=WidthModel, config_cls=FromDict)


def test_the_reference_model_still_loads_without_classes(tmp_path):
    model = LMModel(ModelConfig(), rngs=nnx.Rngs(0))
    save_model(tmp_path / "lm", model)
    loaded, config = load_model(tmp_path / "lm")
    assert isinstance(loaded, LMModel) and config == model.config.to_dict()
    assert float(jnp.abs(loaded.embed.embedding[...] - model.embed.embedding[...]).max()) == 0.0
