"""The memory tier on one Ray node (the package's Ray session): the Store contract, the
manager's tiers (persistence, retention per tier, incremental saves by alias, loads),
persistence to the loopback S3 server, options checked at construction, the CLI. The
multi-node failure cases run on a simulated cluster in ``test_memory_tier.py``."""

from __future__ import annotations

import errno
import re
import time

import numpy as np
import optax
import pytest
from flax import nnx

from shardckpt import CheckpointError, CheckpointManager, MemoryTier, restore, verify
from shardckpt.saving.persist import copy_checkpoint
from shardckpt.store.base import read_stats
from shardckpt.store.memory import RayMemoryStore, memory_read_stats
from shardckpt.store.registry import open_store
from tests.conftest import LR, make_optimizer
from tests.scenarios.run import ROOT
from tests.store.test_store_contract import (  # noqa: F401 - the contract, run against the memory tier
    test_a_crashed_save_is_a_leftover_the_store_names,
    test_a_whole_save_restore_and_resave_through_the_store,
    test_discard_and_abort_leave_nothing_visible,
    test_reads_are_bounded,
    test_retire_makes_it_stop_being_a_checkpoint,
    test_staged_files_are_invisible_until_published,
    test_verify_reports_a_damaged_file_alike_on_every_store,
)


def _name(request) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-") + f"-{time.monotonic_ns() % 10**9}"


@pytest.fixture
def root(request):
    """The memory tier as the contract tests' store root (one node: replicas=0)."""
    uri = f"mem://{_name(request)}?replicas=0"
    yield uri, None
    RayMemoryStore(uri).clear()


@pytest.fixture
def tier(request):
    t = MemoryTier(replicas=0, keep=2, name=_name(request))
    yield t
    RayMemoryStore(f"mem://{t.name}").clear()


def _tree(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((256, 512)).astype(np.float32), "b": np.arange(512, dtype=np.int64) + step}


def _same(got, step: int) -> bool:
    want = _tree(step)
    return all(np.array_equal(np.asarray(got[k]), want[k]) for k in want)


# --- options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"replicas": -1}, "replicas"), ({"replicas": 9}, "at most 8"), ({"keep": 0}, "keep"),
    ({"replicas": True}, "replicas"), ({"name": "has space"}, "name"), ({"name": "x" * 80}, "name"),
])
def test_memory_tier_options_are_checked_when_made(kw, words):
    with pytest.raises(CheckpointError, match=words):
        MemoryTier(**kw)


def test_manager_tier_options_are_checked_at_construction(tmp_path, tier):
    with pytest.raises(CheckpointError, match="persist_every"):
        CheckpointManager(tmp_path / "a", persist_every=3)
    with pytest.raises(CheckpointError, match="persist_every"):
        CheckpointManager(tmp_path / "b", memory=tier, persist_every=0)
    with pytest.raises(CheckpointError, match="MemoryTier"):
        CheckpointManager(tmp_path / "c", memory={"replicas": 1})


@pytest.mark.parametrize("uri, words", [
    ("mem://t?replicas=x", "not a number"), ("mem://t?replicas=12", "0 to 8"), ("mem://t?copies=2", "unknown option"),
])
def test_memory_uris_are_checked(uri, words):
    with pytest.raises(CheckpointError, match=words):
        open_store(uri)


def test_replicas_need_as_many_nodes(request):
    with pytest.raises(CheckpointError, match="replicas=1 keeps every file on 2 nodes"):
        CheckpointManager(f"mem://{_name(request)}", backend="threads").save(1, _tree(1))


# --- the manager's tiers -------------------------------------------------------------------------

def test_saves_go_to_memory_and_every_nth_step_is_persisted(tmp_path, tier):
    mgr = CheckpointManager(tmp_path / "run", max_to_keep=2, memory=tier, persist_every=2, backend="threads")
    for step in range(1, 6):
        path = mgr.save(step, _tree(step))
        assert str(path).startswith("mem://"), path
    mgr.wait_until_persisted()
    assert [i.step for i in mgr.tiers.catalog.checkpoints()] == [4, 5]          # keep=2 in memory
    assert [i.step for i in mgr.catalog.checkpoints()] == [2, 4]                # persisted, max_to_keep=2
    assert mgr.all_steps() == [2, 4, 5] and mgr.latest_step == 5
    assert str(mgr.step_path(5)).startswith("mem://") and not str(mgr.step_path(2)).startswith("mem://")
    for step in (2, 4):
        assert verify(mgr.store.location(f"step_{step}")).ok
        assert _same(restore(mgr.store.location(f"step_{step}")), step)
    mgr.close()                                                                  # the newest reaches the directory
    assert [i.step for i in mgr.catalog.checkpoints()] == [4, 5]
    assert mgr.tiers.catalog.checkpoints() == [], "close() releases the nodes' memory"
    assert sum(u["held_bytes"] for u in mgr.tiers.store.usage().values()) == 0


def test_load_latest_reads_memory_only(tmp_path, tier):
    mgr = CheckpointManager(tmp_path / "run", memory=tier, persist_every=1, backend="threads")
    for step in (1, 2):
        mgr.save(step, _tree(step))
    mgr.wait_until_persisted()
    before, mem_before = read_stats()["bytes"], memory_read_stats()["bytes"]
    st = CheckpointManager(tmp_path / "run", memory=tier, backend="threads").load_latest(model=_tree(0))
    assert st.step == 2 and _same(st.model, 2)
    assert read_stats()["bytes"] == before, "the persistent directory was read"
    assert memory_read_stats()["bytes"] - mem_before >= _tree(2)["w"].nbytes


def test_a_step_gone_from_memory_loads_from_the_directory(tmp_path, tier):
    mgr = CheckpointManager(tmp_path / "run", memory=tier, persist_every=1, backend="threads")
    mgr.save(1, _tree(1))
    mgr.wait_until_persisted()
    mgr.tiers.store.clear()                        # the cluster restarted: nothing in memory
    fresh = CheckpointManager(tmp_path / "run", memory=tier, backend="threads")
    st = fresh.load_latest(model=_tree(0))
    assert st.step == 1 and _same(st.model, 1) and fresh.last_restore.tier == "persistent"


def test_nnx_model_and_optimizer_resume_bit_exactly(tmp_path, tier, tiny_config):
    from shardckpt import LMModel
    model = LMModel(tiny_config, rngs=nnx.Rngs(0))
    opt = make_optimizer(model)
    mgr = CheckpointManager(tmp_path / "run", memory=tier, persist_every=2, backend="threads")
    mgr.save(1, model, opt, config=tiny_config)
    st = mgr.load_latest(tx=optax.adamw(LR))
    for a, b in zip(nnx.state(model, nnx.Param).flat_state(), nnx.state(st.model, nnx.Param).flat_state()):
        assert np.array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))
    assert mgr.last_restore.tier == "memory"
    mgr.close()
    assert [i.step for i in mgr.catalog.checkpoints()] == [1]


def test_incremental_saves_in_memory_alias_unchanged_files(tmp_path, tier):
    frozen = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)    # 2 MiB, never changes
    mgr = CheckpointManager(tmp_path / "run", memory=tier, backend="threads")
    mgr.save(1, {"frozen": frozen, "head": np.zeros(64, np.float32)})
    held = sum(u["held_bytes"] for u in mgr.tiers.store.usage().values())
    mgr.save(2, {"frozen": frozen, "head": np.ones(64, np.float32)})
    assert mgr.last_save.bytes_carried >= frozen.nbytes
    grown = sum(u["held_bytes"] for u in mgr.tiers.store.usage().values()) - held
    assert grown < frozen.nbytes // 4, f"the unchanged array took {grown} more bytes of memory"
    st = mgr.load_latest(model={"frozen": np.zeros_like(frozen), "head": np.zeros(64, np.float32)})
    assert np.array_equal(st.model["frozen"], frozen) and np.array_equal(st.model["head"], np.ones(64, np.float32))


def test_a_failed_persist_is_raised_and_the_step_stays_in_memory(tmp_path, tier):
    from shardckpt.testing import Fault, FaultPlan
    mgr = CheckpointManager(tmp_path / "run", memory=tier, persist_every=1, backend="threads")
    with FaultPlan(Fault("rename", "step_1", errno.ENOSPC, times=100)) as plan:   # the directory's disk is full
        mgr.save(1, _tree(1))
        with pytest.raises(CheckpointError, match="persisting step 1"):
            mgr.wait_until_persisted()
    assert plan.fired
    assert [i.step for i in mgr.tiers.catalog.checkpoints()] == [1] and mgr.catalog.checkpoints() == []
    assert _same(mgr.load_latest(model=_tree(0)).model, 1)


# --- persistence to object stores and the CLI -------------------------------------------------------

def test_persist_to_the_loopback_s3_server(s3_server, request):
    src = RayMemoryStore(f"mem://{_name(request)}?replicas=0")
    try:
        from shardckpt.testing import save_items
        save_items(src.location("step_3"), {"state": _tree(3)}, backend="threads", num_shards=2, metrics={"loss": 0.5})
        dst = open_store(f"s3://ckpts/persist/{_name(request)}?endpoint_url={s3_server.endpoint}")
        report = copy_checkpoint(src, "step_3", dst)
        assert report.files == 2 and report.nbytes >= _tree(3)["w"].nbytes
        assert verify(dst.location("step_3")).ok
        assert _same(restore(dst.location("step_3")), 3)
    finally:
        src.clear()


def test_cli_lists_and_verifies_a_memory_tier(tmp_path, tier):
    """``RAY_ADDRESS=... shardckpt ls mem://NAME``, as a user types it beside a running job."""
    import os
    import subprocess
    import sys

    import ray
    mgr = CheckpointManager(tmp_path / "run", memory=tier, backend="threads")
    mgr.save(5, _tree(5))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def cli(*args):
        return subprocess.run([sys.executable, "-c", "import sys; from shardckpt.tools.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *args], capture_output=True, text=True,
                              timeout=120, env=env)
    ls = cli("ls", f"mem://{tier.name}")
    assert ls.returncode == 0 and "1 checkpoints" in ls.stdout and "latest" in ls.stdout, ls.stdout + ls.stderr
    ok = cli("verify", f"mem://{tier.name}/step_5")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = cli("gc", str(tmp_path / "run"), "--clear")
    assert refused.returncode != 0 and "memory tier" in refused.stderr, refused.stderr
    cleared = cli("gc", f"mem://{tier.name}", "--clear")
    assert cleared.returncode == 0 and "files released" in cleared.stdout, cleared.stdout + cleared.stderr
    assert mgr.tiers.catalog.checkpoints() == []
