"""Local checkpoints never follow a symlinked directory inside them out of the checkpoint
(#17.11).

A local store accepts the object-store layout (files under ``v<hex>/`` version prefixes:
a checkpoint written through a pyarrow filesystem, or copied from a bucket). Only the last
component of a name used to be opened without following symlinks, so a ``v<hex>/`` that is
a symlink to a directory elsewhere had ``config.json``, shards and the index read from
there. Every component inside the checkpoint is now opened with ``O_NOFOLLOW``.

The checkpoints here are real: written through pyarrow's ``LocalFileSystem`` (the
versioned layout), in two saves so that the config and the first item's shards live in
one version directory and the index in the other. The directory a symlink points to holds
byte-identical copies, so a read through it would succeed: refusing is the only way to
fail."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from shardckpt import Checkpoint, CorruptCheckpointError, verify
from shardckpt.store.local import LocalStore
from shardckpt.testing import save_items

pafs = pytest.importorskip("pyarrow.fs")

A = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
B = {"u": np.arange(5, dtype=np.int64)}


@pytest.fixture
def ck(tmp_path):
    """(root, {"config": version dir of config.json and a's shards, "index": the index's})."""
    root = tmp_path / "run"
    root.mkdir()
    fs = pafs.LocalFileSystem()
    uri = f"local://{root}/step_1"
    save_items(uri, {"a": A}, json_files={"config.json": {"width": 4}}, backend="threads", filesystem=fs)
    save_items(uri, {"b": B}, keep_other_items=True, backend="threads", filesystem=fs)
    man = json.loads((root / "step_1" / "manifest.json").read_bytes())
    meta = {n.rsplit("/", 1)[-1]: n.split("/")[0] for n in man["meta_files"]}
    shards = {n.split("/", 1)[1]: n.split("/")[0] for n in man["files"]}
    assert meta["config.json"] == shards["a-00000-of-00001.npz"] != meta["index.msgpack"]
    return root, {"config": meta["config.json"], "index": meta["index.msgpack"]}


def _swap_for_symlink(root, version: str, target_dir) -> None:
    """Move ``step_1/<version>`` to ``target_dir`` and leave a symlink to it in its place."""
    real = root / "step_1" / version
    shutil.move(real, target_dir)
    os.symlink(target_dir, real, target_is_directory=True)


def test_the_layout_loads_when_nothing_is_a_symlink(ck):
    root, _ = ck
    c = Checkpoint(root / "step_1")
    assert c.read_config() == {"width": 4}
    assert np.array_equal(c.read_arrays("a")["w"], A["w"])
    assert np.array_equal(c.read_arrays("b")["u"], B["u"])
    # a local save adding an item carries the version directories' files over
    save_items(root / "step_1", {"c": {"z": np.ones(3)}}, keep_other_items=True, backend="threads")
    c = Checkpoint(root / "step_1")
    assert c.read_config() == {"width": 4} and np.array_equal(c.read_arrays("a")["w"], A["w"])
    assert np.array_equal(c.read_arrays("c")["z"], np.ones(3))


@pytest.mark.parametrize("where", ["outside", "other-checkpoint"])
def test_config_and_shards_are_never_read_through_a_symlinked_version_dir(ck, tmp_path, where):
    root, v = ck
    target = tmp_path / "elsewhere" / v["config"] if where == "outside" else root / "step_0" / v["config"]
    target.parent.mkdir(parents=True)
    _swap_for_symlink(root, v["config"], target)
    c = Checkpoint(root / "step_1")
    with pytest.raises(CorruptCheckpointError, match=f"{v['config']} is a symlink"):
        c.read_config()
    with pytest.raises(CorruptCheckpointError, match="symlink"):
        c.read_arrays("a")
    with pytest.raises(CorruptCheckpointError, match="symlink"):
        c.restore("a", {"w": np.zeros((3, 4), np.float32)})
    # the other item lives in the real version directory: it still loads
    assert np.array_equal(c.read_arrays("b")["u"], B["u"])


def test_the_index_is_never_read_through_a_symlinked_version_dir(ck, tmp_path):
    root, v = ck
    _swap_for_symlink(root, v["index"], tmp_path / v["index"])
    with pytest.raises(CorruptCheckpointError, match=f"{v['index']} is a symlink"):
        Checkpoint(root / "step_1").read_arrays("a")
    assert not verify(root / "step_1").ok


def test_store_calls_refuse_a_symlinked_component(ck, tmp_path):
    root, v = ck
    _swap_for_symlink(root, v["config"], tmp_path / v["config"])
    store = LocalStore(root)
    name = f"step_1/{v['config']}/config.json"
    for call in (lambda: store.read_bytes(name, 1 << 20), lambda: store.open(name), lambda: store.size(name),
                 lambda: store.list(f"step_1/{v['config']}")):
        with pytest.raises(CorruptCheckpointError, match="symlink"):
            call()
    # a name whose directory is a plain file, or missing, is simply absent
    assert store.size("step_1/manifest.json/x") is None
    assert store.size(f"step_1/v{'0' * 16}/config.json") is None
    with pytest.raises(FileNotFoundError):
        store.read_bytes(f"step_1/v{'0' * 16}/config.json", 1 << 20)


def test_a_symlinked_file_inside_a_real_version_dir_is_refused_too(ck, tmp_path):
    root, v = ck
    cfg = root / "step_1" / v["config"] / "config.json"
    outside = tmp_path / "config.json"
    shutil.move(cfg, outside)
    os.symlink(outside, cfg)
    with pytest.raises(CorruptCheckpointError, match="symlink"):
        Checkpoint(root / "step_1").read_config()


def test_a_save_never_carries_a_file_over_through_a_symlinked_version_dir(ck, tmp_path):
    """A local re-save adding an item hard-links the other items' files: not through a
    symlinked version directory either (nothing outside becomes part of the new one)."""
    root, v = ck
    _swap_for_symlink(root, v["config"], tmp_path / v["config"])
    with pytest.raises(Exception, match="symlink"):
        save_items(root / "step_1", {"c": B}, keep_other_items=True, backend="threads")
    assert os.path.islink(root / "step_1" / v["config"]), "the failed save left the checkpoint as it was"


def test_the_checkpoint_directory_the_user_names_may_be_a_symlink(ck):
    """Only what lies inside the checkpoint is never followed: the path the user gives
    (here an alias of the step directory) is opened as named."""
    root, _ = ck
    os.symlink(root / "step_1", root / "latest", target_is_directory=True)
    c = Checkpoint(root / "latest")
    assert c.read_config() == {"width": 4}
    assert np.array_equal(c.read_arrays("a")["w"], A["w"])
