"""The memory tier (``--memory-tier``, issue #19) on a simulated 4-node Ray cluster
(``ray.cluster_utils.Cluster`` in this process: head + 3 nodes), with a dense state of
``--memory-tier-gb`` GB (float32 arrays of random values: what optimizer moments look like).

Per sample, in the same minutes:

* a memory-tier save (``replicas=1``): blocking, and async (the time ``save`` blocks, and
  until committed), with the driver's threads writing (``threads``: the driver's node holds
  the first copies, the next node the replicas) and with Ray writers on every node (``ray``);
* the same state saved to the local directory: blocking, and async (time blocked);
* the persistence of a memory step to the local directory (by the holders), and the time of
  a training-like compute step run during it against the same step idle;
* recovery after a node loss: the node holding the replicas (threads) or one holding first
  copies (ray) is removed, then the newest step is loaded from memory, from the local
  directory, and from the loopback S3 server (moto),
  with the bytes each read from persistent storage (the local directory both with its files
  evicted from the page cache, as on a replacement node, and cached).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

from .common import GB, drop_cache, rmtree

NODE_STORE_FACTOR = 4.0        # object store per node, x the state (two steps while one replaces the other)


def _state(total_bytes: int, seed: int, step: int = 0) -> dict:
    """Dense random float32 jax arrays (what a training state is: its snapshot costs no copy)."""
    import jax
    import numpy as np
    n = 16
    rows = max(1, total_bytes // (n * 4 * 4096))
    rng = np.random.default_rng(seed)
    host = {f"m{i}": rng.standard_normal((rows, 4096), dtype=np.float32) for i in range(n)}
    host["m0"][0, 0] = step
    return {k: jax.device_put(v) for k, v in host.items()}


def _target(state: dict) -> dict:
    import numpy as np
    return {k: np.empty(v.shape, v.dtype) for k, v in state.items()}


def _compute_step() -> float:
    """A training-like step: a fixed amount of matrix work, timed."""
    import numpy as np
    a = np.ones((768, 768), np.float32)
    t = time.perf_counter()
    for _ in range(12):
        a = a @ a
        a /= a.max()
    return time.perf_counter() - t


def run_memory_tier(args, console) -> dict:
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from shardckpt import CheckpointManager, MemoryTier
    from shardckpt.store.base import read_stats
    from shardckpt.store.memory import RayMemoryStore

    total = int(args.memory_tier_gb * GB)
    repeats = args.repeats or 3
    work = Path(args.workdir or os.environ.get("TMPDIR", "/tmp")) / f"memory-tier-bench-{os.getpid()}"
    rmtree(work)
    work.mkdir(parents=True)
    store_bytes = int(total * NODE_STORE_FACTOR)
    for k, v in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)           # moto's; before the cluster starts, so its workers have them
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": store_bytes,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    for _ in range(3):
        cluster.add_node(num_cpus=1, object_store_memory=store_bytes)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    state = _state(total, 0)
    nbytes = sum(a.nbytes for a in state.values())
    console.print(f"memory tier: 4 simulated nodes, {nbytes / GB:.2f} GB dense float32 state, "
                  f"{store_bytes / GB:.1f} GB object store per node")
    rows: dict[str, list[float]] = {}
    recording = [False]

    def add(name, value):
        if recording[0]:
            rows.setdefault(name, []).append(value)

    from tests.scenarios.s3server import MotoServer
    moto = MotoServer(str(work))
    moto.create_bucket("bench")
    s3_dir = f"s3://bench/run?endpoint_url={moto.endpoint}"
    try:
        local = CheckpointManager(work / "local", max_to_keep=1, progress=False, incremental=False, backend="threads")
        s3 = CheckpointManager(s3_dir, max_to_keep=1, progress=False, incremental=False, backend="threads")
        for sample in range(repeats + 1):               # sample 0 warms up (actors, first touch)
            recording[0] = sample > 0
            step = sample + 1
            state = _state(total, 0, step)               # a new step: every array written again
            tiers = {}
            for backend in ("threads", "ray"):
                name = f"bench-{backend}"
                mgr = CheckpointManager(work / f"persist-{backend}", max_to_keep=1, progress=False, incremental=False,
                                        memory=MemoryTier(replicas=1, keep=1, name=name), backend=backend)
                t = time.perf_counter()
                mgr.save(step, state)
                add(f"memory save, blocking ({backend})", time.perf_counter() - t)
                t = time.perf_counter()
                mgr.save(step + 1000, state, blocking=False)
                add(f"memory save, async: blocked ({backend})", time.perf_counter() - t)
                mgr.wait_until_finished()
                add(f"memory save, async: committed ({backend})", time.perf_counter() - t)
                tiers[backend] = mgr
            t = time.perf_counter()
            local.save(step, state)
            add("local directory save, blocking", time.perf_counter() - t)
            t = time.perf_counter()
            local.save(step + 1000, state, blocking=False)
            add("local directory save, async: blocked", time.perf_counter() - t)
            local.wait_until_finished()
            add("local directory save, async: committed", time.perf_counter() - t)
            if sample == 0 or sample == repeats:
                s3.save(step + 1000, state)               # the S3 copy recovery reads (moto is slow to fill)
            # persistence by the holders, and a compute step during it
            mgr = tiers["threads"]
            idle = min(_compute_step() for _ in range(3))
            during: list[float] = []
            done = threading.Event()

            def compute():
                while not done.is_set():
                    during.append(_compute_step())
            th = threading.Thread(target=compute)
            th.start()
            t = time.perf_counter()
            mgr.tiers.persist(step + 1000)
            persist_s = time.perf_counter() - t
            done.set()
            th.join()
            add("persist memory -> local directory (holders)", persist_s)
            add("persist throughput GB/s", nbytes / GB / persist_s)
            add("compute step during persist / idle", statistics.median(during) / idle if during else 1.0)
        recording[0] = True
        # --- recovery after a node loss (once: it takes the cluster apart) --------------------
        recovery = {}
        head = cluster.head_node.node_id
        for n, backend in enumerate(("threads", "ray")):
            final = 5000 + n                  # saved now, on the cluster as the last loss left it
            tiers[backend].save(final, state)
            mem = RayMemoryStore(f"mem://bench-{backend}?replicas=1")
            base = mem.key(f"step_{final}") + "/"
            held = {}
            for node, listing in mem.ask("listing", base).items():
                held[node] = sum(size for _, size, _, _ in listing if size > 65536)
            victims = [n for n in sorted(held, key=lambda n: -held[n]) if n != head]
            victim = victims[0]
            cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == victim), allow_graceful=False)
            while any(n["NodeID"] == victim and n["Alive"] for n in ray.nodes()):
                time.sleep(0.2)
            cluster.add_node(num_cpus=1, object_store_memory=store_bytes)
            cluster.wait_for_nodes()
            mgr = CheckpointManager(work / f"persist-{backend}", memory=MemoryTier(replicas=1, keep=1,
                                    name=f"bench-{backend}"), backend="threads", progress=False)
            times = []
            for _ in range(repeats):
                before = read_stats()["bytes"]
                target = _target(state)
                t = time.perf_counter()
                st = mgr.load_latest(model=target)
                times.append(time.perf_counter() - t)
                storage = read_stats()["bytes"] - before
            ok = all(np.array_equal(np.asarray(st.model[k]), np.asarray(state[k])) for k in state)
            recovery[backend] = {"seconds": times, "storage_bytes": storage, "exact": ok,
                                 "tier": mgr.last_restore.tier, "victim_held_bytes": held[victim]}
            add(f"recovery from memory after a node loss ({backend})", statistics.median(times))
        newest_local = work / "local" / f"step_{local.latest_step}"
        for name, mgr, cache in (("local directory, cold cache", local, "cold"),
                                 ("local directory, warm cache", local, "warm"), ("loopback S3", s3, None)):
            times = []
            for _ in range(repeats):
                target = _target(state)
                if cache == "cold":      # a replacement node has none of the checkpoint in its page cache
                    drop_cache(newest_local)
                before = read_stats()["bytes"]
                t = time.perf_counter()
                mgr.load_latest(model=target)
                times.append(time.perf_counter() - t)
            recovery[name] = {"seconds": times, "storage_bytes": read_stats()["bytes"] - before}
            add(f"recovery from the {name}", statistics.median(times))
    finally:
        moto.close()
        ray.shutdown()
        cluster.shutdown()
        rmtree(work)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    console.print(f"{'':58s} median of {repeats}")
    for k, v in medians.items():
        console.print(f"  {k:56s} {v:8.3f}")
    best_mem = min(medians["recovery from memory after a node loss (threads)"],
                   medians["recovery from memory after a node loss (ray)"])
    ray_mem = medians["recovery from memory after a node loss (ray)"]
    ratios = {
        "recovery: loopback S3 / memory (ray)": medians["recovery from the loopback S3"] / ray_mem,
        "recovery: local cold / memory (ray)": medians["recovery from the local directory, cold cache"] / ray_mem,
        "recovery: local warm / memory (ray)": medians["recovery from the local directory, warm cache"] / ray_mem,
        "recovery: local cold / memory (best)": medians["recovery from the local directory, cold cache"] / best_mem,
        "blocked: memory async / local async": medians["memory save, async: blocked (threads)"]
        / medians["local directory save, async: blocked"],
    }
    for k, v in ratios.items():
        console.print(f"  {k:56s} {v:8.2f}x")
    return {"state_bytes": nbytes, "repeats": repeats, "samples": rows, "medians": medians, "ratios": ratios,
            "recovery": recovery}
