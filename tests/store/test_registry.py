"""What a path argument means, decided in one place (store/registry.py): local paths as
given (relative, ``~``, ``a/../b``), ``file://`` URIs (``save("file:///abs/ck")`` wrote
``./file:/abs/ck``, #17.12), the schemes other stores claim, and what no store serves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from shardckpt import CheckpointError, CheckpointManager, restore, save
from shardckpt.store.local import LocalStore
from shardckpt.store.registry import open_store, resolve
from shardckpt.store.s3 import S3Store

TREE = {"w": np.arange(6, dtype=np.float32)}


def test_file_uris_are_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"file://{tmp_path}/ck"
    assert save(uri, TREE) == tmp_path / "ck"
    assert not (tmp_path / "file:").exists()
    assert np.array_equal(restore(uri)["w"], TREE["w"])
    assert np.array_equal(restore(tmp_path / "ck")["w"], TREE["w"])
    mgr = CheckpointManager(f"file://{tmp_path}/run", backend="threads")
    mgr.save(3, TREE)
    assert (tmp_path / "run" / "step_3").is_dir()
    assert CheckpointManager(f"file://localhost{tmp_path}/run").all_steps() == [3]
    with pytest.raises(CheckpointError, match="names a local path"):
        save("file://otherhost/x/ck", TREE)


def test_relative_home_and_dotted_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    save("~/ck", TREE)
    assert (tmp_path / "home" / "ck" / "manifest.json").is_file()
    save("./a/../b", TREE)
    assert (tmp_path / "b" / "manifest.json").is_file() and not (tmp_path / "a").exists()
    store, name = resolve("b/")
    assert isinstance(store, LocalStore) and store.root == tmp_path and name == "b"
    with pytest.raises(CheckpointError):
        resolve("/")
    assert open_store(Path("rel")).root == tmp_path / "rel"


def test_uris_go_to_the_store_that_claims_them():
    assert isinstance(open_store("s3://bucket/run"), S3Store)
    assert isinstance(open_store("s3a://bucket/run"), S3Store)
    with pytest.raises(CheckpointError, match="inside the bucket"):
        resolve("s3://bucket")
    assert isinstance(open_store(os.fspath("/tmp")), LocalStore)


def test_a_pyarrow_scheme_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    """``gs://`` (any scheme pyarrow serves) without the ``[fs]`` extra: our error naming
    it, whichever store call comes first (#18.5), never ``ModuleNotFoundError``."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)      # what a machine without pyarrow imports
    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)
    for call in (lambda: save("gs://bucket/run/ck", {"w": np.ones(2)}), lambda: restore("gs://bucket/run/ck"),
                 lambda: CheckpointManager("gs://bucket/run")):
        with pytest.raises(CheckpointError, match=r"gs://bucket.*pip install 'shardckpt\[fs\]'"):
            call()
