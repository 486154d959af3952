"""Command line: parse options, run every state through the harness, report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BENCH_DIR, GB, REPO, load_avg

DESCRIPTION = """Checkpoint benchmark: shardckpt against Orbax (defaults and its best settings),
np.savez and the machine's limits, on one or more states (LMModel, many small arrays, a few
huge arrays; all with dense AdamW moments).

Everything is measured in ONE process per state, alternating between operations, after a
warm-up, median of --repeats, in two memory regimes (cold: --idle seconds of sleep before
each timed operation; warm: the operation run once untimed just before). Restores run with
the files in the page cache (hot) and out of it (cold). Peak host memory of each restore and
the extra host memory of each save are measured in fresh subprocesses. See
benchmarks/README.md (how to add a system) and docs/benchmarks.md (results).

Other modes: --scaling (the Ray backend on ray.cluster_utils.Cluster with 1, 2, 4 simulated
nodes), --index-bench (the committer's and loader's cost for a synthetic index), --s3 (saves
and restores to a loopback moto S3 server), --regression OLD_TREE (local save/restore of this
tree against an older one), --replica (replica-aware restore on a 2-node Cluster) and
--incremental (LoRA fine-tune saves: incremental vs full vs Orbax best vs the limit),
--memory-tier (the memory tier on 4 simulated nodes: saves, persistence, recovery).
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_checkpoint.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--states", default="lm,many_small,few_huge",
                   help="comma list of states: lm, many_small, few_huge (default: all three)")
    p.add_argument("--preset", default="100m", help="ModelConfig preset of the lm state (default 100m: ~1.31 GB with AdamW)")
    p.add_argument("--size-params", type=float, default=None,
                   help="an LMModel of about this many parameters instead of the preset (state = ~12 bytes/param)")
    p.add_argument("--state-bytes", type=float, default=None,
                   help="bytes of the many_small/few_huge states (default: the lm state's)")
    p.add_argument("--small-arrays", type=int, default=None,
                   help="arrays in the many_small state, Adam moments included (default 5000)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per operation and regime (default 3; 1 with --quick/--smoke)")
    p.add_argument("--regimes", default="cold,warm", help="comma list of cold,warm")
    p.add_argument("--idle", type=float, default=None,
                   help="idle seconds before each timed op in the cold regime (default 10; 2 with --quick, 0.2 with --smoke)")
    p.add_argument("--systems", default=None, help="comma list of systems (default: every registered default system; see --list)")
    p.add_argument("--only", default=None, help="comma list of operation names (see --list)")
    p.add_argument("--list", action="store_true", help="list systems and operation names and exit")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    p.add_argument("--no-rss", action="store_true", help="skip the host-memory subprocesses (restore peak RSS, save extra memory)")
    p.add_argument("--op-timeout", type=float, default=300.0,
                   help="end the run (keeping partial results) if one measurement takes longer")
    p.add_argument("--scaling", action="store_true", help="run only the Ray Cluster scaling benchmark (1, 2, 4 nodes)")
    p.add_argument("--scaling-nodes", default="1,2,4")
    p.add_argument("--scaling-params", type=float, default=25e6, help="parameters of the scaling state (25e6 = ~300 MB)")
    p.add_argument("--object-store-mb", type=int, default=1024, help="object store per simulated node (scaling)")
    p.add_argument("--index-bench", default=None,
                   help="run only the synthetic index benchmark: comma list of TOTALxPER_ARRAY chunk counts, e.g. 1e5x512,1e6x512")
    p.add_argument("--s3", action="store_true",
                   help="run only the S3 benchmark: saves/restores to a loopback moto server, threads and Ray "
                        "(1, 2, 4 writers)")
    p.add_argument("--s3-systems", default="threads,ray1,ray2,ray4", help="comma list of threads, rayN (--s3)")
    p.add_argument("--s3-small-params", type=float, default=None,
                   help="also run an LMModel of about this many parameters after the preset (--s3)")
    p.add_argument("--s3-budget", type=float, default=600.0,
                   help="stop adding repeats once this many seconds were spent per state (--s3)")
    p.add_argument("--moto-key-buffer", type=int, default=2 << 30,
                   help="bytes of an object moto keeps in memory before spooling it to a temp file (--s3)")
    p.add_argument("--regression", default=None, metavar="OLD_TREE",
                   help="run only the local no-regression benchmark: this tree against the source tree OLD_TREE "
                        "(e.g. a git worktree of the last release), one subprocess per sample, alternating")
    p.add_argument("--replica", action="store_true",
                   help="run only the replica-aware restore benchmark (2-node Cluster, NodeSharedReader vs threads)")
    p.add_argument("--replica-arrays", type=int, default=64, help="1024x1024 float32 arrays of the replicated state")
    p.add_argument("--replica-workers", default="1,2,4", help="workers per node (--replica)")
    p.add_argument("--replica-modes", default="shared,threads", help="shared (NodeSharedReader), threads (--replica)")
    p.add_argument("--incremental", action="store_true",
                   help="incremental saves: a LoRA fine-tune of --preset, incremental vs full vs Orbax best vs the limit")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (--incremental)")
    p.add_argument("--memory-tier", action="store_true",
                   help="the memory tier on 4 simulated nodes: saves, persistence, recovery after a node loss "
                        "vs the local directory and loopback S3")
    p.add_argument("--memory-tier-gb", type=float, default=1.31, help="state size of --memory-tier, GB")
    p.add_argument("--out", default=str(BENCH_DIR / "results"), help="directory for JSON and PNG")
    p.add_argument("--tag", default=None, help="result file name stem (default: bench, bench_quick, bench_smoke, scaling, index_bench)")
    p.add_argument("--workdir", default=None, help="scratch directory for checkpoints (default: a new dir in $TMPDIR)")
    p.add_argument("--quick", action="store_true", help="~50 MB states (1 repeat, 2 s idle)")
    p.add_argument("--smoke", action="store_true",
                   help="proves every system runs: ~4 MB states, 300 small arrays, 1 repeat, 0.2 s idle, "
                        "host memory on the first state only")
    # internal: subprocess modes
    p.add_argument("--child-role", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.size_params = a.size_params or 4e6 / 12
        a.small_arrays = a.small_arrays or 300
        a.repeats = a.repeats or 1
        a.idle = 0.2 if a.idle is None else a.idle
    if a.quick:
        a.size_params = a.size_params or 50e6 / 12
        a.repeats = a.repeats or 1
        a.idle = 2.0 if a.idle is None else a.idle
    a.repeats = a.repeats or 3
    a.idle = 10.0 if a.idle is None else a.idle
    a.small_arrays = a.small_arrays or 5000
    a.size_params = int(a.size_params) if a.size_params else None
    a.state_bytes = int(a.state_bytes) if a.state_bytes else None
    a.scaling_params = int(a.scaling_params)
    a.regimes = [r for r in a.regimes.split(",") if r]
    for r in a.regimes:
        if r not in ("cold", "warm"):
            p.error(f"--regimes: unknown regime {r!r}")
    a.states = [s for s in a.states.split(",") if s]
    a.scaling_nodes = [int(x) for x in a.scaling_nodes.split(",")]
    a.index_bench = a.index_bench.split(",") if a.index_bench else None
    a.replica_workers = [int(x) for x in a.replica_workers.split(",")]
    a.replica_modes = [m for m in a.replica_modes.split(",") if m]
    return a


def environment() -> dict:
    import flax
    import jax
    import numpy as np
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
           "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB}
    for mod in ("orbax.checkpoint", "ray", "tensorstore"):
        try:
            m = __import__(mod, fromlist=["_"])
            env[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:
        env["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, check=False).stdout.strip()
        env["git_dirty"] = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "shardckpt"],
                                               capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        pass
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_role == "memory":
        from .memory import child
        child(args)
        return 0
    if args.child_role == "scaling":
        from .scaling import scaling_child
        scaling_child(args)
        return 0
    if args.child_role == "regression":
        from .s3_bench import regression_child
        regression_child(args)
        return 0
    if args.child_role == "replica":
        from .s3_bench import replica_child
        replica_child(args)
        return 0

    from rich.console import Console

    from .systems import REGISTRY, load_all
    console = Console(width=240)
    load_all()
    out_dir = Path(args.out)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    from .harness import list_ops, select_systems
    classes = select_systems(args)
    if args.list:
        console.print("systems (name, family, label):")
        for c in REGISTRY.values():
            console.print(f"  {c.name:24s} {c.family:10s} {c.label}" + ("" if c.default else "  (not by default)"))
        console.print("operations:")
        print("\n".join(f"  {n:36s} {label}" for n, label in list_ops(classes)))
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"started": started, "argv": sys.argv[1:], "load_avg_start": load_avg(), "environment": environment()}

    for mode, stem in (("index_bench", "index_bench"), ("incremental", "incremental"), ("memory_tier", "memory_tier"),
                       ("scaling", "scaling")):
        if getattr(args, mode):              # one JSON of one function's results
            if mode == "index_bench":
                from .index_bench import index_bench as run
            elif mode == "incremental":
                from .incremental_bench import run_incremental as run
            elif mode == "memory_tier":
                from .memory_tier_bench import run_memory_tier as run
            else:
                from .scaling import run_scaling as run
            if mode != "scaling":
                console.print(f"{stem} benchmark (load {load_avg()})")
            res = run(args, console)
            meta["load_avg_end"] = load_avg()
            path = out_dir / f"{args.tag or stem}.json"
            path.write_text(json.dumps({**meta, **res}, indent=1))
            console.print(f"wrote {path}")
            return 0

    for mode, stem, fn in (("s3", "s3", "run_s3"), ("regression", "regression", "run_regression"),
                           ("replica", "replica_restore", "run_replica")):
        if getattr(args, mode):
            from . import s3_bench
            if args.smoke:
                stem += "_smoke"
            elif args.quick:
                stem += "_quick"
            console.print(f"{mode} benchmark (load {load_avg()})")
            res = getattr(s3_bench, fn)(args, console)
            meta["load_avg_end"] = load_avg()
            meta.update({"repeats": args.repeats, "idle_s": args.idle})
            s3_bench.write_json(out_dir, args.tag or stem, {**meta, **res}, console)
            return 0

    return run_states(args, classes, console, out_dir, meta)


def run_states(args, classes, console, out_dir: Path, meta: dict) -> int:
    from .harness import StateRun
    from .memory import run_memory
    from .raysupport import RayGuard
    from .report import plot, print_table, summarize, targets_check
    from .states import State, make_specs

    stem = args.tag or ("bench_smoke" if args.smoke else "bench_quick" if args.quick else "bench")
    partial = out_dir / f"{stem}.partial.json"
    specs = make_specs(args.states, args)
    guard = RayGuard() if any(c.needs_ray for c in classes) else None
    console.print(f"systems: {', '.join(c.name for c in classes)}")
    per_state = {}
    try:
        for i, (name, spec) in enumerate(specs.items()):
            t0 = time.perf_counter()
            state = State.build(name, spec)
            workdir = Path(tempfile.mkdtemp(prefix=f"shardckpt-bench-{name}-", dir=args.workdir))
            console.rule(f"state {state.describe()}")
            console.print(f"built in {time.perf_counter() - t0:.1f} s; workdir {workdir}; load {load_avg()}")
            run = StateRun(args, state, classes, workdir, console, guard, partial, meta)
            memory = {"restore": {}, "save": {}}
            try:
                run.run()
                if args.smoke and i and not args.no_rss:
                    console.print("host memory: measured on the first state only with --smoke")
                elif not args.no_rss:
                    console.print("host memory of each save and restore (fresh subprocesses) ...")
                    memory = run_memory(args, run, console)
            finally:
                run.teardown()
                shutil.rmtree(workdir, ignore_errors=True)
            rows = summarize(run.results, run.ops, state.nbytes, args.regimes, memory)
            tchecks = targets_check(rows, memory, args.regimes)
            print_table(console, f"{state.describe()}", rows, args.regimes, memory, tchecks)
            ppath = out_dir / f"{stem}_{name}.png"
            plot(rows, args.regimes, state.nbytes, ppath,
                 f"{state.describe()}, median of {args.repeats}, {os.cpu_count()} CPUs, load {load_avg()}")
            per_state[name] = {
                "spec": spec, "state_bytes": state.nbytes, "arrays": state.n_arrays, "params": state.params,
                "rows": rows, "memory": memory, "rss": memory.get("restore", {}), "targets": tchecks,
                "raw": run.results, "bytes_on_disk": run.sizes, "restore_checks": run.checks,
                "errors": run.errors, "load_avg_per_repeat": run.load_samples,
                "bench_seconds": run.bench_seconds, "plot": ppath.name}
            del state, run
    finally:
        if guard is not None:
            guard.shutdown()
    meta.update({"load_avg_end": load_avg(), "repeats": args.repeats, "regimes": args.regimes, "idle_s": args.idle,
                 "systems": [c.name for c in classes], "ray_restarts": guard.restarts if guard else []})
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps({**meta, "states": per_state}, indent=1))
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    console.print(f"wrote {jpath} and {', '.join(d['plot'] for d in per_state.values())}")
    return 0
