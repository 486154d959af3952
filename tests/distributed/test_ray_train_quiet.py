"""A Ray Train run set up as docs/ray_train.md says (a plain ``ray.init()``, the ``[train]``
extra, which brings ``ray[default]``) prints no ``Failed to query Ray Train Controller actor
state`` line (#18.9): the placement-group cleaner reaches the State API the dashboard
serves. Run in a fresh interpreter: the session's Ray runs without a dashboard, as tests
start it, and one process can hold one Ray."""

from __future__ import annotations

from tests.scenarios.run import run_python

SCRIPT = """
import time
import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.v2.jax import JaxTrainer
import numpy as np

def loop(config):
    from shardckpt.api.ray_train import RayTrainCheckpointer
    ckpt = RayTrainCheckpointer(num_shards=1, save_timeout=60)
    for step in range(4):
        time.sleep(1.5)
        ckpt.save(step, {"w": np.full(8, step, np.float32)}, metrics={"loss": 1.0 / (step + 1)})
    ckpt.finish()

ray.init(num_cpus=2)                  # as docs/ray_train.md says: the dashboard stays on
result = JaxTrainer(loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                    run_config=RunConfig(storage_path=__import__("sys").argv[1], name="quiet")).fit()
print("CHECKPOINT", result.checkpoint.path)
ray.shutdown()
"""


def test_a_documented_ray_train_run_prints_no_state_api_noise(tmp_path):
    r = run_python(SCRIPT, [str(tmp_path / "storage")], timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "CHECKPOINT" in r.stdout and "step_3" in r.stdout
    assert "Failed to query Ray Train Controller actor state" not in out, out[-4000:]
