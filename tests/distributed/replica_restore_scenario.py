"""Run in a subprocess by test_replica_restore.py: a 2-node ray.cluster_utils.Cluster where
N data-parallel workers per node (N = 1, 2, 4) restore the same replicated state through
their node's chunk cache. Reports, per run, the bytes each node read from storage, what the
workers read themselves, and the wall time. Prints one JSON line."""

import json
import os
import sys
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

STATE_ARRAYS, ROWS, COLS = 8, 1024, 1024           # 32 MiB of dense float32 (the suite's time: keep it small)


@ray.remote(num_cpus=0)
class Worker:
    def warm(self) -> None:
        """Imports (jax, flax: seconds per process) before anything is timed."""
        import shardckpt  # noqa: F401
        from shardckpt.executors.node_share import NodeSharedReader  # noqa: F401

    def restore(self, path: str, seed: int) -> dict:
        from shardckpt import Checkpoint
        from shardckpt.executors.node_share import NodeSharedReader
        from shardckpt.store.base import read_stats
        before = read_stats()["bytes"]
        target = {f"w{i}": np.zeros((ROWS, COLS), np.float32) for i in range(STATE_ARRAYS)}
        t0 = time.time()
        out, report = Checkpoint(path).restore("state", target, executor=NodeSharedReader())
        took = time.time() - t0
        rng = np.random.default_rng(seed)
        ok = all(np.array_equal(out[f"w{i}"], rng.standard_normal((ROWS, COLS)).astype(np.float32))
                 for i in range(STATE_ARRAYS))
        return {"ok": bool(ok and report.complete), "self_read": read_stats()["bytes"] - before, "s": took,
                "node": ray.get_runtime_context().get_node_id()}


def main(workdir: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shardckpt.executors.node_share import NAMESPACE, NodeChunkCache
    from shardckpt.testing import save_items

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    state_bytes = STATE_ARRAYS * ROWS * COLS * 4
    runs = []
    for seed, per_node in enumerate([1, 2, 4, 1, 4]):
        rng = np.random.default_rng(seed)
        tree = {f"w{i}": rng.standard_normal((ROWS, COLS)).astype(np.float32) for i in range(STATE_ARRAYS)}
        path = os.path.join(workdir, f"step_{seed}")
        save_items(path, {"state": tree}, backend="threads", num_shards=4)
        del tree
        workers = [Worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                   for n in nodes for _ in range(per_node)]
        ray.get([w.warm.remote() for w in workers])
        caches = {n: ray.get_actor(f"shardckpt-chunk-cache-{n[:16]}", namespace=NAMESPACE) for n in nodes} \
            if runs else {}
        before = {n: ray.get(c.stats.remote())["bytes"] for n, c in caches.items()}
        t0 = time.time()
        results = ray.get([w.restore.remote(path, seed) for w in workers])
        wall = time.time() - t0
        caches = {n: ray.get_actor(f"shardckpt-chunk-cache-{n[:16]}", namespace=NAMESPACE) for n in nodes}
        after = {n: ray.get(c.stats.remote())["bytes"] for n, c in caches.items()}
        runs.append({"workers_per_node": per_node, "wall_s": wall,
                     "node_read_bytes": [after[n] - before.get(n, 0) for n in nodes],
                     "worker_self_read": sum(r["self_read"] for r in results),
                     "all_ok": all(r["ok"] for r in results), "worker_s": [r["s"] for r in results]})
        for w in workers:
            ray.kill(w)
    del NodeChunkCache
    ray.shutdown()
    cluster.shutdown()
    return {"state_bytes": state_bytes, "runs": runs}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
