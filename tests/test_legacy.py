"""The guide's original single-file layout (model.npz, optimizer.npz, optimizer_meta.pkl,
config.json ...) written by hand, as the old code wrote it, is read without ever unpickling."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from shardckpt import (CheckpointError, CheckpointManager, CorruptCheckpointError, LMModel, ModelConfig,
                       StructureMismatchError, load_model, load_optimizer, save_model)
from shardckpt.checkpoint import open_checkpoint

from conftest import assert_bit_equal, bits_of, make_optimizer, tree_of_files, train_steps


class SideEffect:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _flat(state, style: str = "dotted") -> dict[str, np.ndarray]:
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            continue          # the old code could not store typed keys
        sep = "/" if style == "slash" else "."
        key = sep.join(map(str, path)) + (".value" if style == "value-suffix" else "")
        out[key] = np.asarray(value)
    return out


def write_legacy(path: Path, model, optimizer=None, *, compressed=True, style="dotted", step=100,
                 pickle_payload=None):
    path.mkdir(parents=True)
    save = np.savez_compressed if compressed else np.savez
    params = _flat(nnx.state(model), style)
    save(path / "model.npz", **params)
    (path / "config.json").write_text(json.dumps({"model_config": model.config.to_dict(), "step": step,
                                                  "train_config": {"lr": 3e-4}}))
    (path / "metrics.json").write_text(json.dumps({"loss": 1.25}))
    (path / "extra.json").write_text(json.dumps({"wandb_run_id": "abc123"}))
    (path / "structure.json").write_text(json.dumps({k: list(v.shape) for k, v in params.items()}))
    if optimizer is not None:
        save(path / "optimizer.npz", **_flat(nnx.state(optimizer), style))
    if pickle_payload is not None:
        (path / "optimizer_meta.pkl").write_bytes(pickle.dumps(pickle_payload))
    return path


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    # The payload is live: plain unpickling does create the marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(SideEffect(probe)))
    assert probe.exists()
    probe.unlink()
    return m


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("style", ["dotted", "value-suffix", "slash"])
def test_load_model_reads_legacy(tmp_path, model, compressed, style, marker):
    path = write_legacy(tmp_path / "step_100", model, compressed=compressed, style=style,
                        pickle_payload=SideEffect(marker))
    before = tree_of_files(path)
    loaded, config = load_model(path)
    assert isinstance(loaded, LMModel)
    assert config == model.config.to_dict()
    assert_bit_equal(loaded, model, "legacy model")
    # Into an existing model, too.
    target = LMModel(model.config, rngs=nnx.Rngs(7))
    load_model(path, model=target)
    assert_bit_equal(target, model)
    assert tree_of_files(path) == before          # read-only
    assert not marker.exists()


def test_manager_load_reads_legacy(tmp_path, model, marker):
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 1)
    path = write_legacy(tmp_path / "old" / "step_100", model, optimizer, pickle_payload=SideEffect(marker))
    mgr = CheckpointManager(tmp_path / "new")
    state = mgr.load(path, should_load_optimizer=False)
    assert state.step == 100
    assert state.metrics == {"loss": 1.25}
    assert state.extra == {"wandb_run_id": "abc123"}
    assert state.train_config == {"lr": 3e-4}
    assert state.config == model.config.to_dict()
    assert state.optimizer is None
    assert_bit_equal(state.model, model)
    assert not marker.exists()


def test_pickled_optimizer_metadata_is_refused(tmp_path, model, marker):
    optimizer = make_optimizer(model)
    path = write_legacy(tmp_path / "ck", model, optimizer, pickle_payload=SideEffect(marker))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_optimizer(path, model, optax.adamw(1e-3))
    with pytest.raises(CheckpointError, match="allow_pickle=True") as e:
        CheckpointManager(tmp_path / "m").load(path)
    assert "optimizer_meta.pkl" in str(e.value)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        CheckpointManager(tmp_path / "m").load(path, tx=optax.adam(1e-5))
    assert not marker.exists()


def test_allow_pickle_reads_the_arrays(tmp_path, model):
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 2)
    path = write_legacy(tmp_path / "ck", model, optimizer, pickle_payload={"treedef": "whatever"})
    restored = load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)
    assert_bit_equal(restored, optimizer, "legacy optimizer")
    state = CheckpointManager(tmp_path / "m").load(path, allow_pickle=True)
    assert int(state.optimizer.step[...]) == 2


def test_legacy_optimizer_without_pickle(tmp_path, model):
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 1)
    path = write_legacy(tmp_path / "ck", model, optimizer)
    state = CheckpointManager(tmp_path / "m").load(path)
    assert_bit_equal(state.optimizer, optimizer)
    assert_bit_equal(state.model, model)


@pytest.mark.parametrize("compressed", [True, False])
def test_bfloat16_stored_as_void(tmp_path, compressed):
    model = LMModel(ModelConfig(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(1))
    path = write_legacy(tmp_path / "ck", model, compressed=compressed)
    with np.load(path / "model.npz") as z:
        assert z["embed.embedding"].dtype == np.dtype("V2")   # what plain np.savez made of it
    loaded, _ = load_model(path)
    assert loaded.embed.embedding[...].dtype == jax.numpy.bfloat16
    assert_bit_equal(loaded, model, "bfloat16 from V2")


def test_legacy_without_rng_state_warns_and_initialises(tmp_path):
    model = LMModel(ModelConfig(dropout=0.1), rngs=nnx.Rngs(0))
    path = write_legacy(tmp_path / "ck", model)
    with pytest.warns(UserWarning, match="rngs"):
        loaded, _ = load_model(path)
    assert_bit_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))


def test_object_arrays_in_npz_are_refused(tmp_path, model, marker):
    path = write_legacy(tmp_path / "ck", model)
    params = _flat(nnx.state(model))
    params["evil"] = np.array([SideEffect(marker)], dtype=object)
    np.savez(path / "model.npz", **params)   # np.save pickles object arrays
    with pytest.raises(CorruptCheckpointError, match="objects"):
        load_model(path)
    assert not marker.exists()


def test_legacy_of_another_config(tmp_path, model):
    path = write_legacy(tmp_path / "ck", model)
    with pytest.raises(StructureMismatchError, match="embed.embedding"):
        load_model(path, model=LMModel(ModelConfig(hidden_size=32), rngs=nnx.Rngs(0)))


def test_not_an_npz(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CorruptCheckpointError, match="model.npz"):
        load_model(tmp_path / "ck")


def test_legacy_dir_is_never_overwritten_and_can_be_converted(tmp_path, model):
    path = write_legacy(tmp_path / "ck", model)
    before = tree_of_files(path)
    with pytest.raises(CheckpointError):
        save_model(path, model)
    assert tree_of_files(path) == before
    assert open_checkpoint(path).legacy
    # Conversion: load the old layout, save in the new one.
    loaded, _ = load_model(path)
    save_model(tmp_path / "converted", loaded)
    again, _ = load_model(tmp_path / "converted")
    assert_bit_equal(again, model)


def test_big_endian_arrays_keep_their_values(tmp_path, model):
    """npz files carry their byte order; a big-endian writer's arrays load with the same
    values (not their bytes reinterpreted as little-endian)."""
    path = write_legacy(tmp_path / "ck", model)
    params = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in _flat(nnx.state(model)).items()}
    np.savez(path / "model.npz", **params)
    loaded, _ = load_model(path)
    assert_bit_equal(loaded, model, "big-endian legacy")
