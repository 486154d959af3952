"""CheckpointManager: retention, discovery, leftovers, re-saves, loading, optimizer swaps."""

from __future__ import annotations

import math
import os
import threading
import time
import warnings

import jax
import numpy as np
import optax
import pytest
from conftest import LR, assert_bit_equal, bits_of, dead_pid, hidden_entries, this_host, train_steps, tree_of_files
from flax import nnx

from shardckpt import CheckpointError, CheckpointInfo, CheckpointManager, CheckpointNotFoundError, LMModel, StructureMismatchError

NAN = float("nan")

# (max_to_keep, best_metric, best_mode, best_to_keep, [(step, metric or None)], kept steps)
RETENTION_CASES = {
    "latest-2": (2, None, "min", 3, [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)], [3, 4]),
    "keep-all": (None, None, "min", 3, [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)], [1, 2, 3, 4, 5]),
    "keep-all-with-best": (None, "loss", "min", 1, [(1, 3.0), (2, 1.0), (3, 2.0)], [1, 2, 3]),
    "best-min": (1, "loss", "min", 2, [(1, 5.0), (2, 1.0), (3, 3.0), (4, 2.0), (5, 9.0)], [2, 4, 5]),
    "best-max": (1, "loss", "max", 2, [(1, 5.0), (2, 1.0), (3, 3.0), (4, 2.0), (5, 9.0)], [1, 5]),
    "latest-and-best-overlap": (2, "acc", "max", 1, [(10, 0.5), (20, 0.9), (30, 0.7), (40, 0.6)], [20, 30, 40]),
    "newest-kept-though-worst": (1, "loss", "min", 1, [(1, 0.1), (2, 0.2), (3, 99.0)], [1, 3]),
    "best-survives-many": (2, "loss", "min", 1, [(s, 10.0 - s if s != 3 else -1.0) for s in range(1, 9)], [3, 7, 8]),
    "best-to-keep-0": (2, "loss", "min", 0, [(1, 0.0), (2, 5.0), (3, 6.0)], [2, 3]),
    "missing-metric-never-best": (1, "loss", "min", 2, [(1, 1.0), (2, None), (3, 2.0), (4, None), (5, None)], [1, 3, 5]),
    "nan-metric-never-best": (1, "loss", "min", 2, [(1, 1.0), (2, NAN), (3, 3.0), (4, NAN)], [1, 3, 4]),
    "inf-metric-never-best": (1, "loss", "min", 1, [(1, 2.0), (2, -math.inf), (3, 5.0)], [1, 3]),
    "out-of-order-steps": (2, None, "min", 3, [(5, 0.0), (3, 0.0), (4, 0.0)], [4, 5]),
    "int-metric": (1, "epoch_loss", "min", 1, [(1, 3), (2, 1), (3, 2)], [2, 3]),
}


@pytest.mark.parametrize("case", list(RETENTION_CASES), ids=list(RETENTION_CASES))
def test_retention_table(tmp_path, model, case):
    max_to_keep, metric, mode, best_k, seq, expected = RETENTION_CASES[case]
    mgr = CheckpointManager(tmp_path, max_to_keep=max_to_keep, best_metric=metric, best_mode=mode,
                            best_to_keep=best_k)
    for i, (step, value) in enumerate(seq):
        mgr.save(step, model, metrics=None if value is None else {metric or "loss": value})
        assert max(s for s, _ in seq[: i + 1]) in mgr.all_steps()   # the newest is never deleted
    assert mgr.all_steps() == expected
    assert sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir() if p.name.startswith("step_")) == expected
    assert hidden_entries(tmp_path) == []
    # A fresh manager with the same settings agrees (retention is a pure function of disk).
    kept, deleted = CheckpointManager(tmp_path, max_to_keep=max_to_keep, best_metric=metric,
                                      best_mode=mode, best_to_keep=best_k).retention_plan()
    assert [i.step for i in kept] == expected and deleted == []


def test_ties_keep_one_best(tmp_path, model):
    mgr = CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss", best_to_keep=1)
    for step, loss in [(1, 1.0), (2, 1.0), (3, 2.0)]:
        mgr.save(step, model, metrics={"loss": loss})
    steps = mgr.all_steps()
    assert len(steps) == 2 and 3 in steps and steps[0] in (1, 2)


def test_discovery_by_new_manager(tmp_path, model):
    a = CheckpointManager(tmp_path, max_to_keep=None, best_metric="loss")
    for step, loss in [(10, 3.0), (20, 1.0), (30, 2.0)]:
        a.save(step, model, metrics={"loss": loss, "acc": step / 100})
    b = CheckpointManager(tmp_path, max_to_keep=None, best_metric="loss")
    assert len(b) == 3
    infos = b.checkpoints
    assert all(isinstance(i, CheckpointInfo) for i in infos)
    assert [i.step for i in infos] == [10, 20, 30]
    assert [i.metrics for i in infos] == [{"loss": 3.0, "acc": 0.1}, {"loss": 1.0, "acc": 0.2},
                                          {"loss": 2.0, "acc": 0.3}]
    assert [i.path for i in infos] == [tmp_path / "step_10", tmp_path / "step_20", tmp_path / "step_30"]
    assert all(i.created for i in infos)
    assert b.latest_step == 30 and b.best_step == 20
    assert CheckpointManager(tmp_path, best_metric="acc", best_mode="max").best_step == 30
    # Retention of a new, stricter manager applies on its next save.
    c = CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss", best_to_keep=1)
    assert c.all_steps() == [10, 20, 30]
    c.save(40, model, metrics={"loss": 5.0})
    assert c.all_steps() == [20, 40]
    assert b.all_steps() == [20, 40]          # the other manager sees the same truth


def test_dirs_without_manifest_are_ignored_and_untouched(tmp_path, model):
    (tmp_path / "step_99").mkdir()
    (tmp_path / "step_98").mkdir()
    (tmp_path / "step_98" / "notes.txt").write_text("mine")
    (tmp_path / "step_97").write_text("a file, not a directory")
    (tmp_path / "step_abc").mkdir()
    (tmp_path / "other_5").mkdir()
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    assert len(mgr) == 0 and mgr.latest_step is None
    for step in (1, 2, 3):
        mgr.save(step, model)
    assert mgr.all_steps() == [3]
    assert (tmp_path / "step_98" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "step_99").is_dir() and (tmp_path / "step_97").is_file()
    assert (tmp_path / "step_abc").is_dir() and (tmp_path / "other_5").is_dir()
    # A step directory whose manifest is damaged is not a checkpoint either.
    (tmp_path / "step_50").mkdir()
    (tmp_path / "step_50" / "manifest.json").write_text("{not json")
    assert mgr.all_steps() == [3]
    assert mgr.load_latest().step == 3


def _hidden(tmp_path, name, kind, host, pid, content="partial"):
    d = tmp_path / f".{name}.{kind}-{host}-{pid}-{os.urandom(6).hex()}"
    d.mkdir()
    (d / "model-00000-of-00001.npz").write_text(content)
    return d


def test_stale_leftovers_removed_on_start(tmp_path, model):
    host, dead = this_host(), dead_pid()
    stale_tmp = _hidden(tmp_path, "step_5", "tmp", host, dead)
    stale_del = _hidden(tmp_path, "step_6", "del", host, dead)
    live_tmp = _hidden(tmp_path, "step_7", "tmp", host, os.getpid())           # a save in progress
    foreign_recent = _hidden(tmp_path, "step_8", "tmp", "someotherhost", 1)    # can't tell: keep
    foreign_old = _hidden(tmp_path, "step_9", "tmp", "someotherhost", 1)
    day_ago = time.time() - 3 * 24 * 3600
    os.utime(foreign_old, (day_ago, day_ago))
    other_prefix = _hidden(tmp_path, "ckpt_5", "tmp", host, dead)              # not ours

    mgr = CheckpointManager(tmp_path)
    assert not stale_tmp.exists() and not stale_del.exists() and not foreign_old.exists()
    assert live_tmp.exists() and foreign_recent.exists() and other_prefix.exists()
    assert len(mgr) == 0
    assert mgr.load_latest() is None


def test_interrupted_replacement_is_put_back(tmp_path, model):
    """A replacement that died between its two renames left only the .old directory."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, model)
    saved = bits_of(model)
    os.rename(tmp_path / "step_3", tmp_path / f".step_3.old-{this_host()}-{dead_pid()}-abc123")
    mgr2 = CheckpointManager(tmp_path)
    assert mgr2.all_steps() == [3]
    assert hidden_entries(tmp_path) == []
    assert_bit_equal(mgr2.load_step(3).model, saved)


def test_finished_replacement_leaves_no_old_dir(tmp_path, model):
    """A replacement that died after its second rename (new checkpoint in place) left an
    obsolete .old directory: the next start removes it instead of keeping it forever."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, model)
    old = tmp_path / f".step_3.old-{this_host()}-{dead_pid()}-abc123"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    CheckpointManager(tmp_path)
    assert hidden_entries(tmp_path) == []
    assert CheckpointManager(tmp_path).all_steps() == [3]


def test_empty_directory(tmp_path):
    mgr = CheckpointManager(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    assert mgr.load_latest() is None
    assert mgr.load_best() is None
    assert mgr.latest_step is None and mgr.best_step is None
    assert len(mgr) == 0 and mgr.checkpoints == [] and mgr.all_steps() == []
    with pytest.raises(CheckpointNotFoundError, match="step 4"):
        mgr.load_step(4)


def test_load_best_without_metric_is_latest(tmp_path, model):
    mgr = CheckpointManager(tmp_path, max_to_keep=None)
    for step, loss in [(1, 0.1), (2, 5.0)]:
        mgr.save(step, model, metrics={"loss": loss})
    assert mgr.best_step == 2
    assert mgr.load_best().step == 2
    # With a metric nobody logged: the latest as well.
    assert CheckpointManager(tmp_path, best_metric="bleu").load_best().step == 2
    assert CheckpointManager(tmp_path, best_metric="loss").load_best().step == 1


def test_resave_replaces_step(tmp_path, model, optimizer):
    mgr1 = CheckpointManager(tmp_path, num_shards=1)
    mgr1.save(5, model, optimizer, metrics={"loss": 1.0}, extra={"v": 1})
    mgr1.save(4, model)
    first = tree_of_files(tmp_path / "step_5")
    assert "model-00000-of-00001.npz" in first

    train_steps(model, optimizer, 1)
    mgr3 = CheckpointManager(tmp_path, num_shards=3)
    mgr3.save(5, model, metrics={"loss": 0.5}, extra={"v": 2})    # no optimizer this time

    names = sorted(os.listdir(tmp_path / "step_5"))
    assert "model-00000-of-00001.npz" not in names
    assert not any(n.startswith("optimizer") for n in names)
    assert [n for n in names if n.startswith("model-")] == [f"model-0000{i}-of-00003.npz" for i in range(3)]
    assert hidden_entries(tmp_path) == []
    state = mgr3.load_step(5)
    assert_bit_equal(state.model, model, "re-saved model")
    assert state.optimizer is None
    assert state.extra == {"v": 2} and state.metrics == {"loss": 0.5}
    assert mgr3.checkpoints[-1].metrics == {"loss": 0.5}     # no stale cached metrics
    assert mgr3.all_steps() == [4, 5]
    assert tree_of_files(tmp_path / "step_5") != first


def test_resave_never_exposes_a_missing_checkpoint(tmp_path, model):
    """While step_5 is re-saved, a reader polling it always finds a committed checkpoint."""
    mgr = CheckpointManager(tmp_path, num_shards=2)
    mgr.save(5, model)
    stop, missing, polls = threading.Event(), [], [0]

    def poll():
        while not stop.is_set():
            if not os.path.exists(tmp_path / "step_5" / "manifest.json"):
                missing.append(time.monotonic())
            polls[0] += 1

    t = threading.Thread(target=poll)
    t.start()
    try:
        for _ in range(5):
            mgr.save(5, model)
    finally:
        stop.set()
        t.join()
    assert polls[0] > 0 and missing == []
    assert mgr.all_steps() == [5] and hidden_entries(tmp_path) == []


def test_len_and_properties(tmp_path, model):
    mgr = CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", best_mode="min", best_to_keep=1)
    assert len(mgr) == 0
    mgr.save(0, model, metrics={"loss": 1.0})
    mgr.save(1, model, metrics={"loss": 2.0})
    mgr.save(2, model, metrics={"loss": 3.0})
    assert len(mgr) == 3
    assert [c.step for c in mgr.checkpoints] == [0, 1, 2]
    assert mgr.latest_step == 2 and mgr.best_step == 0
    assert mgr.load_best().metrics == {"loss": 1.0}


def test_should_load_optimizer_false_and_train_config(tmp_path, model, optimizer):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model, optimizer, train_config={"lr": 1e-3, "batch": 8})
    state = mgr.load_latest(should_load_optimizer=False)
    assert state.optimizer is None
    assert state.train_config == {"lr": 1e-3, "batch": 8}
    assert state.config == model.config.to_dict()
    state = mgr.load_latest(model=LMModel(model.config, rngs=nnx.Rngs(5)), tx=optax.adamw(LR))
    assert_bit_equal(state.model, model)


# --- fine-tuning with another optimizer ----------------------------------------------------

@pytest.fixture
def adamw_checkpoint(tmp_path, model, optimizer):
    train_steps(model, optimizer, 2)
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, model, optimizer)
    return mgr, model, optimizer


def test_swap_to_adam_restores_moments(adamw_checkpoint):
    mgr, model, optimizer = adamw_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = mgr.load_latest(tx=optax.adam(1e-5))
    new, old = state.optimizer.opt_state[0], optimizer.opt_state[0]
    assert int(new.count[...]) == int(old.count[...]) == 2
    for a, b in zip(jax.tree.leaves(nnx.state(new.mu)), jax.tree.leaves(nnx.state(old.mu))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(nnx.state(new.nu)), jax.tree.leaves(nnx.state(old.nu))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_bit_equal(new, old, "adam state from adamw")
    assert int(state.optimizer.step[...]) == 2
    # ... and it uses the new learning rate: one step moves parameters by ~1e-5.
    before = np.asarray(state.model.embed.embedding[...]).copy()
    train_steps(state.model, state.optimizer, 1)
    assert 0 < np.abs(np.asarray(state.model.embed.embedding[...]) - before).max() < 1e-4


def test_swap_to_sgd_warns_listing_what_was_not_restored(adamw_checkpoint):
    """strict=False: the explicit partial restore (the default refuses, see below)."""
    mgr, model, optimizer = adamw_checkpoint
    with pytest.warns(UserWarning) as rec:
        state = mgr.load_latest(tx=optax.sgd(1e-2, momentum=0.9), strict=False)
    msg = " ".join(str(w.message) for w in rec)
    assert "opt_state.0.trace" in msg          # missing from the checkpoint: the momentum
    assert "opt_state.0.mu" in msg             # and what the checkpoint had that sgd has not
    assert int(state.optimizer.step[...]) == 2
    trace = jax.tree.leaves(nnx.state(state.optimizer.opt_state[0].trace))
    assert trace and all(not np.any(np.asarray(t)) for t in trace)   # fresh zeros
    assert_bit_equal(state.model, model)


def test_swap_to_sgd_strict_raises(adamw_checkpoint):
    mgr, _, _ = adamw_checkpoint
    for strict in ({}, {"strict": True}):      # the default is strict
        with pytest.raises(StructureMismatchError, match="opt_state.0.trace"):
            mgr.load_latest(tx=optax.sgd(1e-2, momentum=0.9), **strict)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr.load_latest(tx=optax.adamw(1e-5), strict=True)   # same structure: fine


# --- argument validation -----------------------------------------------------------------

@pytest.mark.parametrize("kw, word", [({"best_mode": "best"}, "best_mode"), ({"max_to_keep": 0}, "max_to_keep"),
                                      ({"prefix": "../x"}, "prefix")])
def test_bad_arguments(tmp_path, kw, word):
    with pytest.raises(CheckpointError, match=word):
        CheckpointManager(tmp_path, **kw)


@pytest.mark.parametrize("step", [-1, True, 2.5, "3"])
def test_bad_step_is_refused(tmp_path, model, step):
    """A negative step would write step_-1, which no manager lists and no loader accepts;
    bools and floats would be silently rounded."""
    with pytest.raises(CheckpointError, match="step"):
        CheckpointManager(tmp_path).save(step, model)
    assert os.listdir(tmp_path) == []


def test_numpy_integer_step(tmp_path, model):
    mgr = CheckpointManager(tmp_path)
    mgr.save(np.int64(7), model)
    assert mgr.all_steps() == [7]
    assert mgr.load_latest().step == 7


def test_prefix(tmp_path, model):
    mgr = CheckpointManager(tmp_path, prefix="ckpt", max_to_keep=None)
    mgr.save(3, model)
    CheckpointManager(tmp_path).save(4, model)             # another prefix in the same directory
    assert (tmp_path / "ckpt_3" / "manifest.json").exists()
    assert mgr.all_steps() == [3]
    assert CheckpointManager(tmp_path).all_steps() == [4]
    assert mgr.load_latest().step == 3


def test_concurrent_savers_agree(tmp_path, model):
    """Managers in several threads save distinct steps with retention at the same time:
    every save commits, the final directory holds exactly the newest two, nothing hidden."""
    errors = []

    def saver(steps):
        mgr = CheckpointManager(tmp_path, max_to_keep=2)
        try:
            for s in steps:
                mgr.save(s, model)
        except Exception as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(range(i, 12, 3),)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert CheckpointManager(tmp_path).all_steps() == [10, 11]
    assert hidden_entries(tmp_path) == []


# --- one step rule for what a load reports (#17.12) ----------------------------------------------

def test_a_load_reports_the_directory_s_step(tmp_path, model):
    """``save_model(dir / "step_5", model)`` without step= is listed as step 5 and now also
    loads as step 5 (it reported -1, and the guide's resume recipe restarted at 0); a step
    directory whose manifest records another step reports the directory's number, which is
    what the listing, load_step and retention go by."""
    from shardckpt import save_model
    from shardckpt.testing import save_items
    save_model(tmp_path / "run" / "step_5", model)
    mgr = CheckpointManager(tmp_path / "run", backend="threads")
    assert mgr.latest_step == 5
    assert mgr.load_latest(should_load_optimizer=False).step == 5
    save_items(tmp_path / "run" / "step_7", {"model": nnx.state(model)}, step=3,
               json_files={"config.json": {"model_config": model.config.to_dict(), "step": 2}})
    assert mgr.load_step(7, should_load_optimizer=False).step == 7
    assert mgr.load_latest(should_load_optimizer=False).step == 7
    # a directory that is no step directory: the manifest's step, else the config's, else -1
    save_items(tmp_path / "other", {"model": nnx.state(model)}, step=9,
               json_files={"config.json": {"model_config": model.config.to_dict()}})
    assert mgr.load(tmp_path / "other", should_load_optimizer=False).step == 9
    save_items(tmp_path / "bare", {"model": nnx.state(model)},
               json_files={"config.json": {"model_config": model.config.to_dict(), "step": 4}})
    assert mgr.load(tmp_path / "bare", should_load_optimizer=False).step == 4
    save_model(tmp_path / "nothing", model)
    assert mgr.load(tmp_path / "nothing", should_load_optimizer=False).step == -1
