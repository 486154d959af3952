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


# --- the last async save of a program (#17.3) ---------------------------------------------------

EXIT_SCRIPT = """
import sys
import numpy as np
from shardckpt import CheckpointManager
from shardckpt.testing import Fault, FaultPlan
directory, how, backend = sys.argv[1], sys.argv[2], sys.argv[3]
if backend == "ray":
    import ray
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
mgr = CheckpointManager(directory, backend=backend, num_shards=4)
state = {"w": np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024), "b": np.ones(7)}
mgr.save(1, state)
if how == "fail":
    FaultPlan(Fault("fsync", "manifest.json", times=1 << 30)).__enter__()   # the disk fails from here
mgr.save(2, state, blocking=False)
if how == "context":
    with CheckpointManager(directory, backend=backend) as other:
        other.save(3, state, blocking=False)
"""


@pytest.mark.parametrize("how", ["last-line", "context"])
def test_the_last_async_save_of_a_program_commits(tmp_path, how):
    """``mgr.save(2, state, blocking=False)`` as the last line of a script: it commits before
    the interpreter exits (the save's threads are plain threads the interpreter waits for)."""
    from tests.scenarios.run import run_python
    r = run_python(EXIT_SCRIPT, [str(tmp_path / "run"), how, "threads"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cannot schedule" not in r.stderr, r.stderr[-3000:]
    steps = CheckpointManager(tmp_path / "run", backend="threads").all_steps()
    assert steps == ([1, 2, 3] if how == "context" else [1, 2])
    from shardckpt import restore
    assert restore(tmp_path / "run" / "step_2", item="model")["w"][1023, 1023] == (1 << 20) - 1


def test_a_failed_last_async_save_is_reported_at_exit(tmp_path):
    """The disk fails under the last async save of a program: nothing is committed, and the
    program says so on stderr at exit instead of ending silently."""
    from tests.scenarios.run import run_python
    r = run_python(EXIT_SCRIPT, [str(tmp_path / "run"), "fail", "threads"], timeout=300)
    assert "the background save of step 2" in r.stderr and "was not committed" in r.stderr, r.stderr[-3000:]
    assert "injected at fsync" in r.stderr
    assert CheckpointManager(tmp_path / "run", backend="threads").all_steps() == [1]
