"""Run in a subprocess by test_multinode.py: a 3-node ray.cluster_utils.Cluster (1 CPU
each) saving through per-node writers, then losing a node mid-save. Prints one JSON line."""

import json
import os
import sys
import threading
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster


def main(workdir: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    from shardckpt import Checkpoint
    from shardckpt.executors.ray import RayExecutor
    from shardckpt.testing import save_items

    out = {}
    rng = np.random.default_rng(0)
    tree = {f"layer{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(6)}
    ex = RayExecutor(save_timeout=60)
    path = save_items(os.path.join(workdir, "step_1"), {"model": tree}, num_shards=6, executor=ex)
    ck = Checkpoint(path)
    out["nodes_alive"] = len({node for _, _, node in ex.actors()})
    out["writer_nodes"] = sorted({f.writer["node_id"] for f in ck.manifest.files.values()})
    out["writer_pids"] = sorted({f.writer["pid"] for f in ck.manifest.files.values()})

    victim = workers[1]
    victim_id = victim.node_id
    victim_writer = [name for _, name, node in ex.actors() if node == victim_id]
    out["victim_node"], out["victim_writer"] = victim_id, victim_writer
    ex.test_write_delay = 4.0
    errors = []

    def run():
        try:
            save_items(os.path.join(workdir, "step_2"), {"model": tree}, num_shards=6, executor=ex)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=run)
    t0 = time.time()
    t.start()
    time.sleep(1.5)
    cluster.remove_node(victim)
    t.join(120)
    out["error"] = errors[0] if errors else None
    out["error_after_s"] = time.time() - t0
    out["visible_after_failure"] = sorted(p for p in os.listdir(workdir))
    ex.test_write_delay = 0.0
    path = save_items(os.path.join(workdir, "step_2"), {"model": tree}, num_shards=6, executor=ex)
    ck2 = Checkpoint(path)
    out["retry_writer_nodes"] = sorted({f.writer["node_id"] for f in ck2.manifest.files.values()})
    restored, report = ck2.restore("model", tree, executor=ex)
    out["restored_equal"] = report.complete and all(np.array_equal(restored[k], tree[k]) for k in tree)
    ray.shutdown()
    cluster.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
