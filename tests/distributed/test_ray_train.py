"""Ray Train V2 end to end: a JaxTrainer with 2 CPU workers trains a tiny LMModel, saves
with shardckpt every k steps (both ranks write, one manifest, reported with NO_UPLOAD),
one worker dies abruptly, FailureConfig restarts the run from the last committed
checkpoint, and the final parameters equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

STEPS, EVERY, CRASH_AFTER = 8, 2, 6


def train_loop(config):
    import ray.train

    from shardckpt.api.ray_train import RayTrainCheckpointer
    from shardckpt.lm.training import batch_for_step, make_tx, new_run, state_digest, train_step

    tier = {}
    if config["memory"]:
        from shardckpt import MemoryTier
        tier = {"memory": MemoryTier(replicas=0, keep=2, name=config["memory"]), "persist_every": 3}
    ckpt = RayTrainCheckpointer(async_save=config["async_save"], num_shards=1, save_timeout=60, **tier)
    state = ckpt.restore(tx=make_tx())
    if state is None:
        model, optimizer = new_run()
        start = 0
    else:
        model, optimizer, start = state.model, state.optimizer, state.step + 1
    rank = ray.train.get_context().get_world_rank()
    marker = Path(config["marker"])
    for step in range(start, STEPS):
        loss = train_step(model, optimizer, batch_for_step(step))
        if rank == 1 and step == CRASH_AFTER and not marker.exists():
            marker.write_text(f"crashed at step {step}")
            os._exit(1)          # abrupt: no cleanup, no exception
        if (step + 1) % EVERY == 0:
            ckpt.save(step, model, optimizer, metrics={"loss": float(loss)})
    ckpt.finish()
    if rank == 0:   # the outcome, for the test to compare
        Path(config["outcome"]).write_text(json.dumps(
            {"digest": state_digest(model, optimizer), "resumed_from": -1 if state is None else state.step,
             "tier": ckpt.manager.last_restore.tier if state is not None and ckpt.manager.tiers else None}))


@pytest.mark.parametrize("async_save, memory", [(False, None), (True, None), (False, "raytrain-mem")],
                         ids=["sync", "async", "memory-tier"])
def test_worker_crash_resumes_from_last_committed_checkpoint_bit_exactly(tmp_path, async_save, memory):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    from shardckpt import Checkpoint
    from shardckpt.lm.training import batch_for_step, new_run, state_digest, train_step
    # the loop lives in this test module, which Ray workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model, optimizer = new_run()
    for step in range(STEPS):
        train_step(model, optimizer, batch_for_step(step))
    reference = state_digest(model, optimizer)

    trainer = JaxTrainer(
        train_loop,
        train_loop_config={"marker": str(tmp_path / "crashed"), "async_save": async_save, "memory": memory,
                           "outcome": str(tmp_path / "outcome.json")},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="run",
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss",
                                                                checkpoint_score_order="min")),
    )
    result = trainer.fit()
    assert (tmp_path / "crashed").exists(), "the worker crash happened"
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["digest"] == reference
    # the newest checkpoint committed before the crash at step 6: 5 (an async save of 5 may
    # still have been in flight when the worker died, then 3)
    assert outcome["resumed_from"] == 5 if not async_save else outcome["resumed_from"] in (3, 5), outcome
    run_dir = tmp_path / "storage" / "run"
    if memory:
        # step 5 was never persisted (every 3rd: step 3), so it came from memory; the newest
        # step reached the directory at finish()
        from shardckpt.store.memory import RayMemoryStore
        RayMemoryStore(f"mem://{memory}").clear()
        assert outcome["tier"] == "memory", outcome
        assert {"step_3", "step_7"} <= {p.name for p in run_dir.iterdir()}
        assert result.error is None
        return
    # Ray Train's retention applied to our checkpoints; each kept one is complete
    kept = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step_"))
    # num_to_keep=2 best + the latest (Ray Train always keeps it) + at most one committed
    # while the crash happened, which Ray Train never registered and so never deletes
    assert 1 <= len(kept) <= 4, kept
    for name in kept:
        ck = Checkpoint(run_dir / name)
        pids = {f.writer["pid"] for f in ck.manifest.files.values()}
        assert len(pids) == 2, "both ranks wrote their share"
    assert result.checkpoint is not None and Path(result.checkpoint.path).name in kept
    assert not [p for p in os.listdir(run_dir) if ".tmp-" in p]
