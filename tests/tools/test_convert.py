"""Orbax <-> shardckpt conversion and safetensors export (shardckpt.convert, `shardckpt convert`).

Every Orbax directory here is written by orbax-checkpoint itself, from a tiny trained
LMModel and its nnx.Optimizer (Adam moments nonzero), in float32 and in bfloat16 with
dropout PRNG keys. No Ray.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

ocp = pytest.importorskip("orbax.checkpoint")

from conftest import (
    assert_bit_equal,
    bits_of,
    make_optimizer,
    train_steps,
    tree_of_files,
)

from shardckpt import LMModel, ModelConfig, load_model
from shardckpt import convert as cv
from shardckpt.errors import CheckpointError, CheckpointNotFoundError
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import save_items
from shardckpt.tools.cli import main

CONFIGS = {
    "f32": ModelConfig(),
    "bf16": ModelConfig(param_dtype="bfloat16", dtype="bfloat16", dropout=0.1),  # + PRNG key leaves
}


def _trained(cfg):
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    opt = make_optimizer(model)
    train_steps(model, opt, 1)
    return model, opt


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request):
    cfg = CONFIGS[request.param]
    model, opt = _trained(cfg)
    return cfg, model, opt


def _abstract(cfg):
    model = nnx.eval_shape(lambda: LMModel(cfg, rngs=nnx.Rngs(0)))
    opt = nnx.eval_shape(lambda m: make_optimizer(m), model)
    return model, opt


def _orbax_standard(path, tree):
    with ocp.StandardCheckpointer() as ck:
        ck.save(path, tree)
        ck.wait_until_finished()


def _restore_shardckpt(dst, cfg):
    ck = open_checkpoint(dst)
    am, ao = _abstract(cfg)
    model, _ = ck.restore("model", nnx.state(am))
    opt, _ = ck.restore("optimizer", nnx.state(ao))
    return model, opt


def _check_state(cfg, model, opt):
    if cfg.param_dtype == "bfloat16":
        assert nnx.state(model)["embed"]["embedding"].get_value().dtype == jax.numpy.bfloat16
        keys = [k for k in bits_of(model) if k.endswith("rngs.key")]
        assert keys and all(bits_of(model)[k][0].startswith("key<") for k in keys)
    mu = bits_of(nnx.state(opt))["opt_state.0.mu.embed.embedding"]
    assert any(mu[2]), "Adam moments are zero: the fixture did not train"


# --- Orbax -> shardckpt --------------------------------------------------------------------------

def test_standard_checkpointer_to_shardckpt_bit_exact(trained, tmp_path):
    cfg, model, opt = trained
    _check_state(cfg, model, opt)
    src = tmp_path / "orbax"
    _orbax_standard(src, {"model": nnx.state(model), "optimizer": nnx.state(opt)})
    assert cv.orbax_kind(src) == "standard"
    report = cv.from_orbax(src, tmp_path / "ours")
    assert report.items == ["model", "optimizer"] and report.kind == "standard"
    ck = open_checkpoint(tmp_path / "ours")
    assert sorted(ck.items) == ["model", "optimizer"]
    assert set(ck.item_record("model").arrays) == set(bits_of(model))   # keys as save_model writes them
    rmodel, ropt = _restore_shardckpt(tmp_path / "ours", cfg)
    assert_bit_equal(rmodel, nnx.state(model), "model")
    assert_bit_equal(ropt, nnx.state(opt), "optimizer")
    # load_model fills a fresh model from it
    fresh = LMModel(cfg, rngs=nnx.Rngs(7))
    loaded, _ = load_model(tmp_path / "ours", model=fresh)
    assert_bit_equal(loaded, model, "load_model")


def test_pytree_checkpointer_bare_state(tmp_path):
    """The Flax docs' way: ``checkpointer.save(path, nnx.state(model))``, a bare tree."""
    cfg = CONFIGS["bf16"]
    model, _ = _trained(cfg)
    src = tmp_path / "orbax"
    with ocp.PyTreeCheckpointer() as ck:
        ck.save(src, args=ocp.args.PyTreeSave(nnx.state(model)))
    assert cv.orbax_kind(src) == "pytree"
    cv.from_orbax(src, tmp_path / "ours", model_config=cfg.to_dict())
    loaded, config = load_model(tmp_path / "ours")   # builds the model from the config
    assert config == cfg.to_dict()
    assert_bit_equal(loaded, model, "load_model without a model")
    ck = open_checkpoint(tmp_path / "ours")
    assert ck.items == ["model"] and ck.step is None
    spec = next(s for k, s in ck.item_record("model").arrays.items() if k.endswith("rngs.key"))
    assert spec.key_impl == "threefry2x32"
    restored, _ = ck.restore("model", nnx.state(_abstract(cfg)[0]))
    assert_bit_equal(restored, nnx.state(model), "bare tree")


def test_checkpoint_manager_steps(trained, tmp_path):
    cfg, model, opt = trained
    root = tmp_path / "orbax_root"
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(root, options=options) as mngr:   # best_fn: the manager keeps metrics
        mngr.save(3, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model)),
                                             optimizer=ocp.args.StandardSave(nnx.state(opt)),
                                             meta=ocp.args.JsonSave({"run": "a", "lr": 1e-3})),
                  metrics={"loss": 1.5})
        mngr.save(5, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model)),
                                             optimizer=ocp.args.StandardSave(nnx.state(opt))),
                  metrics={"loss": 1.25})
        mngr.wait_until_finished()
    assert cv.orbax_kind(root) == "manager"
    assert cv.orbax_kind(root / "3") == "step"
    assert cv.orbax_kind(root / "3" / "model") == "pytree"   # an item alone is a bare tree

    # one step
    report = cv.from_orbax(root / "3", tmp_path / "one")
    assert report.steps == [3]
    ck = open_checkpoint(tmp_path / "one")
    assert ck.step == 3 and ck.metrics == {"loss": 1.5}
    assert ck.read_json("orbax.json")["json_items"] == {"meta": {"run": "a", "lr": 1e-3}}
    rmodel, ropt = _restore_shardckpt(tmp_path / "one", cfg)
    assert_bit_equal(rmodel, nnx.state(model), "model")
    assert_bit_equal(ropt, nnx.state(opt), "optimizer")

    # the whole manager -> a shardckpt manager directory
    report = cv.from_orbax(root, tmp_path / "all")
    assert report.steps == [3, 5]
    assert sorted(os.listdir(tmp_path / "all")) == ["step_3", "step_5"]
    from shardckpt import CheckpointManager
    assert CheckpointManager(tmp_path / "all").all_steps() == [3, 5]
    rmodel, _ = _restore_shardckpt(tmp_path / "all" / "step_5", cfg)
    assert_bit_equal(rmodel, nnx.state(model), "step 5")

    # and the manager directory back to an Orbax CheckpointManager: same steps, items, bits
    report = cv.to_orbax(tmp_path / "all", tmp_path / "orbax_again")
    assert report.kind == "manager" and report.steps == [3, 5]
    for step in (3, 5):
        for item in ("model", "optimizer"):
            _assert_same_orbax(root / str(step) / item, tmp_path / "orbax_again" / str(step) / item)
    assert json.loads((tmp_path / "orbax_again" / "3" / "meta" / "metadata").read_text()) == {"run": "a", "lr": 1e-3}
    with ocp.CheckpointManager(tmp_path / "orbax_again") as mngr:
        assert mngr.all_steps() == [3, 5] and mngr.metrics(5) == {"loss": 1.25}


def test_checkpoint_manager_default_item_is_split(tmp_path):
    cfg = CONFIGS["f32"]
    model, opt = _trained(cfg)
    root = tmp_path / "orbax_root"
    with ocp.CheckpointManager(root) as mngr:   # StandardSave alone: the item is "default"
        mngr.save(1, args=ocp.args.StandardSave({"model": nnx.state(model), "optimizer": nnx.state(opt)}))
        mngr.wait_until_finished()
    meta = json.loads((root / "1" / "_CHECKPOINT_METADATA").read_text())
    assert list(meta["item_handlers"]) == ["default"]
    cv.from_orbax(root / "1", tmp_path / "ours")
    rmodel, ropt = _restore_shardckpt(tmp_path / "ours", cfg)
    assert_bit_equal(rmodel, nnx.state(model), "model")
    assert_bit_equal(ropt, nnx.state(opt), "optimizer")
    # and back: the same Orbax layout (one "default" item holding both)
    cv.to_orbax(tmp_path / "ours", tmp_path / "back")
    assert sorted(os.listdir(tmp_path / "back")) == ["1"]
    _assert_same_orbax(root / "1" / "default", tmp_path / "back" / "1" / "default")


def test_unknown_items_refused_unless_skipped(tmp_path):
    root = tmp_path / "orbax_root"
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(2, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": np.ones(3, np.float32)})))
        mngr.wait_until_finished()
    meta_path = root / "2" / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_path.read_text())
    meta["item_handlers"]["custom"] = "mylib.MyHandler"   # as a custom handler records itself
    meta_path.write_text(json.dumps(meta))
    (root / "2" / "custom").mkdir()
    (root / "2" / "custom" / "blob.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="mylib.MyHandler"):
        cv.from_orbax(root / "2", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    report = cv.from_orbax(root / "2", tmp_path / "ours", skip_unknown=True)
    assert any("custom" in n for n in report.notes)
    assert open_checkpoint(tmp_path / "ours").items == ["model"]


# --- shardckpt -> Orbax --------------------------------------------------------------------------

def _save_ours(path, model, opt, step=10):
    save_items(path, {"model": nnx.state(model), "optimizer": nnx.state(opt)}, step=step,
                    metrics={"loss": 2.0})


def test_shardckpt_to_orbax_restores_with_orbax(trained, tmp_path):
    cfg, model, opt = trained
    _save_ours(tmp_path / "ours", model, opt)
    report = cv.to_orbax(tmp_path / "ours", tmp_path / "orbax")
    assert report.kind == "standard" and cv.orbax_kind(tmp_path / "orbax") == "standard"
    am, ao = _abstract(cfg)
    with ocp.StandardCheckpointer() as ck:   # the Flax docs' restore, with nnx's own abstract state
        restored = ck.restore(tmp_path / "orbax", {"model": nnx.state(am), "optimizer": nnx.state(ao)})
    assert_bit_equal(restored["model"], nnx.state(model), "model")
    assert_bit_equal(restored["optimizer"], nnx.state(opt), "optimizer")
    # and without a target: Orbax's metadata alone
    with ocp.PyTreeCheckpointer() as ck:
        plain = ck.restore(tmp_path / "orbax")
    flat = {k.removesuffix(".value"): v for k, v in bits_of(plain["model"]).items()}
    assert flat == bits_of(model)


def test_shardckpt_to_orbax_pure_dict_and_manager(tmp_path):
    cfg = CONFIGS["bf16"]
    model, opt = _trained(cfg)
    _save_ours(tmp_path / "ours", model, opt, step=10)
    cv.to_orbax(tmp_path / "ours", tmp_path / "pure", nnx_values=False)
    with ocp.StandardCheckpointer() as ck:
        am, _ = _abstract(cfg)
        pure_target = nnx.state(am).to_pure_dict()
        restored = ck.restore(tmp_path / "pure", {"model": pure_target, "optimizer": nnx.state(_abstract(cfg)[1]).to_pure_dict()})
    assert bits_of(restored["model"]) == bits_of(model)

    cv.to_orbax(tmp_path / "ours", tmp_path / "mgr", kind="manager")
    with ocp.CheckpointManager(tmp_path / "mgr") as mngr:
        assert mngr.all_steps() == [10]
        am, ao = _abstract(cfg)
        out = mngr.restore(10, args=ocp.args.Composite(model=ocp.args.StandardRestore(nnx.state(am)),
                                                       optimizer=ocp.args.StandardRestore(nnx.state(ao))))
        assert mngr.metrics(10) == {"loss": 2.0}
    assert_bit_equal(out["model"], nnx.state(model), "model")
    assert_bit_equal(out["optimizer"], nnx.state(opt), "optimizer")


def _assert_same_orbax(a, b):
    """Two Orbax trees hold the same structure, dtypes and bits (read by Orbax itself)."""
    ta, tb = cv.read_orbax_tree(a), cv.read_orbax_tree(b)
    assert jax.tree_util.tree_structure(ta) == jax.tree_util.tree_structure(tb)
    assert bits_of(ta) == bits_of(tb)


def test_orbax_round_trip_keeps_layout(tmp_path):
    cfg = CONFIGS["bf16"]
    model, opt = _trained(cfg)
    tree = {"model": nnx.state(model), "optimizer": nnx.state(opt)}
    _orbax_standard(tmp_path / "a", tree)
    cv.from_orbax(tmp_path / "a", tmp_path / "ours")
    cv.to_orbax(tmp_path / "ours", tmp_path / "b")
    assert cv.orbax_kind(tmp_path / "b") == "standard"
    _assert_same_orbax(tmp_path / "a", tmp_path / "b")

    # a plain pytree with lists, scalars and strings (PyTreeCheckpointer)
    plain = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
             "layers": [{"b": np.ones(2, np.int32)}, {"b": np.zeros(2, np.int32)}],
             "step": 7, "lr": 0.5, "name": "run-1", "key": jax.random.key(4)}
    with ocp.PyTreeCheckpointer() as ck:
        ck.save(tmp_path / "p", args=ocp.args.PyTreeSave(plain))
    cv.from_orbax(tmp_path / "p", tmp_path / "pours")
    rec = open_checkpoint(tmp_path / "pours").item_record("model")
    assert {k: v["value"] for k, v in rec.scalars.items()} == {"step": 7, "lr": 0.5, "name": "run-1"}
    cv.to_orbax(tmp_path / "pours", tmp_path / "p2")
    assert cv.orbax_kind(tmp_path / "p2") == "pytree"
    _assert_same_orbax(tmp_path / "p", tmp_path / "p2")
    back = cv.read_orbax_tree(tmp_path / "p2")
    assert isinstance(back["layers"], list) and back["name"] == "run-1" and back["step"] == 7


# --- detection, refusals ------------------------------------------------------------------------

def test_orbax_kind_and_open_checkpoint_hint(tmp_path):
    _orbax_standard(tmp_path / "o", {"w": np.ones(2, np.float32)})
    save_items(tmp_path / "ours", {"model": {"w": np.ones(2, np.float32)}})
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    assert cv.orbax_kind(tmp_path / "o") == "standard"
    for p in ("ours", "empty", "file", "missing"):
        assert cv.orbax_kind(tmp_path / p) is None, p
    assert cv.orbax_kind(tmp_path) is None   # a folder holding checkpoints is not a step
    with pytest.raises(cv.OrbaxCheckpointError, match="Orbax checkpoint.*shardckpt convert"):
        open_checkpoint(tmp_path / "o")
    assert issubclass(cv.OrbaxCheckpointError, CheckpointNotFoundError)
    open_checkpoint(tmp_path / "ours")   # no error


def test_refuses_existing_destination(tmp_path):
    _orbax_standard(tmp_path / "o", {"w": np.ones(2, np.float32)})
    save_items(tmp_path / "ours", {"model": {"w": np.ones(2, np.float32)}})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    before = tree_of_files(tmp_path / "ours")
    for src in ("o", "ours"):
        with pytest.raises(CheckpointError, match="not empty"):
            cv.convert(tmp_path / src, taken)
        with pytest.raises(CheckpointError, match="not empty"):   # not even over our own checkpoint
            cv.convert(tmp_path / src, tmp_path / "ours")
    assert tree_of_files(taken) == {"notes.txt": b"mine"}
    assert tree_of_files(tmp_path / "ours") == before
    (tmp_path / "empty").mkdir()
    cv.convert(tmp_path / "o", tmp_path / "empty")   # an empty directory is fine
    assert open_checkpoint(tmp_path / "empty").items == ["model"]


def test_neither_format(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"123")
    for fn in (cv.convert, cv.from_orbax, cv.to_orbax):
        with pytest.raises(CheckpointError, match="neither an Orbax checkpoint.*nor a shardckpt"):
            fn(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- CLI and safetensors ------------------------------------------------------------------------

def test_cli_convert_and_export(tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    cfg = CONFIGS["bf16"]
    model, opt = _trained(cfg)
    _orbax_standard(tmp_path / "o", {"model": nnx.state(model), "optimizer": nnx.state(opt)})
    assert main(["convert", str(tmp_path / "o"), str(tmp_path / "ours"), "--step", "4"]) == 0
    assert "Orbax standard -> shardckpt" in capsys.readouterr().out
    assert open_checkpoint(tmp_path / "ours").step == 4
    assert main(["convert", str(tmp_path / "o"), str(tmp_path / "ours")]) == 2   # exists
    assert "refusing" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["direction"] == "to_orbax"
    _assert_same_orbax(tmp_path / "o", tmp_path / "back")
    (tmp_path / "junk").mkdir()
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "x")]) == 2
    assert "neither an Orbax" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2

    out = tmp_path / "model.safetensors"
    assert main(["export", "--safetensors", str(tmp_path / "ours"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "RNG state" in printed
    tensors = safetensors_numpy.load_file(str(out))
    want = {k: v for k, v in bits_of(model).items() if not v[0].startswith("key<") and ".rngs." not in k}
    assert set(tensors) == set(want) and len(want) < len(bits_of(model))
    got = {k: (str(v.dtype), tuple(v.shape), v.tobytes()) for k, v in tensors.items()}
    assert got == want
    assert tensors["embed.embedding"].dtype.name == "bfloat16"
    assert main(["export", "--safetensors", str(tmp_path / "ours"), str(out)]) == 2   # exists
    assert main(["export", "--safetensors", str(tmp_path / "o"), str(tmp_path / "x.safetensors")]) == 2
    assert "Orbax checkpoint" in capsys.readouterr().err
