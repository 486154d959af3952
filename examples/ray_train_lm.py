"""Train a tiny LMModel with Ray Train (JaxTrainer) and shardckpt checkpoints.

Runs on a laptop (CPU workers) and unchanged on a cluster whose nodes share
``--storage-path`` (NFS/EFS/Filestore; see docs/cluster.md):

    python examples/ray_train_lm.py --storage-path /tmp/ray_train_lm --workers 2 --steps 20

Every worker calls ``RayTrainCheckpointer.save``: each writes its share of the
(replicated) state, one manifest is committed, and the checkpoint is registered with
Ray Train (``CheckpointConfig`` keeps the best 2 by loss). Run it twice: the second run
resumes from the last checkpoint of the first (same ``--name``). ``--crash-at STEP`` kills
worker 1 once at that step to show FailureConfig restarting from the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def train_loop(config: dict) -> None:
    import ray.train

    from shardckpt.api.ray_train import RayTrainCheckpointer
    from shardckpt.lm.training import batch_for_step, make_tx, new_run, train_step

    ckpt = RayTrainCheckpointer(async_save=config["async_save"])
    state = ckpt.restore(tx=make_tx())
    rank = ray.train.get_context().get_world_rank()
    if state is None:
        model, optimizer, start = *new_run(), 0
    else:
        model, optimizer, start = state.model, state.optimizer, state.step + 1
        if rank == 0:
            print(f"resumed from step {state.step}")
    marker = Path(config["storage_path"]) / ".crashed-once"
    for step in range(start, config["steps"]):
        loss = float(train_step(model, optimizer, batch_for_step(step)))
        if step == config["crash_at"] and rank == 1 and not marker.exists():
            marker.write_text(str(step))
            os._exit(1)
        if (step + 1) % config["save_every"] == 0 or step == config["steps"] - 1:
            ckpt.save(step, model, optimizer, metrics={"loss": loss})
            if rank == 0:
                print(f"step {step}: loss {loss:.4f}, checkpoint committed")
    ckpt.finish()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage-path", required=True, help="shared directory for the run (every node mounts it)")
    p.add_argument("--name", default="ray_train_lm")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--crash-at", type=int, default=-1)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxConfig, JaxTrainer

    if not ray.is_initialized():
        # keep the dashboard: Ray Train's placement-group cleaner asks its State API (docs/ray_train.md)
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    storage = str(Path(args.storage_path).absolute())
    trainer = JaxTrainer(
        train_loop,
        train_loop_config={"steps": args.steps, "save_every": args.save_every, "crash_at": args.crash_at,
                           "async_save": args.async_save, "storage_path": storage},
        jax_config=JaxConfig(use_gpu=args.gpu),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                     resources_per_worker=None if args.gpu else {"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name=args.name,
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss",
                                                                checkpoint_score_order="min")),
    )
    result = trainer.fit()
    print(f"done; best checkpoint: {result.checkpoint.path if result.checkpoint else None}")


if __name__ == "__main__":
    main()
