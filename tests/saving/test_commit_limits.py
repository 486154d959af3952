"""A save never commits what its own reader refuses (#17.5): every cap a load enforces
(``shardckpt.format.limits``) is checked before anything becomes visible — at planning when
the items alone exceed it, at commit on the exact bytes (the reader's own parser runs on the
manifest about to be published). A refused save leaves the step it would have replaced
whole, listed and loadable."""

from __future__ import annotations

import numpy as np
import pytest

from shardckpt import CheckpointError, CheckpointManager, restore, save
from shardckpt.format import limits


def _good(tmp_path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, backend="threads")
    mgr.save(1, {"w": np.arange(64, dtype=np.float32)}, metrics={"loss": 1.0})
    return mgr


def _still_good(mgr: CheckpointManager) -> None:
    assert mgr.all_steps() == [1]
    assert mgr.latest_step == 1
    assert np.array_equal(restore(mgr.step_path(1), item="model")["w"], np.arange(64, dtype=np.float32))


@pytest.mark.parametrize("shape", ["one-big-string", "many-keys"])
def test_metrics_too_large_for_the_manifest_are_refused(tmp_path, shape):
    mgr = _good(tmp_path)
    big = {"note": "x" * (limits.MAX_MANIFEST_BYTES + 1024)} if shape == "one-big-string" else \
        {f"metric_{i:07d}_{'y' * 900}": float(i) for i in range(80_000)}
    with pytest.raises(CheckpointError, match="over the|every load"):
        mgr.save(1, {"w": np.zeros(64, np.float32)}, metrics=big)      # would replace step 1
    _still_good(mgr)
    with pytest.raises(CheckpointError):
        mgr.save(2, {"w": np.zeros(64, np.float32)}, metrics=big)
    _still_good(mgr)


def test_keys_too_long_for_the_manifest_are_refused_before_anything_is_written(tmp_path):
    mgr = _good(tmp_path)
    tree = {f"{i:05d}{'k' * 10_000}": np.zeros(1, np.float32) for i in range(7_000)}
    with pytest.raises(CheckpointError, match="shorter key names"):
        mgr.save(1, tree)
    _still_good(mgr)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "nothing was staged"


@pytest.mark.parametrize("ndim", [33, 40])
def test_arrays_of_more_dimensions_than_a_load_accepts_are_refused(tmp_path, ndim):
    mgr = _good(tmp_path)
    with pytest.raises(CheckpointError, match=f"{ndim} dimensions"):
        mgr.save(1, {"w": np.zeros((1,) * ndim, np.float32)})
    _still_good(mgr)
    with pytest.raises(CheckpointError, match="dimensions"):
        save(tmp_path / "plain", {"w": np.zeros((1,) * ndim, np.float32)})
    assert not (tmp_path / "plain").exists()


def test_the_most_dimensions_a_load_accepts_round_trip(tmp_path):
    a = np.arange(2, dtype=np.int16).reshape((1,) * (limits.MAX_NDIM - 1) + (2,))
    save(tmp_path / "c", {"a": a})
    assert np.array_equal(restore(tmp_path / "c")["a"], a)


def test_metadata_files_over_the_read_cap_are_refused(tmp_path, monkeypatch):
    mgr = _good(tmp_path)
    monkeypatch.setattr(limits, "MAX_JSON_BYTES", 4096)
    with pytest.raises(CheckpointError, match="extra.json would be"):
        mgr.save(1, {"w": np.zeros(64, np.float32)}, extra={"blob": "z" * 8192})
    monkeypatch.undo()
    _still_good(mgr)


@pytest.mark.parametrize("fragmented", [False, True])
def test_an_index_over_the_read_cap_is_refused(tmp_path, monkeypatch, fragmented):
    import shardckpt.format.fragments as fragments
    mgr = _good(tmp_path)
    if fragmented:
        monkeypatch.setattr(fragments, "FRAGMENT_ROWS", 8)
    monkeypatch.setattr(limits, "MAX_INDEX_BYTES", 2048)
    tree = {f"a{i:03d}": np.full(4, i, np.float32) for i in range(64)}
    with pytest.raises(CheckpointError, match="index.*would be"):
        mgr.save(1, tree)
    monkeypatch.undo()
    _still_good(mgr)
