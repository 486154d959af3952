"""The guide's original single-file layout, as the original LinearNexus code writes it.

Two sources of such directories:

- ``tests/data/linearnexus_original/``: files written by the original code itself
  (``linearnexus/checkpoint.py``; see ``make_fixtures.py`` there), copied to a temporary
  directory before each use;
- ``write_legacy`` below: the same layout for any model and optimizer (``model.npz`` and
  ``optimizer.npz`` compressed, dotted model keys, positional ``opt_<i>`` optimizer keys,
  ``optimizer_meta.pkl``, ``config.json``...), checked against the real files by
  ``test_write_legacy_matches_the_original_files``.

The pickle is never unpickled.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import struct
import tokenize
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_bit_equal, make_optimizer, train_steps, tree_of_files
from flax import nnx

from shardckpt import (
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    LMModel,
    ModelConfig,
    StructureMismatchError,
    load_model,
    load_optimizer,
    save_model,
    save_optimizer,
)
from shardckpt.loading.legacy import LegacyCheckpoint
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import save_items

ORIGINAL = Path(__file__).parents[1] / "data" / "linearnexus_original"
TINY = {"vocab_size": 32, "hidden_size": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16,
        "intermediate_size": 32}
ADAMW_LEAVES = 1 + 2 * 11     # count, then mu and nu of the 11 parameters of a 1-layer LMModel


class SideEffect:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the original layout -------------------------------------------------------------------

def _model_arrays(model, style: str = "dotted") -> dict[str, np.ndarray]:
    """The original's model.npz content: ``nnx.to_pure_dict(nnx.state(model))`` joined with
    '.', typed PRNG keys left out. ``style`` gives older hand-made variants of the names."""
    out = {}
    for path, value in nnx.to_flat_state(nnx.state(model)):
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            continue
        sep = "/" if style == "slash" else "."
        out[sep.join(map(str, path)) + (".value" if style == "value-suffix" else "")] = np.asarray(value)
    return out


def _optimizer_arrays(optimizer) -> dict[str, np.ndarray]:
    """The original's optimizer.npz content: the leaves of ``optimizer.opt_state`` in
    ``jax.tree_util`` order, named by position."""
    return {f"opt_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(optimizer.opt_state))}


def write_legacy(path: Path, model, optimizer=None, *, compressed=True, style="dotted", step=100,
                 pickle_payload=None):
    """A checkpoint directory as the original ``CheckpointManager.save`` leaves it."""
    path.mkdir(parents=True)
    save = np.savez_compressed if compressed else np.savez
    params = _model_arrays(model, style)
    save(path / "model.npz", **params)
    (path / "config.json").write_text(json.dumps({"model_config": model.config.to_dict(), "step": step,
                                                  "train_config": {"lr": 3e-4}}, indent=2))
    (path / "structure.json").write_text(json.dumps({k: list(v.shape) for k, v in params.items()}, indent=2))
    (path / "metrics.json").write_text(json.dumps({"loss": 1.25}, indent=2))
    (path / "extra.json").write_text(json.dumps({"wandb_run_id": "abc123"}, indent=2))
    if optimizer is not None:
        arrays = _optimizer_arrays(optimizer)
        save(path / "optimizer.npz", **arrays)
        if pickle_payload is None:
            pickle_payload = {"tree_def": jax.tree_util.tree_structure(optimizer.opt_state),
                              "non_arrays": {}, "n_leaves": len(arrays)}
        (path / "optimizer_meta.pkl").write_bytes(pickle.dumps(pickle_payload))
    return path


def original(tmp_path: Path, name: str) -> Path:
    """A private copy of files the original code wrote."""
    dst = tmp_path / "orig" / name
    shutil.copytree(ORIGINAL / name, dst)
    return dst


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:       # trusted test data
        return {k: z[k] for k in z.files}


def assert_opt_state_is(optimizer, saved: dict[str, np.ndarray]):
    leaves = jax.tree_util.tree_leaves(optimizer.opt_state)
    assert len(leaves) == len(saved)
    for i, leaf in enumerate(leaves):
        want = saved[f"opt_{i}"]
        got = np.asarray(leaf)
        assert got.shape == want.shape
        assert got.dtype.itemsize == want.dtype.itemsize and got.tobytes() == want.tobytes(), f"opt_{i}"


def assert_params_are(model, saved: dict[str, np.ndarray]):
    for key, value in _model_arrays(model).items():
        assert key in saved, key
        assert value.tobytes() == np.ascontiguousarray(saved[key]).astype(saved[key].dtype.newbyteorder("=")).tobytes(), key


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(SideEffect(probe)))   # the payload is live
    assert probe.exists()
    probe.unlink()
    return m


@pytest.fixture
def tiny_model():
    return LMModel(ModelConfig(**TINY, dropout=0.1), rngs=nnx.Rngs(0))


# --- what the original really writes -------------------------------------------------------

def _layout(path: Path) -> dict:
    out = {"files": sorted(os.listdir(path))}
    for name in ("model.npz", "optimizer.npz"):
        if not (path / name).exists():
            continue
        members = {}
        with zipfile.ZipFile(path / name) as zf:
            for info in zf.infolist():
                with zf.open(info) as m:
                    version = np.lib.format.read_magic(m)
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
                members[info.filename] = (info.compress_type, version, shape, fortran, dtype.str)
        out[name] = members
    out["config"] = sorted(json.loads((path / "config.json").read_text()))
    return out


def test_the_original_files_are_what_the_original_writes():
    """The facts this module relies on, read from the files the original code wrote."""
    layout = _layout(ORIGINAL / "manager" / "step_100")
    assert layout["files"] == ["config.json", "extra.json", "metrics.json", "model.npz", "optimizer.npz",
                               "optimizer_meta.pkl", "structure.json"]
    assert layout["config"] == ["model_config", "step", "train_config"]
    model, opt = layout["model.npz"], layout["optimizer.npz"]
    assert {v[0] for v in {**model, **opt}.values()} == {zipfile.ZIP_DEFLATED}    # savez_compressed
    assert {v[1] for v in {**model, **opt}.values()} == {(1, 0)}
    assert "embed.embedding.npy" in model and "layers.0.attn_dropout.rngs.count.npy" in model
    assert not any("rngs.key" in k for k in model)                                  # keys left out
    assert list(opt) == [f"opt_{i}.npy" for i in range(ADAMW_LEAVES)]
    assert opt["opt_0.npy"][2:] == ((), False, "<i4")                               # adam's count
    assert {v[4] for k, v in opt.items() if k != "opt_0.npy"} == {"<f4"}
    bf16 = _layout(ORIGINAL / "bfloat16")
    assert {v[4] for k, v in bf16["optimizer.npz"].items() if k != "opt_0.npy"} == {"|V2"}
    assert "meta.json" in _layout(ORIGINAL / "save_checkpoint")["files"]
    assert json.loads((ORIGINAL / "save_checkpoint" / "meta.json").read_text()) == {"step": 7, "metrics": {"loss": 2.5}}


def test_write_legacy_matches_the_original_files(tmp_path, tiny_model):
    optimizer = make_optimizer(tiny_model, optax.adamw(1e-3))
    train_steps(tiny_model, optimizer, 2)
    mine = write_legacy(tmp_path / "step_100", tiny_model, optimizer)
    assert _layout(mine) == _layout(ORIGINAL / "manager" / "step_100")


# --- #12.2: the original's optimizer, by position ---------------------------------------------

def test_original_manager_checkpoint_resumes_adam(tmp_path):
    path = original(tmp_path, "manager")
    mgr = CheckpointManager(path)
    assert mgr.all_steps() == [100]
    with pytest.warns(UserWarning) as rec:
        state = mgr.load_latest(tx=optax.adamw(1e-3), allow_pickle=True)
    assert any("step" in str(w.message) for w in rec)        # optimizer.step was never saved
    assert state.step == 100
    assert state.metrics == {"loss": 1.25} and state.extra == {"wandb_run_id": "abc123"}
    assert state.train_config == {"lr": 1e-3}
    assert state.config == json.loads((path / "step_100" / "config.json").read_text())["model_config"]
    assert_params_are(state.model, npz(path / "step_100" / "model.npz"))
    saved = npz(path / "step_100" / "optimizer.npz")
    assert_opt_state_is(state.optimizer, saved)
    assert int(state.optimizer.opt_state[0].count[...]) == 2      # Adam's bias correction resumes
    assert int(state.optimizer.step[...]) == 0
    assert np.any(np.asarray(state.optimizer.opt_state[0].mu["embed"]["embedding"][...]))
    train_steps(state.model, state.optimizer, 1)                   # and it trains on
    assert int(state.optimizer.opt_state[0].count[...]) == 3


def test_original_optimizer_via_load_optimizer(tmp_path):
    path = original(tmp_path, "manager") / "step_100"
    model, _ = load_model(path)
    before = tree_of_files(path)
    opt = load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)
    assert_opt_state_is(opt, npz(path / "optimizer.npz"))
    assert tree_of_files(path) == before


def test_original_save_checkpoint_meta_json(tmp_path):
    """save_checkpoint wrote meta.json (step, metrics): both reach the loaded state."""
    path = original(tmp_path, "save_checkpoint")
    ck = open_checkpoint(path)
    assert ck.legacy and ck.step == 7 and ck.metrics == {"loss": 2.5}
    state = CheckpointManager(tmp_path / "m").load(path, tx=optax.adamw(1e-3), allow_pickle=True)
    assert state.step == 7 and state.metrics == {"loss": 2.5}
    assert_opt_state_is(state.optimizer, npz(path / "optimizer.npz"))
    # listed with its metrics, so best-tracking sees it
    runs = tmp_path / "runs"
    shutil.copytree(path, runs / "step_7")
    mgr = CheckpointManager(runs, best_metric="loss")
    assert mgr.best_step == 7 and mgr.checkpoints[0].metrics == {"loss": 2.5}


def test_meta_json_step_wins_over_config(tmp_path, tiny_model):
    path = write_legacy(tmp_path / "ck", tiny_model, step=5)
    (path / "meta.json").write_text(json.dumps({"step": 9, "metrics": {"loss": 0.5}}))
    assert open_checkpoint(path).step == 9
    assert open_checkpoint(path).metrics == {"loss": 1.25}       # metrics.json first
    (path / "metrics.json").unlink()
    assert open_checkpoint(path).metrics == {"loss": 0.5}
    (path / "meta.json").write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="meta.json"):
        open_checkpoint(path)


def test_original_bfloat16(tmp_path):
    path = original(tmp_path, "bfloat16")
    model, cfg = load_model(path)
    assert cfg["param_dtype"] == "bfloat16"
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    assert_params_are(model, npz(path / "model.npz"))
    opt = load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)
    assert opt.opt_state[0].mu["embed"]["embedding"][...].dtype == jnp.bfloat16
    assert_opt_state_is(opt, npz(path / "optimizer.npz"))


@pytest.mark.parametrize("compressed", [True, False])
def test_positional_roundtrip_other_optimizers(tmp_path, tiny_model, compressed):
    """Orders that nnx.state's sorted keys would get wrong (adafactor's v_row, v_col, v;
    MultiSteps' mini_step first) still land on the right leaves."""
    for i, tx in enumerate([optax.adafactor(1e-3), optax.MultiSteps(optax.adam(1e-3), 2),
                            optax.chain(*[optax.scale_by_adam() for _ in range(11)])]):
        optimizer = make_optimizer(tiny_model, tx)
        train_steps(tiny_model, optimizer, 1)
        path = write_legacy(tmp_path / f"ck{i}", tiny_model, optimizer, compressed=compressed)
        with pytest.warns(UserWarning, match="step"):
            restored = load_optimizer(path, tiny_model, tx, allow_pickle=True)
        assert_opt_state_is(restored, _optimizer_arrays(optimizer))


def test_positional_mismatch_names_the_first_bad_position(tmp_path):
    path = original(tmp_path, "manager") / "step_100"
    model, _ = load_model(path)
    # another model: opt_1 (mu of embed.embedding) is the first leaf of another shape
    other = LMModel(ModelConfig(**{**TINY, "vocab_size": 48}), rngs=nnx.Rngs(0))
    with pytest.raises(StructureMismatchError, match=r"opt_1 is \(32, 16\).*embed\.embedding.*\(48, 16\)"):
        load_optimizer(path, other, optax.adamw(1e-3), allow_pickle=True)
    # another optimizer: the count differs
    for tx in (optax.sgd(1e-2, momentum=0.9), optax.adafactor(1e-3)):
        with pytest.raises(StructureMismatchError, match=f"holds {ADAMW_LEAVES} optimizer state leaves"):
            load_optimizer(path, model, tx, allow_pickle=True)
    with pytest.raises(StructureMismatchError):
        CheckpointManager(tmp_path / "m").load(path, tx=optax.sgd(1e-2, momentum=0.9), allow_pickle=True)
    # another dtype at one position
    arrays = npz(path / "optimizer.npz")
    arrays["opt_5"] = arrays["opt_5"].astype(np.float64)
    np.savez_compressed(path / "optimizer.npz", **arrays)
    with pytest.raises(StructureMismatchError, match=r"opt_5 is .*float64.*float32"):
        load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)
    # a position missing (the original kept non-array leaves in the pickle only)
    del arrays["opt_5"]
    np.savez_compressed(path / "optimizer.npz", **arrays)
    with pytest.raises(StructureMismatchError, match="opt_5 is absent"):
        load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)


def test_no_matching_leaf_is_refused_in_any_layout(tmp_path, tiny_model):
    """Never a silently fresh optimizer: a resumed run would restart Adam."""
    legacy = write_legacy(tmp_path / "legacy", tiny_model)
    np.savez_compressed(legacy / "optimizer.npz", **{"something.else": np.zeros(3, np.float32)})
    with pytest.raises(StructureMismatchError, match="no leaf of the saved optimizer matches"):
        load_optimizer(legacy, tiny_model, optax.adamw(1e-3))
    ours = tmp_path / "ours"
    save_items(ours, {"optimizer": {"unrelated": np.zeros(3, np.float32)}})
    with pytest.raises(StructureMismatchError, match="no leaf of the saved optimizer matches"):
        load_optimizer(ours, tiny_model, optax.adamw(1e-3))


def test_whole_config_dict_is_not_nested_again(tmp_path, tiny_model):
    """The original's save_model(path, model, config) took the whole config.json dict."""
    whole = {"model_config": tiny_model.config.to_dict(), "step": 3}
    save_model(tmp_path / "a", tiny_model, whole)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_config"] == tiny_model.config.to_dict()
    loaded, config = load_model(tmp_path / "a")
    assert config == tiny_model.config.to_dict()
    assert_bit_equal(nnx.state(loaded, nnx.Param), nnx.state(tiny_model, nnx.Param))
    optimizer = make_optimizer(tiny_model)
    CheckpointManager(tmp_path / "m").save(1, tiny_model, optimizer, config=whole)
    state = CheckpointManager(tmp_path / "m").load_latest(tx=optax.adamw(1e-3))
    assert state.config == tiny_model.config.to_dict()


def test_bare_model_config_in_config_json(tmp_path, tiny_model):
    """The original's load_model also read a config.json that is the model config itself."""
    path = write_legacy(tmp_path / "ck", tiny_model)
    (path / "config.json").write_text(json.dumps({**tiny_model.config.to_dict(), "step": 4}))
    _, config = load_model(path)
    assert config == tiny_model.config.to_dict()
    assert open_checkpoint(path).step == 4


# --- the pickle -----------------------------------------------------------------------------

def test_pickled_optimizer_metadata_is_refused(tmp_path, model, marker):
    optimizer = make_optimizer(model)
    path = write_legacy(tmp_path / "ck", model, optimizer, pickle_payload=SideEffect(marker))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_optimizer(path, model, optax.adamw(1e-3))
    with pytest.raises(CheckpointError, match="allow_pickle=True") as e:
        CheckpointManager(tmp_path / "m").load(path)
    assert "optimizer_meta.pkl" in str(e.value)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):   # before any structure check
        CheckpointManager(tmp_path / "m").load(path, tx=optax.sgd(1e-5))
    # allowed: the pickle is still not opened
    with pytest.warns(UserWarning, match="step"):
        restored = load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)
    assert_opt_state_is(restored, _optimizer_arrays(optimizer))
    assert not marker.exists()


def test_original_pickle_refused_by_default(tmp_path):
    path = original(tmp_path, "manager") / "step_100"
    model, _ = load_model(path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_optimizer(path, model)
    state = CheckpointManager(tmp_path / "m").load(path, should_load_optimizer=False)
    assert state.optimizer is None and state.step == 100


def test_pickle_removed_by_the_user(tmp_path, tiny_model):
    optimizer = make_optimizer(tiny_model)
    train_steps(tiny_model, optimizer, 1)
    path = write_legacy(tmp_path / "ck", tiny_model, optimizer)
    (path / "optimizer_meta.pkl").unlink()
    with pytest.warns(UserWarning, match="step"):
        state = CheckpointManager(tmp_path / "m").load(path, tx=optax.adamw(1e-3))
    assert_opt_state_is(state.optimizer, _optimizer_arrays(optimizer))


def test_key_path_optimizer_variant(tmp_path, tiny_model):
    """Hand-made variants named optimizer leaves by key path: read by key."""
    optimizer = make_optimizer(tiny_model)
    train_steps(tiny_model, optimizer, 2)
    path = write_legacy(tmp_path / "ck", tiny_model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(optimizer))}
    np.savez_compressed(path / "optimizer.npz", **flat)
    restored = load_optimizer(path, tiny_model, optax.adamw(1e-3))
    assert_bit_equal(restored, optimizer)


# --- the model --------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("style", ["dotted", "value-suffix", "slash"])
def test_load_model_reads_legacy(tmp_path, model, compressed, style, marker):
    path = write_legacy(tmp_path / "step_100", model, make_optimizer(model), compressed=compressed,
                        style=style, pickle_payload=SideEffect(marker))
    before = tree_of_files(path)
    loaded, config = load_model(path)
    assert isinstance(loaded, LMModel)
    assert config == model.config.to_dict()
    assert_bit_equal(loaded, model, "legacy model")
    target = LMModel(model.config, rngs=nnx.Rngs(7))
    load_model(path, model=target)
    assert_bit_equal(target, model)
    assert tree_of_files(path) == before          # read-only
    assert not marker.exists()


def test_legacy_without_rng_keys_warns_and_initialises(tmp_path, tiny_model):
    path = write_legacy(tmp_path / "ck", tiny_model)
    with pytest.warns(UserWarning, match="rngs"):
        loaded, _ = load_model(path)
    assert_bit_equal(nnx.state(loaded, nnx.Param), nnx.state(tiny_model, nnx.Param))


def test_legacy_of_another_config(tmp_path, model):
    path = write_legacy(tmp_path / "ck", model)
    with pytest.raises(StructureMismatchError, match="embed.embedding"):
        load_model(path, model=LMModel(ModelConfig(hidden_size=32), rngs=nnx.Rngs(0)))


def test_legacy_dir_is_never_overwritten_and_can_be_converted(tmp_path):
    path = original(tmp_path, "manager") / "step_100"
    before = tree_of_files(path)
    model, _ = load_model(path)
    with pytest.raises(CheckpointError):
        save_model(path, model)
    with pytest.raises(CheckpointError):
        save_optimizer(path, make_optimizer(model))
    assert tree_of_files(path) == before
    opt = load_optimizer(path, model, optax.adamw(1e-3), allow_pickle=True)
    CheckpointManager(tmp_path / "converted").save(100, model, opt)
    state = CheckpointManager(tmp_path / "converted").load_latest(tx=optax.adamw(1e-3))
    assert_bit_equal(state.optimizer.opt_state, opt.opt_state)
    assert_bit_equal(nnx.state(state.model, nnx.Param), nnx.state(model, nnx.Param))


def test_big_endian_and_fortran_arrays_keep_their_values(tmp_path, tiny_model):
    path = write_legacy(tmp_path / "ck", tiny_model)
    params = _model_arrays(tiny_model)
    mixed = {k: (v.astype(v.dtype.newbyteorder(">")) if i % 2 or v.ndim < 2 else np.asfortranarray(v))
             for i, (k, v) in enumerate(params.items())}
    np.savez(path / "model.npz", **mixed)
    loaded, _ = load_model(path)
    assert_params_are(loaded, params)


# --- #11.6: read exactly the member that was validated ----------------------------------------

def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip(path: Path, members: list[tuple[str, bytes]], compress=zipfile.ZIP_STORED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compress) as zf:
            for name, data in members:
                zf.writestr(name, data)


def _small_legacy(path: Path) -> Path:
    path.mkdir(parents=True)
    np.savez_compressed(path / "model.npz", w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(3, np.float32))
    (path / "config.json").write_text(json.dumps({"model_config": {}, "step": 1}))
    return path


def _read_all(path: Path) -> dict:
    ck = LegacyCheckpoint(path, allow_pickle=True)
    return {item: ck.read_arrays(item) for item in ck.items}


def _refused_small(path: Path, match: str):
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=match):
            _read_all(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (64 << 20), peak


HUGE = (1 << 20, 1 << 20, 1 << 20)   # 4 EiB of float32


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_shadow_member_is_refused(tmp_path, compress):
    """np.load answers 'w' with a member named plain 'w' when there is one: the member
    checked ('w.npy') would not be the member read."""
    path = _small_legacy(tmp_path / "ck")
    good = _npy(np.zeros(3, np.float32))
    evil = _npy_header((1 << 20, 1 << 20)) + b"\0" * 16       # a 4 TiB allocation by np.load
    _zip(path / "model.npz", [("w.npy", good), ("w", evil)], compress)
    _refused_small(path, "ambiguous")
    _zip(path / "model.npz", [("w", evil), ("w.npy", good)], compress)
    _refused_small(path, "ambiguous")


@pytest.mark.parametrize("members", [
    [("w.npy", "a"), ("w.npy", "b")],                    # the same name twice
    [("w.npy", "a"), ("w", "b")],                        # differing only by .npy
    [("a.b.npy", "a"), ("a/b.npy", "b")],                # two names, one key
    [("w.npy", "a"), ("w.value.npy", "b")],
])
def test_ambiguous_member_names_are_refused(tmp_path, members):
    path = _small_legacy(tmp_path / "ck")
    data = {"a": _npy(np.zeros(3, np.float32)), "b": _npy(np.ones(3, np.float32))}
    _zip(path / "model.npz", [(n, data[d]) for n, d in members])
    _refused_small(path, "ambiguous")


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_huge_declared_shape_is_refused_before_allocating(tmp_path, compress):
    path = _small_legacy(tmp_path / "ck")
    _zip(path / "model.npz", [("w.npy", _npy_header(HUGE) + b"\0" * 64)], compress)
    _refused_small(path, "declares")


def test_plain_named_member_is_never_read(tmp_path):
    """A member without .npy is not an array of the checkpoint: not read, not allocated."""
    path = _small_legacy(tmp_path / "ck")
    _zip(path / "model.npz", [("b.npy", _npy(np.ones(3, np.float32))),
                              ("w", _npy_header(HUGE) + b"\0" * 16)])
    tracemalloc.start()
    try:
        assert list(_read_all(path)["model"]) == ["b"]
        assert tracemalloc.get_traced_memory()[1] < (64 << 20)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("descr,shape", [("<f8", (3,)), ("<f4", (4,)), ("<f2", (3,)), ("<f4", (2,))])
def test_header_lying_about_dtype_or_shape(tmp_path, descr, shape):
    """The data is 3 float32 (12 bytes): any header describing another size is refused."""
    path = _small_legacy(tmp_path / "ck")
    _zip(path / "model.npz", [("w.npy", _npy_header(shape, descr) + np.ones(3, np.float32).tobytes())])
    _refused_small(path, "declares")


def test_truncated_member(tmp_path):
    path = _small_legacy(tmp_path / "ck")
    raw = _npy(np.arange(100, dtype=np.float32))
    _zip(path / "model.npz", [("w.npy", raw[:-40])], zipfile.ZIP_DEFLATED)
    _refused_small(path, "declares")


def test_object_arrays_in_npz_are_refused(tmp_path, tiny_model, marker):
    path = write_legacy(tmp_path / "ck", tiny_model)
    params = _model_arrays(tiny_model)
    params["evil"] = np.array([SideEffect(marker)], dtype=object)
    np.savez_compressed(path / "model.npz", **params)        # np.save pickles object arrays
    with pytest.raises(CorruptCheckpointError, match="objects"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("descr", ["[('a', '<f4')]", "('<f4', (2,))", "'|V0'", "'|O'"])
def test_structured_subarray_and_empty_dtypes_are_refused(tmp_path, descr):
    path = _small_legacy(tmp_path / "ck")
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': (1,), }}"
    header = header.ljust(118) + "\n"
    raw = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + b"\0" * 8
    _zip(path / "model.npz", [("w.npy", raw)])
    with pytest.raises(CorruptCheckpointError):
        _read_all(path)


def test_not_an_npz(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CorruptCheckpointError, match="model.npz"):
        load_model(tmp_path / "ck")


# --- #11.8: every damage is a CheckpointError -------------------------------------------------

def _fuzz_dir(tmp_path: Path, name: str, compressed: bool) -> Path:
    path = tmp_path / name
    path.mkdir()
    save = np.savez_compressed if compressed else np.savez
    save(path / "model.npz", w=np.arange(4, dtype=np.float32), s=np.float32(2))
    save(path / "optimizer.npz", opt_0=np.int32(3), opt_1=np.ones(2, np.float32))
    return path


def test_flipped_header_bit_raising_token_error_is_corrupt(tmp_path):
    """numpy parses a .npy header that literal_eval rejects again with the tokenizer: a
    flipped '}' makes np.load raise tokenize.TokenError (for a member over 4 KiB, whose
    header is parsed before zipfile reaches the CRC)."""
    path = _small_legacy(tmp_path / "ck")
    np.savez(path / "model.npz", w=np.arange(4096, dtype=np.float32))
    raw = (path / "model.npz").read_bytes()
    damaged = bytearray(raw)
    damaged[raw.index(b"(4096,), }") + len("(4096,), ")] ^= 1        # '}' -> '|'
    with pytest.raises(tokenize.TokenError), np.load(io.BytesIO(bytes(damaged))) as z:
        z["w"]
    (path / "model.npz").write_bytes(bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match="model.npz"):
        _read_all(path)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("name", ["model.npz", "optimizer.npz"])
def test_fuzz_every_byte_and_truncation(tmp_path, monkeypatch, compressed, name):
    """Bit flips at every byte (every bit of the stored .npy headers) and every
    truncation: only CheckpointError subclasses escape, and nothing big is allocated."""
    path = _fuzz_dir(tmp_path, "ck", compressed)
    target = path / name
    raw = target.read_bytes()
    outcomes = {"ok": 0, "refused": 0}

    def attempt(data: bytes):
        target.write_bytes(data)
        try:
            _read_all(path)
            outcomes["ok"] += 1
        except CheckpointError:
            outcomes["refused"] += 1

    from shardckpt.loading import legacy
    real_empty = legacy.aligned_empty

    def bounded_empty(shape, dtype):     # the reader's only allocation sized by a header
        assert np.prod(shape, dtype=object) * np.dtype(dtype).itemsize <= len(raw), (shape, dtype)
        return real_empty(shape, dtype)

    monkeypatch.setattr(legacy, "aligned_empty", bounded_empty)
    headers = {i for m in re.finditer(re.escape(np.lib.format.MAGIC_PREFIX), raw) for i in range(m.start(), m.start() + 128)}
    for pos in range(len(raw)):
        for bit in (range(8) if pos in headers else (pos % 8,)):
            damaged = bytearray(raw)
            damaged[pos] ^= 1 << bit
            attempt(bytes(damaged))
    for n in range(len(raw)):
        attempt(raw[:n])
    assert outcomes["refused"] > len(raw)


# --- #11.5: links and things that are not files -----------------------------------------------

@pytest.mark.parametrize("name", ["model.npz", "optimizer.npz", "config.json", "meta.json", "metrics.json"])
def test_symlinked_legacy_file_is_refused(tmp_path, tiny_model, name):
    optimizer = make_optimizer(tiny_model)
    path = write_legacy(tmp_path / "ck", tiny_model, optimizer)
    (path / "meta.json").write_text(json.dumps({"step": 3}))
    outside = tmp_path / ("outside-" + name)
    os.rename(path / name, outside)
    os.symlink(outside, path / name)
    with pytest.raises(CorruptCheckpointError, match=re.escape(name) + ".*symlink"):
        CheckpointManager(tmp_path / "m").load(path, allow_pickle=True)


@pytest.mark.parametrize("kind", ["dangling-symlink", "directory", "fifo"])
@pytest.mark.parametrize("name", ["model.npz", "optimizer.npz"])
def test_legacy_npz_that_is_not_a_regular_file(tmp_path, tiny_model, kind, name):
    path = write_legacy(tmp_path / "ck", tiny_model, make_optimizer(tiny_model))
    (path / name).unlink()
    if kind == "dangling-symlink":
        os.symlink(tmp_path / "nowhere.npz", path / name)
    elif kind == "directory":
        (path / name).mkdir()
    else:
        os.mkfifo(path / name)
    with pytest.raises(CorruptCheckpointError, match=re.escape(name)):
        CheckpointManager(tmp_path / "m").load(path, allow_pickle=True)


# --- the guide's example ------------------------------------------------------------------------

def test_guide_original_layout_example(tmp_path, monkeypatch, model):
    """The code block of docs/checkpointing_guide.md's "Reading the original layout" runs."""
    guide = (Path(__file__).parents[2] / "docs" / "checkpointing_guide.md").read_text()
    section = guide[guide.index("**Reading the original layout.**"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 1)
    scope = {"model": model, "optimizer": optimizer, "nnx": nnx, "optax": optax,
             "manager": CheckpointManager("./checkpoints")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exec(compile(code, "checkpointing_guide.md", "exec"), scope)  # noqa: S102 - the guide's own code
    assert_opt_state_is(scope["state"].optimizer, _optimizer_arrays(optimizer))
    assert scope["state"].step == 1000
