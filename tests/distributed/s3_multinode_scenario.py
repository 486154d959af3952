"""Run in a subprocess by test_s3_multinode.py: a 3-node ray.cluster_utils.Cluster saving to
the loopback S3 server with one writer per node, no shared filesystem involved. Checks that
each node's writer uploads its own shards, that nothing is written to any local temp
directory during the save, and the saving process's peak extra memory; then a writer killed
mid-upload. Prints one JSON line."""

import json
import os
import sys
import threading
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from tests.scenarios.reliability import peak_rss_bytes, peak_rss_reset  # noqa: E402


def rss_parts() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


class RssSampler:
    """Peak of each RSS part of this process while a block runs (sampled every 5 ms)."""

    def __init__(self):
        self.base = rss_parts()
        self.peak = dict(self.base)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.005):
            for k, v in rss_parts().items():
                self.peak[k] = max(self.peak[k], v)

    def extra(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {k: self.peak[k] - self.base[k] for k in self.base}


def files_under(root: str) -> set[str]:
    out = set()
    for d, _, names in os.walk(root):
        out.update(os.path.join(d, n) for n in names)
    return out


def main(endpoint: str, ray_tmp: str) -> dict:
    os.makedirs(os.path.join(os.environ["TMPDIR"], "ray"), exist_ok=True)   # Ray notes its address there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                             "temp_dir": ray_tmp})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    from shardckpt import Checkpoint, CheckpointError, CheckpointManager
    from shardckpt.catalog import Catalog
    from shardckpt.executors.ray import RayExecutor
    from shardckpt.store.registry import open_store
    from shardckpt.store.s3 import PART_BYTES, PARTS_IN_FLIGHT
    from shardckpt.testing import save_items

    out = {}
    root = f"s3://ckpts/multinode?endpoint_url={endpoint}"
    rng = np.random.default_rng(0)
    tree = {f"layer{i}": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(48)}   # 96 MiB, dense
    state_bytes = sum(a.nbytes for a in tree.values())
    ex = RayExecutor.get(save_timeout=120)
    ex.actors()
    tmp = os.environ["TMPDIR"]
    before = files_under(tmp) | files_under(os.getcwd())
    peak_rss_reset()
    base = peak_rss_bytes()
    sampler = RssSampler()
    t0 = time.time()
    mgr = CheckpointManager(root, max_to_keep=2, backend="ray", save_timeout=120)
    save_items(mgr.step_path(1), {"model": tree}, step=1, backend="ray", save_timeout=120)
    out["save_s"] = time.time() - t0
    out["peak_extra_rss"] = peak_rss_bytes() - base
    out["peak_extra_rss_parts"] = sampler.extra()
    out["state_bytes"] = state_bytes
    out["inflight_peak"] = ex.peak_inflight_bytes
    out["part_buffers_per_writer"] = PART_BYTES * (PARTS_IN_FLIGHT + 1)
    out["new_local_files"] = sorted((files_under(tmp) | files_under(os.getcwd())) - before)
    ck = Checkpoint(mgr.step_path(1))
    nodes = {}
    for f in ck.manifest.files.values():
        nodes.setdefault(f.writer["node_id"], set()).add((f.writer["writer"], f.writer["pid"]))
    out["writer_nodes"] = len(nodes)
    out["writers_per_node"] = sorted(len(v) for v in nodes.values())
    actor_node = {d["pid"]: d["node_id"] for d in ray.get([h.identity.remote() for h, _, _ in ex.actors()])}
    out["each_shard_by_its_node_writer"] = all(actor_node.get(f.writer["pid"]) == f.writer["node_id"]
                                               for f in ck.manifest.files.values())
    restored, report = ck.restore("model", {k: np.zeros_like(v) for k, v in tree.items()})
    out["restored_equal"] = report.complete and all(np.array_equal(restored[k], tree[k]) for k in tree)

    # a writer killed mid-upload: the save aborts within its deadline naming it; no manifest;
    # step 1 intact; the orphans are invisible and gc removes them
    ex.test_write_delay = 3.0
    victim_handle, victim_name, victim_node = ex.actors()[1]
    errors = []

    def run():
        try:
            save_items(mgr.step_path(2), {"model": tree}, executor=ex, save_timeout=60)
        except CheckpointError as e:
            errors.append(f"{type(e).__name__}: {e}")

    th = threading.Thread(target=run)
    t0 = time.time()
    th.start()
    time.sleep(1.5)
    ray.kill(victim_handle)
    th.join(120)
    ex.test_write_delay = 0.0
    out["kill_error"] = errors[0] if errors else None
    out["kill_error_after_s"] = time.time() - t0
    out["victim_writer"], out["victim_node"] = victim_name, victim_node
    out["steps_after_kill"] = mgr.all_steps()
    out["step1_still_equal"] = all(np.array_equal(v, tree[k])
                                   for k, v in Checkpoint(mgr.step_path(1)).read_arrays("model").items())
    store = open_store(root)
    out["step2_manifest"] = store.exists("step_2/manifest.json")
    catalog = Catalog(store)
    plan = catalog.leftovers()
    out["leftovers_planned"] = [(lo.name, lo.action) for lo in plan]
    catalog.cleanup_leftovers()
    out["step2_objects_after_gc"] = [e.name for e in store.list("step_2")]
    ray.shutdown()
    cluster.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
