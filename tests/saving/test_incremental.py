"""Incremental saves: a save writes only the arrays that changed since its base and carries
the rest (hard links on a local disk, server-side copies on object stores), every step
stays whole on its own, and a base that changes under the carry never lends wrong bytes.

The workload is the one incremental saves exist for: a LoRA fine-tune of the reference
``LMModel`` (``nnx.LoRA`` adapters on the attention projections, the base frozen, the
optimizer over ``wrt=nnx.LoRAParam``), saved through the manager with retention, on a
local directory, the loopback S3 server and the in-memory store.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import optax
import pytest
from flax import nnx

import shardckpt
import shardckpt.testing  # noqa: F401 - registers the memory:// store
from shardckpt import CheckpointError, CheckpointManager, CheckpointNotFoundError, LMModel, ModelConfig, restore, save
from shardckpt.lm.lora import add_lora, lora_optimizer, lora_train_step
from shardckpt.lm.training import batch_for_step, state_digest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.store import local as local_store
from shardckpt.store import s3 as s3_store
from shardckpt.store import versioned

CONFIG = ModelConfig.preset("tiny")
RANK = 4
SAVES = 10
KEEP = 4
TX = optax.adamw(1e-3)


def _lora_run():
    model = add_lora(LMModel(CONFIG, nnx.Rngs(0)), RANK, nnx.Rngs(1))
    return model, lora_optimizer(model, TX)


def _template():
    return add_lora(LMModel(CONFIG, nnx.Rngs(7)), RANK, nnx.Rngs(8))


def _array_bytes(spec) -> int:
    return int(np.prod(spec.stored_shape, dtype=np.int64)) * np.dtype(spec.stored_dtype).itemsize


def _changed_bytes(new: Checkpoint, old: Checkpoint | None) -> tuple[int, int]:
    """(bytes of the arrays whose content differs from ``old``, arrays in all) by the
    digests both manifests record."""
    changed = arrays = 0
    for item, rec in new.manifest.items.items():
        before = old.manifest.items.get(item) if old is not None else None
        for key, spec in rec.arrays.items():
            arrays += 1
            if before is None or before.arrays.get(key) != spec or before.digests.get(key) != rec.digests[key]:
                changed += _array_bytes(spec)
    return changed, arrays


def _meta_bytes(ck: Checkpoint) -> int:
    return sum(r.size for r in ck.manifest.meta_files.values()) + 64 * 1024    # + manifest and index


@pytest.fixture(params=["local", "s3", "memory"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "memory":
        return f"memory://incremental-{os.getpid()}/run"
    server = request.getfixturevalue("s3_server")
    return f"s3://ckpts/incremental-{os.getpid()}/run?endpoint_url={server.endpoint}"


def test_lora_fine_tune_writes_only_what_changed_and_every_step_stays_whole(run_dir):
    model, opt = _lora_run()
    manager = CheckpointManager(run_dir, max_to_keep=KEEP)
    digests, previous = {}, None
    for step in range(SAVES):
        lora_train_step(model, opt, batch_for_step(step, CONFIG))
        puts, copies = s3_store.STATS["put_bytes"], s3_store.STATS["copy_bytes"]
        manager.save(step, model, opt, metrics={"loss": float(step)})
        report = manager.last_save
        digests[step] = state_digest(model, opt)
        ck = Checkpoint(manager.step_path(step))
        changed, arrays = _changed_bytes(ck, previous)
        assert report.bytes_written <= 1.1 * changed + 1024 * arrays, (step, report, changed)
        if step == 0:
            assert report.bytes_carried == 0 and report.base is None
        else:
            assert report.base == f"step_{step - 1}"
            assert report.bytes_carried > 5 * report.bytes_written, report
            assert changed < report.bytes_written + report.bytes_carried
        if run_dir.startswith("s3://"):
            sent = s3_store.STATS["put_bytes"] - puts
            assert sent <= report.bytes_written + _meta_bytes(ck), (step, sent, report)
            assert s3_store.STATS["copy_bytes"] - copies == report.bytes_carried
        previous = ck
    assert manager.all_steps() == list(range(SAVES - KEEP, SAVES))
    for step in manager.all_steps():
        state = manager.load_step(step, model=_template(), tx=TX, wrt=nnx.LoRAParam)
        assert state_digest(state.model, state.optimizer) == digests[step], step
        assert shardckpt.verify(manager.step_path(step)).ok

    # deleting any step (the base of the next, or the newest) breaks no other
    infos = {i.step: i for i in manager.checkpoints}
    manager.catalog.delete(infos[SAVES - KEEP + 1])
    manager.catalog.delete(infos[SAVES - 1])
    manager.cleanup_leftovers()
    for step in manager.all_steps():
        report = shardckpt.verify(manager.step_path(step))
        assert report.ok, report.describe()
        state = manager.load_step(step, model=_template(), tx=TX, wrt=nnx.LoRAParam)
        assert state_digest(state.model, state.optimizer) == digests[step], step


def test_full_training_carries_nothing_and_writes_what_a_full_save_writes(tmp_path):
    cfg = ModelConfig.preset("tiny")
    from shardckpt.lm.training import train_step
    model = LMModel(cfg, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    on = CheckpointManager(tmp_path / "on")
    off = CheckpointManager(tmp_path / "off", incremental=False)
    for step in range(3):
        train_step(model, opt, batch_for_step(step, cfg))
        on.save(step, model, opt)
        off.save(step, model, opt)
        assert on.last_save.bytes_carried == 0 and off.last_save.base is None
        assert on.last_save.bytes_written == off.last_save.bytes_written
    assert state_digest(on.load_latest(model=LMModel(cfg, nnx.Rngs(3)), tx=optax.adamw(1e-3)).model) == \
        state_digest(model)


def _tree(frozen_seed: int = 0, step: float = 0.0) -> dict:
    rng = np.random.default_rng(frozen_seed)
    return {"frozen": {f"w{i}": rng.standard_normal((128, 128), dtype=np.float32) for i in range(6)},
            "adapter": np.full((128, 4), step, np.float32)}


def test_plain_save_with_a_base_carries_links_and_stays_whole(tmp_path):
    base = save(tmp_path / "s0", _tree())
    reports = []
    from shardckpt.api.core import save_checkpoint
    save_checkpoint(tmp_path / "s1", {"state": _tree(step=1.0)}, base=base, on_report=reports.append)
    (report,) = reports
    assert report.base == "s0" and report.files_carried >= 1
    links = [f for f in os.listdir(tmp_path / "s1") if f.endswith(".npz") and os.stat(tmp_path / "s1" / f).st_nlink == 2]
    assert links
    shutil.rmtree(tmp_path / "s0")
    back = restore(tmp_path / "s1")
    np.testing.assert_array_equal(back["adapter"], _tree(step=1.0)["adapter"])
    np.testing.assert_array_equal(back["frozen"]["w5"], _tree()["frozen"]["w5"])
    assert shardckpt.verify(tmp_path / "s1").ok


def test_a_digest_match_never_carries_another_dtype_or_shape(tmp_path):
    """The same bytes as another dtype or shape are another array: written, not carried."""
    a = np.arange(4096, dtype=np.float32)
    save(tmp_path / "s0", {"x": a, "y": a.reshape(64, 64)})
    reports = []
    from shardckpt.api.core import save_checkpoint
    save_checkpoint(tmp_path / "s1", {"state": {"x": a.view(np.int32), "y": a.reshape(32, 128)}},
                    base=tmp_path / "s0", on_report=reports.append)
    assert reports[0].bytes_carried == 0
    back = restore(tmp_path / "s1")
    assert back["x"].dtype == np.int32 and back["y"].shape == (32, 128)


def test_a_base_elsewhere_or_missing_is_our_error(tmp_path):
    save(tmp_path / "a" / "s0", _tree())
    with pytest.raises(CheckpointError, match="same directory"):
        save(tmp_path / "b" / "s1", _tree(), base=tmp_path / "a" / "s0")
    with pytest.raises(CheckpointNotFoundError, match="s9"):
        save(tmp_path / "a" / "s1", _tree(), base="s9")
    assert not (tmp_path / "a" / "s1").exists()


def _replacing_base_on_first_adopt(monkeypatch, staging_cls, action):
    """Run ``action`` (a real save or delete of the base) the moment a save starts carrying
    files from its base, then carry on: the base changes between planning and commit."""
    original = staging_cls.adopt
    fired = []

    def adopt(self, checkpoint_name, stored):
        if checkpoint_name != self.final and not fired:
            fired.append(checkpoint_name)
            action(checkpoint_name)
        return original(self, checkpoint_name, stored)
    monkeypatch.setattr(staging_cls, "adopt", adopt)
    return fired


@pytest.mark.parametrize("change", ["replaced", "deleted"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_base_replaced_or_deleted_under_the_carry_makes_a_full_save(tmp_path, monkeypatch, change, where):
    root = str(tmp_path / "run") if where == "local" else f"memory://base-{change}-{os.getpid()}/run"
    manager = CheckpointManager(root)
    manager.save(0, None, items={"state": _tree()})
    other = _tree(frozen_seed=1)

    def action(name):
        if change == "replaced":
            CheckpointManager(root, incremental=False).save(0, None, items={"state": other})
        else:
            CheckpointManager(root).catalog.delete(next(i for i in manager.checkpoints if i.step == 0))
    staging = local_store.LocalStaging if where == "local" else versioned.VersionedStaging
    fired = _replacing_base_on_first_adopt(monkeypatch, staging, action)
    manager.save(1, None, items={"state": _tree(step=1.0)})
    assert fired == ["step_0"]
    assert manager.last_save.bytes_carried == 0            # done again without a base
    ck = restore(manager.step_path(1), item="state")
    np.testing.assert_array_equal(ck["frozen"]["w0"], _tree()["frozen"]["w0"])
    np.testing.assert_array_equal(ck["adapter"], _tree(step=1.0)["adapter"])
    assert shardckpt.verify(manager.step_path(1)).ok
    if change == "replaced":
        np.testing.assert_array_equal(restore(manager.step_path(0), item="state")["frozen"]["w0"],
                                      other["frozen"]["w0"])


def test_a_base_truncated_before_the_carry_is_not_carried(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    manager.save(0, None, items={"state": _tree()})
    shard = next(f for f in os.listdir(tmp_path / "run" / "step_0") if f.endswith(".npz"))
    with open(tmp_path / "run" / "step_0" / shard, "r+b") as f:
        f.truncate(100)
    manager.save(1, None, items={"state": _tree(step=1.0)})
    assert manager.last_save.bytes_carried == 0
    assert shardckpt.verify(manager.step_path(1)).ok
    np.testing.assert_array_equal(restore(manager.step_path(1), item="state")["frozen"]["w3"], _tree()["frozen"]["w3"])


def test_resaving_a_step_carries_from_itself(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    manager.save(0, None, items={"state": _tree()})
    manager.save(1, None, items={"state": _tree(step=1.0)})
    manager.save(1, None, items={"state": _tree(step=2.0)})
    assert manager.last_save.base == "step_1" and manager.last_save.bytes_carried > 0
    assert shardckpt.verify(manager.step_path(1)).ok
    np.testing.assert_array_equal(restore(manager.step_path(1), item="state")["adapter"], _tree(step=2.0)["adapter"])
    assert shardckpt.verify(manager.step_path(0)).ok


def test_incremental_option_is_checked_at_construction(tmp_path):
    with pytest.raises(CheckpointError, match="incremental"):
        CheckpointManager(tmp_path / "run", incremental="yes")


def test_the_guide_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from pathlib import Path
    guide = (Path(__file__).resolve().parents[2] / "docs" / "checkpointing_guide.md").read_text()
    section = guide.split("## Incremental saves", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "checkpointing_guide.md#incremental-saves", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and "from None" in printed[0] and "from step_2" in printed[3], printed
    assert scope["resumed"].step == 3


def test_the_base_just_committed_is_planned_without_reading_its_index_again(tmp_path, monkeypatch):
    """The committer remembers the version it published (manifest bytes, validated index):
    the next save's base is usually that step, so its index is not read and checked again."""
    from shardckpt.format import version as version_mod
    tree = {"frozen": np.arange(4096, dtype=np.float32), "lora": np.zeros(8, np.float32)}
    mgr = CheckpointManager(tmp_path / "run", backend="threads", max_to_keep=3)
    mgr.save(1, tree)

    def no_index_reads(*a, **k):
        raise AssertionError("the base's index was read again")
    monkeypatch.setattr(version_mod, "load_index", no_index_reads)
    mgr.save(2, {**tree, "lora": np.ones(8, np.float32)})
    assert mgr.last_save.bytes_carried > 0 and mgr.last_save.base == "step_1"


def test_a_base_replaced_by_another_process_is_read_afresh(tmp_path):
    """The remembered version serves only while the stored manifest is byte for byte the
    one published: a step replaced behind this process's back (another process re-saving
    it) is read again, and the save carries from what is there now."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run, backend="threads", max_to_keep=3)
    mgr.save(1, {"frozen": np.arange(4096, dtype=np.float32), "lora": np.zeros(8, np.float32)})
    # another process's step 1: other bytes, other file layout, written elsewhere and swapped in
    other = {"frozen": np.arange(4096, dtype=np.float32) * 2, "lora": np.zeros(8, np.float32)}
    CheckpointManager(tmp_path / "elsewhere", backend="threads", num_shards=2).save(1, other)
    shutil.rmtree(run / "step_1")
    os.rename(tmp_path / "elsewhere" / "step_1", run / "step_1")
    new = {**other, "lora": np.ones(8, np.float32)}
    mgr.save(2, new)
    assert mgr.last_save.bytes_carried > 0          # carried from the step there now
    got = restore(run / "step_2", item="model")
    assert all(np.array_equal(got[k], v) for k, v in new.items())


def test_a_jax_array_saved_again_is_not_hashed_again(tmp_path, monkeypatch):
    """#20.1: a jax.Array is immutable, so the same object saved again is unchanged at no
    cost; a new object (even of equal bytes) is hashed, and a NumPy array (mutable) always."""
    import jax.numpy as jnp

    from shardckpt.saving import incremental
    hashed = []
    real = incremental.digest_pieces
    monkeypatch.setattr(incremental, "digest_pieces", lambda e: hashed.append(e.key) or real(e))
    frozen, host = jnp.arange(4096.0), np.arange(16.0)
    mgr = CheckpointManager(tmp_path / "run", backend="threads", max_to_keep=3)
    mgr.save(1, {"frozen": frozen, "lora": jnp.zeros(8), "host": host})
    assert sorted(hashed) == ["frozen", "host", "lora"]
    hashed.clear()
    mgr.save(2, {"frozen": frozen, "lora": jnp.ones(8), "host": host})
    assert sorted(hashed) == ["host", "lora"]              # the same frozen object: known
    assert mgr.last_save.bytes_carried >= frozen.nbytes
    hashed.clear()
    mgr.save(3, {"frozen": jnp.arange(4096.0), "lora": jnp.ones(8), "host": host})
    assert "frozen" in hashed                               # equal bytes, another object: hashed, then carried
    assert mgr.last_save.bytes_carried >= frozen.nbytes
    for step, want in ((2, 1.0), (3, 1.0)):
        got = restore(tmp_path / "run" / f"step_{step}", item="model")
        assert np.array_equal(got["frozen"], np.arange(4096.0)) and np.all(got["lora"] == want)


def test_lora_train_step_keeps_the_frozen_base_the_same_objects():
    """Our LoRA step hands back only the adapters and the non-parameter state: the base's
    arrays stay the objects they were (what the identity shortcut above needs)."""
    from shardckpt.tree import FlatTree
    model, opt = _lora_run()
    before = FlatTree.of(nnx.state(model, nnx.Param)).values()
    lora_train_step(model, opt, batch_for_step(0, CONFIG))
    after = FlatTree.of(nnx.state(model, nnx.Param)).values()
    lora_keys = set(FlatTree.of(nnx.state(model, nnx.LoRAParam)).values())
    assert lora_keys and all((after[k] is before[k]) == (k not in lora_keys) for k in before)


def test_carried_rows_are_trusted_only_as_this_process_validated_them(tmp_path, monkeypatch):
    """#20: the committer does not check the carried rows again one by one when it validated
    them itself (it published the base); a base it did not publish (here: forgotten, as in
    a fresh process) has every row of the new index checked in full. Both load the same."""
    from shardckpt.format import index as index_mod
    from shardckpt.saving import commit as commit_mod
    counts = {"trusted": 0, "full": 0}
    add, add_validated = index_mod.IndexValidator.add, index_mod.IndexValidator.add_validated
    monkeypatch.setattr(index_mod.IndexValidator, "add",
                        lambda self, *a: counts.__setitem__("full", counts["full"] + 1) or add(self, *a))
    monkeypatch.setattr(index_mod.IndexValidator, "add_validated",
                        lambda self, *a: counts.__setitem__("trusted", counts["trusted"] + 1) or add_validated(self, *a))
    frozen = {f"frozen{i}": np.arange(4096, dtype=np.float32) + i for i in range(3)}
    mgr = CheckpointManager(tmp_path / "run", backend="threads", max_to_keep=3)
    mgr.save(1, {**frozen, "lora": np.zeros(8, np.float32)})
    counts.update(trusted=0, full=0)
    mgr.save(2, {**frozen, "lora": np.ones(8, np.float32)})
    assert mgr.last_save.bytes_carried > 0 and counts["trusted"] == 3
    commit_mod.forget_versions()
    counts.update(trusted=0, full=0)
    tree = {**frozen, "lora": np.full(8, 2, np.float32)}
    mgr.save(3, tree)
    assert mgr.last_save.bytes_carried > 0 and counts["trusted"] == 0
    for step in (2, 3):
        got = restore(tmp_path / "run" / f"step_{step}", item="model")
        assert all(np.array_equal(got[k], v) for k, v in frozen.items())
    assert np.array_equal(restore(tmp_path / "run" / "step_3", item="model")["lora"], tree["lora"])
