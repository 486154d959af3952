"""The two ways to checkpoint from Ray Train V2 (docs/ray_train.md), in one JaxTrainer run
with 2 CPU workers:

1. Ray's own pattern: rank 0 calls ``save_model(tmpdir, model)`` with default arguments
   (one participant: it must not wait for the other rank) and reports
   ``Checkpoint.from_directory(tmpdir)``; Ray Train copies it into the run's storage.
2. Every rank through ``RayTrainCheckpointer``: a LoRA model whose optimizer updates
   ``nnx.LoRAParam`` only, with an extra item, restored with ``wrt=``.

And the mistake between them: only rank 0 calls ``manager.save`` in a 2-worker job. The
coordinator notices within ``join_timeout`` that rank 1 never began the save and aborts it
with an error naming the missing rank, instead of waiting for ``save_timeout``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.train")


def train_loop(config):
    import jax
    import jax.numpy as jnp
    import optax
    import ray.train
    from flax import nnx
    from ray.train import Checkpoint

    from shardckpt import CheckpointManager, SaveAbortedError, save_model
    from shardckpt.api.ray_train import RayTrainCheckpointer

    rank = ray.train.get_context().get_world_rank()
    out: dict = {}

    # 1. rank 0 saves alone into a local directory and reports it (Ray's docs pattern)
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            t = time.time()
            save_model(tmp, model)                      # default arguments
            out["rank0_save_s"] = time.time() - t
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report({"phase": 1}, checkpoint=checkpoint)

    # 2. every rank saves through RayTrainCheckpointer: LoRA, wrt=nnx.LoRAParam, an extra item
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.LoRALinear(8, 16, lora_rank=2, rngs=rngs)
            self.l2 = nnx.LoRALinear(16, 4, lora_rank=2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    tx = optax.adam(1e-2)
    net = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(net, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(net, opt, x):
        grads = nnx.grad(lambda m, x: (m(x) ** 2).mean(), argnums=nnx.DiffState(0, nnx.LoRAParam))(net, x)
        opt.update(net, grads)

    for i in range(3):
        step(net, opt, jax.random.normal(jax.random.key(i), (4, 8)))
    ema = jax.tree.map(lambda x: x * 0.5, nnx.state(net, nnx.LoRAParam))
    ckpt = RayTrainCheckpointer(num_shards=1, save_timeout=120)   # the run's storage
    ckpt.save(3, net, opt, items={"ema": ema}, metrics={"loss": 1.0})
    state = ckpt.restore(model=Net(nnx.Rngs(5)), tx=tx, wrt=nnx.LoRAParam)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), nnx.state(state.optimizer), nnx.state(opt))
    out["lora_opt_equal"] = all(jax.tree.leaves(same))
    out["ema_equal"] = all(jax.tree.leaves(jax.tree.map(   # no target: host arrays, nested by key path
        lambda a, b: bool(jnp.array_equal(a, b)), state.items["ema"], nnx.to_pure_dict(ema))))
    out["restored_step"] = state.step

    # 3. the mistake: only rank 0 calls manager.save in a 2-worker job
    if rank == 0:
        manager = CheckpointManager(config["mistake_dir"], join_timeout=config["join_timeout"], save_timeout=300)
        t = time.time()
        try:
            manager.save(1, model)
            out["mistake"] = "committed?!"
        except SaveAbortedError as e:
            out["mistake"] = str(e)
        out["mistake_s"] = time.time() - t
        out["mistake_steps"] = manager.all_steps()
    ray.train.report({"phase": 3})

    # 4. every rank saves into an object-store directory (no shared filesystem): each rank
    # uploads its own shards, one manifest, restored bit-exactly; max_to_keep bounds it
    s3 = RayTrainCheckpointer(config["s3_dir"], num_shards=1, save_timeout=120, max_to_keep=1)
    s3.save(4, net, opt, items={"ema": ema}, metrics={"loss": 0.5})
    s3.save(5, net, opt, metrics={"loss": 0.4})
    back = s3.restore(model=Net(nnx.Rngs(7)), tx=tx, wrt=nnx.LoRAParam)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), nnx.state(back.optimizer), nnx.state(opt))
    out["s3_opt_equal"] = all(jax.tree.leaves(same))
    out["s3_step"], out["s3_steps"] = back.step, s3.manager.all_steps()
    from shardckpt import Checkpoint as Ck
    out["s3_writer_pids"] = sorted({f.writer["pid"] for f in Ck(s3.manager.step_path(5)).manifest.files.values()})
    ray.train.report({"phase": 4})
    if rank == 0:
        Path(config["outcome"]).write_text(json.dumps(out))


def test_rank0_local_save_and_every_rank_save_and_a_missing_rank(tmp_path, s3_server):
    import ray
    from flax import nnx
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    from shardckpt import load_model

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    outcome = tmp_path / "outcome.json"
    trainer = JaxTrainer(
        train_loop,
        train_loop_config={"mistake_dir": str(tmp_path / "mistake"),
                           "join_timeout": 5.0, "outcome": str(outcome),
                           "s3_dir": f"s3://ckpts/raytrain-{time.time_ns()}?endpoint_url={s3_server.endpoint}"},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="patterns"),
    )
    t = time.time()
    result = trainer.fit()
    elapsed = time.time() - t
    out = json.loads(outcome.read_text())
    print({k: v for k, v in out.items() if k.endswith("_s")}, out["mistake"])
    # 1. rank 0's default save_model saved alone, in seconds (no wait for rank 1)
    assert out["rank0_save_s"] < 30, out
    # the reported directory was copied into the run's storage and loads
    reported = [p for p in (tmp_path / "storage" / "patterns").iterdir() if p.name.startswith("checkpoint_")]
    assert reported, list((tmp_path / "storage" / "patterns").iterdir())
    linear, _ = load_model(min(reported), model=nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    ref = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    assert (linear.kernel[...] == ref.kernel[...]).all()
    # 2. every rank: the LoRA optimizer and the extra item came back
    assert out["lora_opt_equal"] and out["ema_equal"] and out["restored_step"] == 3, out
    # 3. rank 1 never joined: aborted after join_timeout, naming it, nothing committed
    assert "participants [1] of 2 never began" in out["mistake"], out["mistake"]
    assert "process_count=1" in out["mistake"], out["mistake"]
    assert out["mistake_s"] < 60, out   # join_timeout=5 s (+ Ray overheads), not save_timeout=300 s
    assert out["mistake_steps"] == []
    # 4. an object-store directory: both ranks uploaded their own shards, bit-exact, bounded
    assert out["s3_opt_equal"] and out["s3_step"] == 5 and out["s3_steps"] == [5], out
    assert len(out["s3_writer_pids"]) == 2, out
    assert result.error is None and elapsed < 600
