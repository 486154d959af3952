"""The pyarrow-filesystem store (``gs://``, ``hdfs://``, fsspec wrapped in pyarrow): the same
layout and commit rule as S3, run here over a local pyarrow filesystem (no GCS emulator)."""

from __future__ import annotations

import numpy as np
import pytest

pafs = pytest.importorskip("pyarrow.fs")

from shardckpt import CheckpointManager, open_checkpoint  # noqa: E402
from shardckpt.store.registry import open_store  # noqa: E402
from shardckpt.testing import save_items  # noqa: E402


def _tree(v: int) -> dict:
    return {"w": np.full((64, 32), v, np.float32), "i": np.arange(5) + v}


def test_round_trip_resave_and_retention(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    uri = "arrow://bucket/run/step_1"
    save_items(uri, {"state": _tree(1)}, filesystem=fs, num_shards=2, backend="threads")
    out = open_checkpoint(uri, filesystem=fs).read_arrays("state")
    assert np.array_equal(out["w"], _tree(1)["w"])
    first = set(open_checkpoint(uri, filesystem=fs).manifest.files)
    save_items(uri, {"state": _tree(2)}, filesystem=fs, num_shards=2, backend="threads")   # re-save
    ck = open_checkpoint(uri, filesystem=fs)
    assert np.array_equal(ck.read_arrays("state")["i"], _tree(2)["i"])
    assert not (set(ck.manifest.files) & first)
    assert all(n.split("/")[0].startswith("v") for n in ck.manifest.files)     # version prefix
    on_disk = {p.relative_to(tmp_path / "bucket/run/step_1").as_posix()
               for p in (tmp_path / "bucket/run/step_1").rglob("*") if p.is_file()}
    assert not any(f in on_disk for f in first), "the replaced version's files are gone"
    store = open_store("arrow://bucket/run", fs)
    mgr = CheckpointManager(store, max_to_keep=1, backend="threads")
    save_items(store.where("step_2"), {"state": _tree(3)}, filesystem=fs, step=2, backend="threads")
    assert mgr.all_steps() == [1, 2]
    mgr.apply_retention()
    assert mgr.all_steps() == [2]
    assert not (tmp_path / "bucket/run/step_1/manifest.json").exists()
