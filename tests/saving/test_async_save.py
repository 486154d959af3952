"""Async saves: the snapshot is consistent even when the next step donates the buffers,
writes finish in the background, a failure surfaces at the next call, retention runs after
the commit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardckpt import Checkpoint, CheckpointError, CheckpointManager


class Tiny(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64))
        self.n = nnx.BatchStat(jnp.zeros((8,), jnp.int32))


_bump_donating = jax.jit(lambda w: w * 2 + 1, donate_argnums=0)


def test_snapshot_survives_buffer_donation_by_the_next_step(tmp_path):
    model = Tiny()
    expected = np.asarray(model.w[...]).copy()
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, model)
    # the next "training step" donates the parameter buffer (XLA refuses while our snapshot
    # still references it, and copies instead) and stores a new value
    model.w.set_value(_bump_donating(model.w.get_value()))
    manager.wait_until_finished()
    out = Checkpoint(manager.step_path(1)).read_arrays("model")
    assert np.array_equal(out["w"], expected)


def test_numpy_leaves_are_copied_for_the_snapshot(tmp_path):
    from shardckpt.saving.pipeline import prepare_items
    from shardckpt.testing import save_items
    tree = {"a": np.arange(10.0)}
    prepared = prepare_items({"state": tree}, snapshot=True)
    tree["a"][:] = -1                       # the owner changes it in place meanwhile
    save_items(tmp_path / "ck", {}, prepared=prepared)
    assert np.array_equal(Checkpoint(tmp_path / "ck").read_arrays("state")["a"], np.arange(10.0))


def test_background_failure_is_raised_at_the_next_call_and_nothing_is_visible(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=True)
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_2" / "notes.txt").write_text("user data")   # not a checkpoint: refused
    model = Tiny()
    manager.save(2, model)                  # returns; the failure happens in the background
    with pytest.raises(CheckpointError, match="not a shardckpt checkpoint"):
        manager.save(3, model)
    assert (tmp_path / "step_2" / "notes.txt").read_text() == "user data"
    manager.save(3, model)
    manager.wait_until_finished()
    assert manager.all_steps() == [3]


def test_saves_are_ordered_and_retention_runs_after_each_commit(tmp_path):
    model = Tiny()
    with CheckpointManager(tmp_path, max_to_keep=2, async_save=True) as manager:
        for step in range(5):
            model.n[...] = jnp.full((8,), step, jnp.int32)
            manager.save(step, model, metrics={"loss": float(step)})
    manager = CheckpointManager(tmp_path)
    assert manager.all_steps() == [3, 4]
    assert Checkpoint(manager.step_path(4)).read_arrays("model")["n"].tolist() == [4] * 8


def test_blocking_override_and_load_waits_for_pending_save(tmp_path):
    model = Tiny()
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(7, model, blocking=True)
    assert manager.all_steps() == [7]
    manager.save(8, model)
    state = manager.load_step(8, model=Tiny())       # waits for the background save
    assert state.step == 8
