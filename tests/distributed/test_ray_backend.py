"""The Ray backend on a real local Ray: identical files to threads, coordinator
transactions, multi-participant saves, writer death, deadlines, concurrent processes."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import ray

from shardckpt import Checkpoint, CheckpointError, CheckpointManager, SaveAbortedError
from shardckpt.coord.ray_actor import get_coordinator
from shardckpt.executors.ray import RayExecutor
from shardckpt.executors.threads import ThreadExecutor
from shardckpt.lm.training import batch_for_step, make_tx, new_run, state_digest, train_step
from shardckpt.saving.commit import commit
from shardckpt.store.registry import open_store
from shardckpt.testing import save_items


def _tree():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((512, 256)).astype(np.float32),
            "b": rng.standard_normal((256,)).astype(np.float16),
            "n": {"c": np.arange(10, dtype=np.int64), "s": np.float64(3.5)}}


def test_threads_and_ray_write_identical_shards(tmp_path):
    tree = _tree()
    a = save_items(tmp_path / "threads", {"state": tree}, num_shards=3, executor=ThreadExecutor(2))
    b = save_items(tmp_path / "ray", {"state": tree}, num_shards=3, executor=RayExecutor(2))
    ma, mb = Checkpoint(a).manifest, Checkpoint(b).manifest
    assert sorted(ma.files) == sorted(mb.files)
    for name in ma.files:
        assert ma.files[name].xxh3_64 == mb.files[name].xxh3_64
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert all(f.writer["backend"] == "ray" and f.writer["node_id"] for f in mb.files.values())
    for path in (a, b):
        out, report = Checkpoint(path).restore("state", tree, executor=RayExecutor(2))
        assert report.complete
        assert np.array_equal(out["w"], tree["w"]) and out["b"].dtype == np.float16


def test_manager_on_ray_roundtrip_and_auto_backend(tmp_path):
    model, opt = new_run()
    train_step(model, opt, batch_for_step(0))
    manager = CheckpointManager(tmp_path, backend="auto", num_shards=2)
    manager.save(1, model, opt, metrics={"loss": 1.0})
    ck = Checkpoint(manager.step_path(1))
    assert {f.writer["backend"] for f in ck.manifest.files.values()} == {"ray"}
    state = CheckpointManager(tmp_path, backend="threads").load_latest(tx=make_tx())
    assert state_digest(state.model, state.optimizer) == state_digest(model, opt)


@ray.remote(num_cpus=0)
class Participant:
    def __init__(self, rank, count):
        self.rank, self.count = rank, count
        self.model, self.opt = new_run()

    def save(self, directory, step, timeout=None):
        m = CheckpointManager(directory, max_to_keep=None, num_shards=2, backend="ray", save_timeout=timeout)
        try:
            return str(m.save(step, self.model, self.opt, metrics={"loss": float(step)},
                              process_index=self.rank, process_count=self.count))
        except CheckpointError as e:
            return f"ERROR {type(e).__name__}: {e}"

    def load_digest(self, directory, step):
        from shardckpt.lm.training import make_tx
        st = CheckpointManager(directory, backend="threads").load_step(step, tx=make_tx())
        return state_digest(st.model, st.optimizer), os.getpid()


def test_multi_participant_save_commits_one_manifest_and_restores_on_other_counts(tmp_path):
    parts = [Participant.remote(i, 3) for i in range(3)]
    paths = ray.get([p.save.remote(str(tmp_path), 5) for p in parts])
    assert paths == [str(tmp_path / "step_5")] * 3
    ck = Checkpoint(tmp_path / "step_5")
    pids = {f.writer["pid"] for f in ck.manifest.files.values()}
    assert len(pids) == 3, "each participant wrote its own share"
    sizes = [f.size for n, f in ck.manifest.files.items() if n.startswith("optimizer")]
    assert max(sizes) < 2 * min(sizes), "replicated state split about evenly"
    reference_model, reference_opt = new_run()
    ref = state_digest(reference_model, reference_opt)
    # restore on 2 participants and on the driver (1)
    digests = ray.get([p.load_digest.remote(str(tmp_path), 5) for p in parts[:2]])
    assert {d for d, _ in digests} == {ref}
    st = CheckpointManager(tmp_path, backend="threads").load_step(5, tx=__import__("optax").adamw(3e-3))
    assert state_digest(st.model, st.optimizer) == ref
    for p in parts:
        ray.kill(p)


def test_participant_that_never_reports_is_aborted_at_deadline(tmp_path):
    lonely = Participant.remote(0, 2)   # participant 1 never comes
    t0 = time.time()
    result = ray.get(lonely.save.remote(str(tmp_path), 3, 3.0))
    assert result.startswith("ERROR SaveAbortedError"), result
    assert time.time() - t0 < 60
    assert not (tmp_path / "step_3").exists()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
    ray.kill(lonely)


def test_writer_killed_mid_save_aborts_cleanly_and_next_save_succeeds(tmp_path):
    tree = _tree()
    first = save_items(tmp_path / "ck", {"state": tree}, num_shards=2, executor=RayExecutor(2))
    before = {n: (first / n).read_bytes() for n in os.listdir(first)}
    ex = RayExecutor(2, save_timeout=60)
    ex.actors()
    ex.test_write_delay = 3.0
    victim = ex.actors()[0]
    errors = []

    def run():
        try:
            save_items(tmp_path / "ck", {"state": {**tree, "w": tree["w"] + 1}}, num_shards=2, executor=ex)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    ray.kill(victim[0])
    t.join(60)
    assert errors and isinstance(errors[0], SaveAbortedError)
    assert victim[1] in str(errors[0]) and victim[2] in str(errors[0]), str(errors[0])
    # the earlier checkpoint is untouched, nothing half-written is visible
    assert {n: (first / n).read_bytes() for n in os.listdir(first)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    ex.test_write_delay = 0.0
    save_items(tmp_path / "ck", {"state": {**tree, "w": tree["w"] + 1}}, num_shards=2, executor=ex)
    out, _ = Checkpoint(tmp_path / "ck").restore("state", tree)
    assert np.array_equal(out["w"], tree["w"] + 1)


def test_coordinator_death_fails_the_save_and_a_new_one_takes_over(tmp_path):
    tree = _tree()
    ex = RayExecutor(1, save_timeout=60)
    ex.actors()
    ex.test_write_delay = 3.0
    errors = []

    def run():
        try:
            save_items(tmp_path / "step_1", {"state": tree}, executor=ex)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    ray.kill(get_coordinator(open_store(tmp_path), commit))
    t.join(60)
    assert errors and isinstance(errors[0], SaveAbortedError), errors
    assert not (tmp_path / "step_1").exists()
    ex.test_write_delay = 0.0
    save_items(tmp_path / "step_1", {"state": tree}, executor=ex)   # a fresh coordinator
    assert Checkpoint(tmp_path / "step_1").step is None
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


@ray.remote(num_cpus=0)
def _save_loop(directory, steps, tag):
    model, opt = new_run()
    m = CheckpointManager(directory, max_to_keep=None, backend="ray")
    for s in steps:
        m.save(s, model, opt, metrics={"loss": float(s)}, extra={"writer": tag}, process_index=0, process_count=1)
    return os.getpid()


def test_two_processes_saving_to_one_directory_lose_nothing(tmp_path):
    a = _save_loop.remote(str(tmp_path), [0, 2, 4, 6, 8], "a")
    b = _save_loop.remote(str(tmp_path), [1, 3, 5, 6, 7], "b")   # step 6 from both
    assert len(set(ray.get([a, b]))) == 2
    m = CheckpointManager(tmp_path, backend="threads")
    assert m.all_steps() == list(range(9))
    for s in m.all_steps():
        assert m.load_step(s, should_load_optimizer=False).extra["writer"] in ("a", "b")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_dead_participant_aborts_the_save_and_a_restarted_group_saves_the_step(tmp_path):
    first = Participant.remote(0, 2)
    pending = first.save.remote(str(tmp_path), 4, 120.0)     # waits for participant 1 forever
    time.sleep(3.0)
    ray.kill(first)                                           # the worker dies mid-save
    t0 = time.time()
    group = [Participant.remote(i, 2) for i in range(2)]      # the restarted worker group
    paths = ray.get([p.save.remote(str(tmp_path), 4, 120.0) for p in group])
    assert paths == [str(tmp_path / "step_4")] * 2, paths
    assert time.time() - t0 < 60, "the orphaned save was aborted long before its deadline"
    assert Checkpoint(tmp_path / "step_4").step == 4
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(pending)
    for p in group:
        ray.kill(p)
