"""The nnx adapter traces a (class, config) once (#21).

``load_latest(tx=)`` builds its model from the saved config with ``nnx.eval_shape`` and its
optimizer target from ``nnx.Optimizer`` traced abstractly; both traces are cached. A cached
trace must never leak: another config, another class, another optimizer layout or a config
with mutable static attributes traces anew; every load returns new module objects; the
optimizer carries the caller's ``tx``; and the state is bit-identical to an uncached load.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from conftest import LR, assert_bit_equal, make_optimizer, train_steps
from flax import nnx

from shardckpt import CheckpointManager, LMModel, ModelConfig, OptimizerMismatchError
from shardckpt.api import nnx_state


@pytest.fixture(autouse=True)
def fresh_cache():
    nnx_state.clear_trace_cache()
    yield
    nnx_state.clear_trace_cache()


def _run(path, config: ModelConfig, steps: int = 2):
    model = LMModel(config, rngs=nnx.Rngs(0))
    opt = make_optimizer(model)
    train_steps(model, opt, steps)
    with CheckpointManager(path) as mgr:
        mgr.save(steps, model, opt)
    return model, opt


def _count_traces(monkeypatch) -> list:
    calls = []
    real = nnx.eval_shape

    def counting(f, *args, **kw):
        calls.append(f)
        return real(f, *args, **kw)
    monkeypatch.setattr(nnx_state.nnx, "eval_shape", counting)
    return calls


def test_a_second_load_reuses_the_traces_and_is_bit_identical(tmp_path, monkeypatch):
    model, opt = _run(tmp_path / "a", ModelConfig())
    calls = _count_traces(monkeypatch)
    with CheckpointManager(tmp_path / "a") as mgr:
        first = mgr.load_latest(tx=optax.adamw(LR))
        assert len(calls) == 2            # the model and the optimizer, traced once each
        tx = optax.adamw(LR * 10)         # another tx of the same layout
        second = mgr.load_latest(tx=tx)
        assert len(calls) == 2            # both from the cache
    for loaded in (first, second):
        assert_bit_equal(loaded.model, model)
        assert_bit_equal(loaded.optimizer, opt)
    assert second.optimizer.tx is tx and first.optimizer.tx is not tx
    # new objects every load: filling one never changes the other
    assert second.model is not first.model and second.model.embed is not first.model.embed
    assert second.optimizer is not first.optimizer
    before = np.asarray(first.model.embed.embedding[...]).copy()
    second.model.embed.embedding[...] = second.model.embed.embedding[...] + 1
    np.testing.assert_array_equal(np.asarray(first.model.embed.embedding[...]), before)
    # and the cached optimizer trees still train (the restored tx drives the update)
    train_steps(second.model, second.optimizer, 1)
    assert int(second.optimizer.step[...]) == 3


def test_the_cached_load_equals_an_uncached_one(tmp_path):
    _run(tmp_path / "a", ModelConfig())
    with CheckpointManager(tmp_path / "a") as mgr:
        cold = mgr.load_latest(tx=optax.adamw(LR))
        warm = mgr.load_latest(tx=optax.adamw(LR))
        nnx_state.clear_trace_cache()
        again = mgr.load_latest(tx=optax.adamw(LR))
    for other in (warm, again):
        assert_bit_equal(other.model, cold.model)
        assert_bit_equal(other.optimizer, cold.optimizer)
        assert nnx.graphdef(other.model) == nnx.graphdef(cold.model)
        assert jax.tree.structure(nnx.state(other.optimizer)) == jax.tree.structure(nnx.state(cold.optimizer))


def test_another_config_never_gets_a_cached_trace(tmp_path, monkeypatch):
    _run(tmp_path / "a", ModelConfig())
    wide, _ = _run(tmp_path / "b", ModelConfig(hidden_size=96, intermediate_size=256))
    deep, _ = _run(tmp_path / "c", ModelConfig(n_layers=3))
    calls = _count_traces(monkeypatch)
    with CheckpointManager(tmp_path / "a") as mgr:
        mgr.load_latest(tx=optax.adamw(LR))
    for path, want in ((tmp_path / "b", wide), (tmp_path / "c", deep)):
        with CheckpointManager(path) as mgr:
            got = mgr.load_latest(tx=optax.adamw(LR))
        assert got.model.config == want.config
        assert_bit_equal(got.model, want)
    assert len(calls) == 6                # 3 models and 3 optimizer layouts, each traced


def test_another_optimizer_layout_is_traced_and_still_refused(tmp_path):
    _run(tmp_path / "a", ModelConfig())
    with CheckpointManager(tmp_path / "a") as mgr:
        mgr.load_latest(tx=optax.adamw(LR))     # caches adamw's layout
        with pytest.raises(OptimizerMismatchError):
            mgr.load_latest(tx=optax.sgd(LR, momentum=0.9))
        with pytest.raises(OptimizerMismatchError):
            mgr.load_latest(tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR)))
        assert mgr.load_latest(tx=optax.adamw(LR)).optimizer is not None


@dataclasses.dataclass
class ListConfig:
    widths: list = dataclasses.field(default_factory=lambda: [4, 4])


class ListModel(nnx.Module):
    def __init__(self, config: ListConfig, rngs: nnx.Rngs):
        self.config = config              # a mutable static attribute
        self.layers = nnx.List([nnx.Linear(w, w, rngs=rngs) for w in config.widths])


def test_a_trace_with_mutable_static_attributes_is_not_cached(tmp_path):
    model = ListModel(ListConfig(), rngs=nnx.Rngs(0))
    with CheckpointManager(tmp_path / "a") as mgr:
        mgr.save(1, model, config=ListConfig())
        first = mgr.load_latest(model_cls=ListModel, config_cls=ListConfig)
        second = mgr.load_latest(model_cls=ListModel, config_cls=ListConfig)
    assert nnx_state.cached_traces()[0] == 0
    assert first.model.config is not second.model.config
    first.model.config.widths.append(8)
    assert second.model.config.widths == [4, 4]


def test_immutable_values():
    assert nnx_state.immutable_value(ModelConfig())
    assert nnx_state.immutable_value((1, "a", None, np.dtype("float32"), jax.numpy.float32))
    assert not nnx_state.immutable_value([1])
    assert not nnx_state.immutable_value(ListConfig())
    assert not nnx_state.immutable_value(({"a": 1},))
