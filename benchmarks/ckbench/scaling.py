"""``--scaling``: shardckpt's Ray backend on ``ray.cluster_utils.Cluster`` with 1, 2, 4
simulated nodes (1 CPU each, one writer per node), one subprocess per configuration.

Names used beyond shardckpt's top-level API: ``shardckpt.executors.ray.RayExecutor.get``,
``Checkpoint(...).manifest.files[...].writer``.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import GB, REPO, load_avg, warm_cache
from .states import abstract_targets, build_model_opt, config_for, tree_nbytes


def scaling_child(args) -> None:
    import jax
    import ray
    from flax import nnx
    from ray.cluster_utils import Cluster

    from shardckpt import Checkpoint, CheckpointManager
    from shardckpt.executors.ray import RayExecutor

    n = args.nodes
    t_start = time.perf_counter()
    store = args.object_store_mb << 20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store,
                                                            "include_dashboard": False})
    for _ in range(n - 1):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    t_cluster = time.perf_counter() - t_start
    spec = {"kind": "lm", "model_config": json.loads(args.config_json)}
    model, opt = build_model_opt(spec)
    targets = abstract_targets(spec)
    nbytes = tree_nbytes({"model": nnx.state(model), "optimizer": nnx.state(opt)})
    work = Path(tempfile.mkdtemp(prefix=f"scaling{n}-", dir=args.workdir))
    mgr = CheckpointManager(work, max_to_keep=None, backend="ray", progress=False)
    ex = RayExecutor.get()
    saves, restores, nodes_used, writers = [], [], 0, 0
    try:
        path = None
        for i in range(args.repeats + 1):          # the first is the warm-up (actors start)
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            t0 = time.perf_counter()
            path = mgr.save(i, model, opt)
            dt = time.perf_counter() - t0
            if i:
                saves.append(dt)
        ck = Checkpoint(path)
        files = ck.manifest.files
        nodes_used = len({r.writer.get("node_id") for r in files.values()})
        writers = len({r.writer.get("writer") for r in files.values()})
        for i in range(args.repeats + 1):
            warm_cache(path)
            t0 = time.perf_counter()
            ck = Checkpoint(path)
            out = {k: ck.restore(k, t, progress=False, executor=ex)[0] for k, t in targets.items()}
            jax.block_until_ready(out)
            dt = time.perf_counter() - t0
            del out
            gc.collect()
            if i:
                restores.append(dt)
    finally:
        mgr.close()
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
        cluster.shutdown()
    print("SCALING_JSON " + json.dumps({
        "nodes": n, "alive_nodes": n, "state_bytes": nbytes, "writers": writers, "nodes_with_shards": nodes_used,
        "files": len(files), "save_s": saves, "restore_hot_s": restores,
        "save_median_s": statistics.median(saves), "restore_median_s": statistics.median(restores),
        "cluster_start_s": t_cluster}))


def run_scaling(args, console) -> dict:
    cfg = config_for(args.scaling_params, "100m")
    out = {"config": cfg.to_dict(), "runs": []}
    for n in args.scaling_nodes:
        cmd = [sys.executable, "-m", "benchmarks.ckbench", "--child-role", "scaling", "--nodes", str(n),
               "--config-json", json.dumps(cfg.to_dict()), "--repeats", str(args.repeats),
               "--workdir", str(args.workdir or tempfile.gettempdir()),
               "--object-store-mb", str(args.object_store_mb)]
        console.print(f"scaling: {n} simulated node(s) ... (load {load_avg()})")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO, check=False)
        line = [l for l in r.stdout.splitlines() if l.startswith("SCALING_JSON ")]
        if r.returncode or not line:
            console.print(f"[red]scaling child with {n} nodes failed[/red]:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            continue
        d = json.loads(line[-1][len("SCALING_JSON "):])
        d["wall_s"] = time.perf_counter() - t0
        d["load_avg"] = load_avg()
        out["runs"].append(d)
        console.print(f"  {n} node(s): save {d['save_median_s']:.2f} s "
                      f"({d['state_bytes'] / d['save_median_s'] / GB:.2f} GB/s), restore (hot) "
                      f"{d['restore_median_s']:.2f} s, {d['writers']} writers on {d['nodes_with_shards']} nodes, "
                      f"{d['files']} files")
    return out

