"""Three measurements beside the main comparison (issue #10's S3 benchmark, #13.2):

* ``--s3``: durable saves and restores of the state to a loopback moto S3 server (moto's
  standalone server, a Python process holding the objects in memory) with the threads
  backend and the Ray backend with 1, 2 and 4 writer actors; GB/s, the server's CPU share,
  the object-store request counters (``shardckpt.store.s3.STATS``) of every process
  that talked to the server, and the driver's peak extra memory.
* ``--regression OLD_TREE``: local durable save and restore (threads backend) of this tree
  against an older source tree (e.g. a ``git worktree`` of the last release), each sample in
  a fresh subprocess with ``PYTHONPATH`` pointing at one tree, alternating between the two.
* ``--replica``: N = 1, 2, 4 workers per node of a 2-node ``ray.cluster_utils.Cluster``
  restoring the same replicated checkpoint through ``NodeSharedReader`` (one read per node)
  against the plain thread executor (every worker reads the files itself).

Internal shardckpt names used (they may move in a refactor): ``shardckpt.store.s3.STATS``,
``shardckpt.store.base.read_stats``, ``shardckpt.executors.ray.RayExecutor``
(``get``, ``actors()``, ``peak_inflight_bytes``), ``shardckpt.coord.ray_actor``
(``coordinator_name``, ``NAMESPACE``), ``shardckpt.executors.node_share``
(``NodeSharedReader``, ``NAMESPACE``, the cache actors' ``stats()``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import GB, REPO, drop_cache, load_avg, rmtree, warm_cache

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def proc_status(pid: str = "self") -> dict[str, int]:
    """RssAnon, RssShmem, RssFile, VmRSS of a process in bytes (from /proc/PID/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssShmem", "RssFile", "VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


class RssSampler:
    """Samples RssAnon and RssShmem of this process every ``period`` seconds; ``peak_delta``
    is the largest increase over the values at start."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.base = proc_status()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = proc_status()
            for k in ("RssAnon", "RssShmem", "VmRSS"):
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join()
        end = proc_status()
        return {f"{k}_peak_delta": self.peak[k] - self.base[k] for k in ("RssAnon", "RssShmem", "VmRSS")} | \
               {f"{k}_end_delta": end[k] - self.base[k] for k in ("RssAnon", "RssShmem", "VmRSS")}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def write_json(out_dir: Path, stem: str, data: dict, console) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    console.print(f"wrote {path}")
    return path


# --------------------------------------------------------------------------------------------
# 1. S3 throughput (loopback moto server)
# --------------------------------------------------------------------------------------------

def _stats_in_actor(handle) -> dict:
    """``shardckpt.store.s3.STATS`` of the process behind an actor."""
    import ray

    def read(_self):
        from shardckpt.store.s3 import STATS
        return dict(STATS)

    return ray.get(handle.__ray_call__.remote(read), timeout=60)


def _s3_counters(store, writer_handles) -> dict:
    """Sum of STATS over the driver, the writer actors and the store's coordinator actor."""
    import ray

    from shardckpt.store.s3 import STATS
    total = dict(STATS)
    handles = list(writer_handles)
    try:
        from shardckpt.coord.ray_actor import NAMESPACE, coordinator_name
        handles.append(ray.get_actor(coordinator_name(store), namespace=NAMESPACE))
    except Exception:  # noqa: BLE001 - no coordinator (threads backend before any Ray save)
        pass
    for h in handles:
        try:
            for k, v in _stats_in_actor(h).items():
                total[k] = total.get(k, 0) + v
        except Exception:  # noqa: BLE001
            total["unreadable_actors"] = total.get("unreadable_actors", 0) + 1
    return total


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


class CpuWatch:
    """CPU seconds of a process (and its children) and of the whole machine over a span."""

    def __init__(self, pid: int):
        import psutil
        self.p = psutil.Process(pid)
        self.t0 = time.perf_counter()
        self.c0 = self._cpu()
        self.m0 = psutil.cpu_times()

    def _cpu(self) -> float:
        t = self.p.cpu_times()
        return t.user + t.system

    def stop(self) -> dict:
        import psutil
        wall = time.perf_counter() - self.t0
        m1 = psutil.cpu_times()
        busy = sum(getattr(m1, f) - getattr(self.m0, f) for f in ("user", "system", "nice", "irq", "softirq"))
        idle = (m1.idle - self.m0.idle) + (m1.iowait - self.m0.iowait)
        server = self._cpu() - self.c0
        return {"server_cpu_s": server, "server_cores": server / wall if wall else None,
                "machine_busy_frac": busy / (busy + idle) if busy + idle else None,
                "server_rss": self.p.memory_info().rss}


def _object_sizes(client, bucket: str, prefix: str) -> list[int]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Size"] for o in page.get("Contents", [])]
    return out


def _delete_prefix(client, bucket: str, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    for up in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


def run_s3(args, console) -> dict:
    import gc

    import jax
    import ray

    from tests.scenarios.s3server import CREDENTIALS, MotoServer

    from .states import State, make_specs

    os.environ.update(CREDENTIALS)
    # moto spools an object's bytes to a temp file beyond this size (default 5 MiB); keep the
    # objects in the server's memory so the server's disk is not what is measured
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(args.moto_key_buffer))
    import shardckpt
    from shardckpt.executors.ray import RayExecutor
    from shardckpt.store.registry import resolve
    from shardckpt.testing import save_items

    systems = [s for s in args.s3_systems.split(",") if s]
    logdir = tempfile.mkdtemp(prefix="shardckpt-s3bench-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    result: dict = {"label": "loopback moto server (Python; in-memory)", "systems": systems,
                    "moto_key_buffer_bytes": int(os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"]),
                    "states": {}}
    server = MotoServer(logdir)
    try:
        server.create_bucket("ckpts")
        client = server.client()
        counter = [0]

        def uri_for() -> str:
            counter[0] += 1
            return f"s3://ckpts/bench/step_{counter[0]}?endpoint_url={server.endpoint}"

        def executor_for(system: str):
            return None if system == "threads" else RayExecutor.get(int(system.removeprefix("ray")))

        def save(system: str, items, uri: str):
            if system == "threads":
                return save_items(uri, items, backend="threads")
            return save_items(uri, items, backend="ray", num_writers=int(system.removeprefix("ray")))

        def restore(system: str, uri: str, targets):
            ck = shardckpt.Checkpoint(uri)
            ex = executor_for(system)
            out = {}
            for item, target in targets.items():
                kw = {} if ex is None else {"executor": ex}
                out[item], rep = ck.restore(item, target, **kw)
                assert rep.complete, rep
            jax.block_until_ready(out)
            return out

        def one(system: str, state, repeat: int, check: bool) -> dict:
            uri = uri_for()
            store, name = resolve(uri)
            ex = executor_for(system)
            writers = [h for h, _, _ in ex.actors()] if ex is not None else []
            gc.collect()
            before = _s3_counters(store, writers)
            cpu = CpuWatch(server.proc.pid)
            rss = RssSampler()
            t0 = time.perf_counter()
            save(system, state.items, uri)
            save_s = time.perf_counter() - t0
            mem = rss.stop()
            save_cpu = cpu.stop()
            after = _s3_counters(store, writers)
            puts = _delta(after, before)
            rec = {"system": system, "repeat": repeat, "save_s": save_s, "save_gbps": state.nbytes / save_s / GB,
                   "save_counters": puts, "save_driver_mem": mem, "save_cpu": save_cpu,
                   "peak_inflight_bytes": ex.peak_inflight_bytes if ex is not None else None,
                   "load_avg": load_avg()}
            gc.collect()
            cpu = CpuWatch(server.proc.pid)
            rss = RssSampler()
            t0 = time.perf_counter()
            out = restore(system, uri, state.targets)
            rec["restore_s"] = time.perf_counter() - t0
            rec["restore_driver_mem"] = rss.stop()
            rec["restore_cpu"] = cpu.stop()
            rec["restore_gbps"] = state.nbytes / rec["restore_s"] / GB
            rec["restore_counters"] = _delta(_s3_counters(store, writers), after)
            if check:
                rec["bit_exact"] = _equal(out, state.items)
            del out
            sizes = _object_sizes(client, "ckpts", f"bench/step_{counter[0]}/")
            big = sorted(sizes, reverse=True)
            rec["objects"] = {"count": len(sizes), "bytes": sum(sizes), "largest": big[:8],
                              "over_1mb": sum(1 for x in sizes if x > 1 << 20)}
            _delete_prefix(client, "ckpts", f"bench/step_{counter[0]}/")
            return rec

        specs = make_specs(["lm"], args)
        sizes = [("lm", specs["lm"])]
        if args.s3_small_params:
            small = type(args)(**{**vars(args), "size_params": int(args.s3_small_params)})
            sizes.append(("lm_small", make_specs(["lm"], small)["lm"]))
        warm_state = None
        for name, spec in sizes:
            t0 = time.perf_counter()
            state = State.build(name, spec)
            console.rule(f"S3 {state.describe()}")
            console.print(f"built in {time.perf_counter() - t0:.1f} s; load {load_avg()}; "
                          f"moto {server.endpoint} (pid {server.proc.pid})")
            # warm-up on a ~4 MB state: actors started, connections and code paths used once
            if warm_state is None:
                tiny = type(args)(**{**vars(args), "size_params": int(4e6 / 12)})
                warm_state = State.build("warmup", make_specs(["lm"], tiny)["lm"])
            for system in systems:
                t0 = time.perf_counter()
                ok = one(system, warm_state, -1, check=True)["bit_exact"]
                console.print(f"  warm-up {system}: {time.perf_counter() - t0:.1f} s, bit-exact {ok}")
            runs = []
            deadline = time.time() + args.s3_budget
            for r in range(args.repeats):
                order = systems if r % 2 == 0 else systems[::-1]
                for system in order:
                    rec = one(system, state, r, check=(r == 0))
                    runs.append(rec)
                    c = rec["save_counters"]
                    console.print(f"  r{r} {system:8s} save {rec['save_s']:6.2f} s {rec['save_gbps']:.3f} GB/s "
                                  f"(moto {rec['save_cpu']['server_cores']:.2f} cores) | restore {rec['restore_s']:6.2f} s "
                                  f"{rec['restore_gbps']:.3f} GB/s (moto {rec['restore_cpu']['server_cores']:.2f} cores) | "
                                  f"puts {c.get('puts')} {c.get('put_bytes', 0) / GB:.3f} GB retries {c.get('retries')} | "
                                  f"rss+ {rec['save_driver_mem']['RssAnon_peak_delta'] / 1e6:.0f}/"
                                  f"{rec['save_driver_mem']['RssShmem_peak_delta'] / 1e6:.0f} MB | load {rec['load_avg']}")
                if time.time() > deadline:
                    console.print(f"  budget of {args.s3_budget} s spent after {r + 1} repeats")
                    break
            summary = {}
            for system in systems:
                rs = [x for x in runs if x["system"] == system]
                summary[system] = {
                    "save_s": spread([x["save_s"] for x in rs]),
                    "save_gbps": spread([x["save_gbps"] for x in rs]),
                    "restore_s": spread([x["restore_s"] for x in rs]),
                    "restore_gbps": spread([x["restore_gbps"] for x in rs]),
                    "save_server_cores": spread([x["save_cpu"]["server_cores"] for x in rs]),
                    "restore_server_cores": spread([x["restore_cpu"]["server_cores"] for x in rs]),
                    "save_machine_busy": spread([x["save_cpu"]["machine_busy_frac"] for x in rs]),
                    "puts": spread([x["save_counters"].get("puts") for x in rs]),
                    "put_gb": spread([x["save_counters"].get("put_bytes", 0) / GB for x in rs]),
                    "retries": spread([x["save_counters"].get("retries") for x in rs]),
                    "restore_gets": spread([x["restore_counters"].get("gets") for x in rs]),
                    "restore_get_gb": spread([x["restore_counters"].get("get_bytes", 0) / GB for x in rs]),
                    "peak_inflight_mb": spread([(x["peak_inflight_bytes"] or 0) / 1e6 for x in rs]),
                    "save_rss_anon_peak_mb": spread([x["save_driver_mem"]["RssAnon_peak_delta"] / 1e6 for x in rs]),
                    "save_rss_shmem_peak_mb": spread([x["save_driver_mem"]["RssShmem_peak_delta"] / 1e6 for x in rs]),
                    "restore_rss_anon_peak_mb": spread([x["restore_driver_mem"]["RssAnon_peak_delta"] / 1e6
                                                        for x in rs]),
                    "restore_rss_shmem_peak_mb": spread([x["restore_driver_mem"]["RssShmem_peak_delta"] / 1e6
                                                         for x in rs]),
                    "bit_exact": all(x.get("bit_exact", True) for x in rs),
                    "shard_objects": spread([x.get("objects", {}).get("over_1mb") for x in rs]),
                    "largest_object_mb": spread([(x.get("objects", {}).get("largest") or [0])[0] / 1e6 for x in rs]),
                }
            result["states"][name] = {"describe": state.describe(), "spec": spec, "state_bytes": state.nbytes,
                                      "runs": runs, "summary": summary}
            _print_s3(console, state, summary)
            del state
            gc.collect()
    finally:
        server.close()
        ray.shutdown()
    return result


def _equal(out: dict, items: dict) -> bool:
    import jax
    import numpy as np
    a, b = jax.tree.leaves(out), jax.tree.leaves(items)
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)
                                    if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype,
                                                                                         jax.dtypes.prng_key))


def _print_s3(console, state, summary) -> None:
    from rich.table import Table
    t = Table(title=f"S3 (loopback moto server; Python; in-memory): {state.describe()}")
    for c in ("system", "save s", "save GB/s", "moto cores", "restore s", "restore GB/s", "moto cores",
              "puts", "put GB", "retries", "inflight MB", "anon+ MB", "shmem+ MB"):
        t.add_column(c)
    for s, d in summary.items():
        f = lambda k, p=2: "" if d[k]["median"] is None else f"{d[k]['median']:.{p}f}"  # noqa: E731
        t.add_row(s, f"{f('save_s')} ({d['save_s']['min']:.2f}-{d['save_s']['max']:.2f})", f("save_gbps", 3),
                  f("save_server_cores"), f"{f('restore_s')} ({d['restore_s']['min']:.2f}-{d['restore_s']['max']:.2f})",
                  f("restore_gbps", 3), f("restore_server_cores"), f("puts", 0), f("put_gb", 3), f("retries", 0),
                  f("peak_inflight_mb", 0), f("save_rss_anon_peak_mb", 0), f("save_rss_shmem_peak_mb", 0))
    console.print(t)


# --------------------------------------------------------------------------------------------
# 2. local no-regression: this tree against an old one, subprocess per sample
# --------------------------------------------------------------------------------------------

CHILD_OPS = ("save", "restore_hot", "restore_cold")


def regression_child(args) -> None:
    """One sample of every operation in both regimes with the shardckpt on PYTHONPATH.
    Prints ``RESULT {json}``."""
    import gc
    tree = os.environ["SHARDCKPT_TREE"]
    # `-m benchmarks.ckbench` put this repo first on sys.path: the tree under test goes before it
    assert "shardckpt" not in sys.modules
    sys.path.insert(0, tree)
    import shardckpt
    assert os.path.realpath(shardckpt.__file__).startswith(os.path.realpath(tree)), (shardckpt.__file__, tree)
    import jax

    from shardckpt import Checkpoint, save  # public names: the same in every tree compared

    from .states import State
    spec = json.loads(args.state_json)
    t0 = time.perf_counter()
    state = State.build("lm", spec)
    built = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="shardckpt-regr-", dir=args.workdir))
    seq = [0]

    def do_save() -> Path:
        seq[0] += 1
        p = work / f"step_{seq[0]}"
        save(p, items=state.items, backend="threads", progress=False)
        return p

    def do_restore(path: Path):
        ck = Checkpoint(path)
        out = {item: ck.restore(item, target)[0] for item, target in state.targets.items()}
        jax.block_until_ready(out)
        return out

    res: dict = {"tree": tree, "shardckpt_file": shardckpt.__file__, "build_s": built, "load_avg": {},
                 "state_bytes": state.nbytes}
    source = do_save()
    res["files"] = len([p for p in source.rglob("*") if p.is_file()])
    for regime in args.regimes:
        res["load_avg"][regime] = load_avg()
        for op in CHILD_OPS:
            def run():
                if op == "save":
                    t = time.perf_counter()
                    p = do_save()
                    took = time.perf_counter() - t
                    rmtree(p)
                    return took
                (warm_cache if op == "restore_hot" else drop_cache)(source)
                t = time.perf_counter()
                out = do_restore(source)
                took = time.perf_counter() - t
                del out
                return took
            if regime == "warm":
                run()
            else:
                gc.collect()
                time.sleep(args.idle)
            res[f"{op}_{regime}"] = run()
    rmtree(work)
    print("RESULT " + json.dumps(res), flush=True)


def run_regression(args, console) -> dict:
    from .states import make_specs
    old = os.path.realpath(args.regression)
    new = os.path.realpath(REPO)
    spec = make_specs(["lm"], args)["lm"]
    trees = {"old": old, "new": new}
    samples: dict[str, list[dict]] = {"old": [], "new": []}
    errors = []
    console.rule(f"local no-regression: old {old} vs new {new}")
    for r in range(args.repeats):
        for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = {**os.environ, "PYTHONPATH": trees[which], "SHARDCKPT_TREE": trees[which]}
            cmd = [sys.executable, "-m", "benchmarks.ckbench", "--child-role", "regression",
                   "--state-json", json.dumps(spec), "--idle", str(args.idle), "--regimes", ",".join(args.regimes)]
            if args.workdir:
                cmd += ["--workdir", args.workdir]
            t0 = time.perf_counter()
            # cwd = this repo so `-m benchmarks.ckbench` is found; shardckpt comes from PYTHONPATH
            p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=args.op_timeout)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or line is None:
                errors.append({"which": which, "repeat": r, "rc": p.returncode, "stderr": p.stderr[-3000:]})
                console.print(f"  r{r} {which}: FAILED rc={p.returncode}\n{p.stderr[-2000:]}")
                continue
            rec = json.loads(line[7:]) | {"repeat": r, "child_s": time.perf_counter() - t0}
            samples[which].append(rec)
            console.print(f"  r{r} {which}: " + ", ".join(f"{op}_{g} {rec[f'{op}_{g}']:.2f}"
                                                         for g in args.regimes for op in CHILD_OPS)
                          + f" | files {rec['files']} | load {rec['load_avg']}")
    rows = {}
    for g in args.regimes:
        for op in CHILD_OPS:
            k = f"{op}_{g}"
            o = [s[k] for s in samples["old"]]
            n = [s[k] for s in samples["new"]]
            if not o or not n:
                continue
            mo, mn = med(o), med(n)
            # ratio new/old (> 1: the new code is slower); interval from the extremes
            lo, hi = min(n) / max(o), max(n) / min(o)
            rows[k] = {"old": spread(o), "new": spread(n), "ratio_new_over_old": mn / mo,
                       "ratio_interval": [lo, hi], "within_noise": lo <= 1 <= hi,
                       "old_gbps": spec_bytes(samples) / mo / GB, "new_gbps": spec_bytes(samples) / mn / GB}
    from rich.table import Table
    t = Table(title="local durable save/restore, threads backend: new / old (median, [min..max])")
    for c in ("op", "old s", "new s", "new/old", "interval", "within noise"):
        t.add_column(c)
    for k, d in rows.items():
        t.add_row(k, f"{d['old']['median']:.2f} [{d['old']['min']:.2f}..{d['old']['max']:.2f}]",
                  f"{d['new']['median']:.2f} [{d['new']['min']:.2f}..{d['new']['max']:.2f}]",
                  f"{d['ratio_new_over_old']:.3f}", f"{d['ratio_interval'][0]:.2f}..{d['ratio_interval'][1]:.2f}",
                  str(d["within_noise"]))
    console.print(t)
    return {"old_tree": old, "new_tree": new, "spec": spec, "state_bytes": spec_bytes(samples), "idle_s": args.idle,
            "regimes": args.regimes, "rows": rows, "samples": samples, "errors": errors}


def spec_bytes(samples) -> int:
    for s in samples["new"] + samples["old"]:
        if "state_bytes" in s:
            return s["state_bytes"]
    return 1_310_000_000


# --------------------------------------------------------------------------------------------
# 3. replica-aware restore on a 2-node simulated cluster
# --------------------------------------------------------------------------------------------

class _Worker:
    """A data-parallel worker (Ray actor body, pickled by value)."""

    def warm(self) -> str:
        import ray

        import shardckpt  # noqa: F401
        from shardckpt.executors.node_share import NodeSharedReader  # noqa: F401
        from shardckpt.executors.threads import ThreadExecutor  # noqa: F401
        return ray.get_runtime_context().get_node_id()

    def restore(self, path: str, arrays: int, rows: int, cols: int, mode: str, sums: list) -> dict:
        import numpy as np
        import ray

        from shardckpt import Checkpoint
        from shardckpt.executors.node_share import NodeSharedReader
        from shardckpt.executors.threads import ThreadExecutor
        from shardckpt.store.base import read_stats
        before = read_stats()["bytes"]
        target = {f"w{i}": np.zeros((rows, cols), np.float32) for i in range(arrays)}
        ex = NodeSharedReader() if mode == "shared" else ThreadExecutor()
        t0 = time.time()
        out, report = Checkpoint(path).restore("state", target, executor=ex)
        took = time.time() - t0
        ok = report.complete and all(abs(float(np.asarray(out[f"w{i}"], np.float64).sum()) - s) < 1e-3 * max(1, abs(s))
                                     for i, s in enumerate(sums))
        return {"ok": bool(ok), "self_read": read_stats()["bytes"] - before, "s": took,
                "node": ray.get_runtime_context().get_node_id()}


def replica_child(args) -> None:
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shardckpt.executors.node_share import NAMESPACE
    from shardckpt.testing import save_items

    arrays, rows, cols = args.replica_arrays, 1024, 1024
    state_bytes = arrays * rows * cols * 4
    osm = int(args.object_store_mb) << 20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": osm})
    cluster.add_node(num_cpus=1, object_store_memory=osm)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    Worker = ray.remote(num_cpus=0)(_Worker)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    work = Path(tempfile.mkdtemp(prefix="shardckpt-replica-", dir=args.workdir))
    seq = [0]

    def new_checkpoint():
        seq[0] += 1
        rng = np.random.default_rng(seq[0])
        tree = {f"w{i}": rng.standard_normal((rows, cols)).astype(np.float32) for i in range(arrays)}
        sums = [float(tree[f"w{i}"].astype(np.float64).sum()) for i in range(arrays)]
        path = work / f"step_{seq[0]}"
        save_items(path, {"state": tree}, backend="threads", num_shards=4)
        warm_cache(path)        # every run reads from the page cache: the count of bytes is the point
        return path, sums

    def cache_bytes() -> dict:
        out = {}
        for n in nodes:
            try:
                c = ray.get_actor(f"shardckpt-chunk-cache-{n[:16]}", namespace=NAMESPACE)
                out[n] = ray.get(c.stats.remote())["bytes"]
            except ValueError:
                out[n] = 0
        return out

    # one pool of workers (max N per node), imports warmed once; a run uses the first N of each node
    pool = {n: [Worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                for _ in range(max(args.replica_workers))] for n in nodes}
    ray.get([w.warm.remote() for ws in pool.values() for w in ws])

    def run(per_node: int, mode: str, repeat: int) -> dict:
        path, sums = new_checkpoint()
        workers = [(w, n) for n in nodes for w in pool[n][:per_node]]
        ray.get([w.warm.remote() for w, _ in workers])
        before = cache_bytes()
        t0 = time.time()
        res = ray.get([w.restore.remote(str(path), arrays, rows, cols, mode, sums) for w, _ in workers])
        wall = time.time() - t0
        after = cache_bytes()
        per_node_read = []
        for n in nodes:
            self_read = sum(r["self_read"] for r in res if r["node"] == n)
            per_node_read.append(after[n] - before[n] + self_read)
        rmtree(path)
        return {"mode": mode, "workers_per_node": per_node, "repeat": repeat, "wall_s": wall,
                "node_read_bytes": per_node_read, "node_read_x_state": [b / state_bytes for b in per_node_read],
                "cache_read_bytes": [after[n] - before[n] for n in nodes],
                "worker_self_read": sum(r["self_read"] for r in res), "worker_s": [r["s"] for r in res],
                "all_ok": all(r["ok"] for r in res), "load_avg": load_avg()}

    runs = []
    # warm-up (not reported): worker imports, the cache actors, the code paths
    for mode in args.replica_modes:
        run(1, mode, -1)
    for r in range(args.repeats):
        for per_node in args.replica_workers:
            modes = args.replica_modes if (r + per_node) % 2 == 0 else args.replica_modes[::-1]
            for mode in modes:
                rec = run(per_node, mode, r)
                runs.append(rec)
                print(f"PROGRESS r{r} N={per_node} {mode:7s} wall {rec['wall_s']:.2f} s, node reads "
                      f"{[round(x, 2) for x in rec['node_read_x_state']]} x state, ok={rec['all_ok']}, "
                      f"load {rec['load_avg']}", flush=True)
    ray.shutdown()
    cluster.shutdown()
    rmtree(work)
    print("RESULT " + json.dumps({"state_bytes": state_bytes, "arrays": arrays, "nodes": len(nodes), "runs": runs}),
          flush=True)


def run_replica(args, console) -> dict:
    console.rule("replica-aware restore on a 2-node ray.cluster_utils.Cluster")
    cmd = [sys.executable, "-m", "benchmarks.ckbench", "--child-role", "replica", "--repeats", str(args.repeats),
           "--replica-arrays", str(args.replica_arrays), "--replica-workers", ",".join(map(str, args.replica_workers)),
           "--replica-modes", ",".join(args.replica_modes), "--object-store-mb", str(args.object_store_mb)]
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    for line in p.stdout:
        if line.startswith("PROGRESS "):
            console.print("  " + line[9:].rstrip())
        elif line.startswith("RESULT "):
            result = json.loads(line[7:])
    err = p.stderr.read()
    p.wait()
    if result is None:
        raise SystemExit(f"replica child failed (rc {p.returncode}):\n{err[-4000:]}")
    runs = result["runs"]
    summary = {}
    for mode in args.replica_modes:
        for n in args.replica_workers:
            rs = [x for x in runs if x["mode"] == mode and x["workers_per_node"] == n]
            summary[f"{mode}_N{n}"] = {
                "wall_s": spread([x["wall_s"] for x in rs]),
                "node_read_x_state": spread([max(x["node_read_x_state"]) for x in rs]),
                "node_read_bytes_max": spread([max(x["node_read_bytes"]) for x in rs]),
                "all_ok": all(x["all_ok"] for x in rs)}
        base = summary.get(f"{mode}_N1", {}).get("wall_s", {}).get("median")
        for n in args.replica_workers:
            s = summary[f"{mode}_N{n}"]
            s["wall_vs_N1"] = s["wall_s"]["median"] / base if base else None
    # per repeat ratio 4-vs-1 (same repeat), for the spread
    for mode in args.replica_modes:
        hi = max(args.replica_workers)
        lo = min(args.replica_workers)
        ratios = []
        for r in range(args.repeats):
            a = [x["wall_s"] for x in runs if x["mode"] == mode and x["repeat"] == r and x["workers_per_node"] == hi]
            b = [x["wall_s"] for x in runs if x["mode"] == mode and x["repeat"] == r and x["workers_per_node"] == lo]
            if a and b:
                ratios.append(a[0] / b[0])
        summary[f"{mode}_ratio_N{hi}_vs_N{lo}_per_repeat"] = spread(ratios)
    from rich.table import Table
    t = Table(title=f"replica restore, 2 nodes, {result['state_bytes'] / 1e6:.0f} MB replicated state")
    for c in ("mode", "workers/node", "wall s (min..max)", "x N=1", "bytes read per node (x state)", "ok"):
        t.add_column(c)
    for mode in args.replica_modes:
        for n in args.replica_workers:
            s = summary[f"{mode}_N{n}"]
            t.add_row(mode, str(n), f"{s['wall_s']['median']:.2f} ({s['wall_s']['min']:.2f}..{s['wall_s']['max']:.2f})",
                      f"{s['wall_vs_N1']:.2f}" if s["wall_vs_N1"] else "", f"{s['node_read_x_state']['median']:.2f}",
                      str(s["all_ok"]))
    console.print(t)
    return {**result, "summary": summary, "object_store_mb_per_node": args.object_store_mb}
