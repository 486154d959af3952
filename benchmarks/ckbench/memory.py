"""Host memory, each measurement in a fresh subprocess (so nothing freed earlier in the run
is reused by the allocator and hides new allocations):

* restore: imports, the system's set-up and the abstract target first, then one restore;
  peak = ``ru_maxrss`` (VmHWM reset via ``/proc/self/clear_refs`` as a cross-check) minus
  the RSS before the restore.
* save: the state is built, the system set up, then one durable ``save``; extra host
  memory = VmHWM during the save (reset right before it) minus the RSS before it, as a
  multiple of the state's bytes. A thread sampling RSS every 2 ms is the fallback where
  VmHWM cannot be reset.

Systems with ``measure_memory = False`` (limits; Ray, whose bytes live in other processes)
are skipped.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import GB, REPO, warm_cache
from .states import State, tree_nbytes
from .systems import REGISTRY, Context, load_all

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _reset_hwm() -> bool:
    try:   # reset VmHWM to the current RSS (a cross-check that import-time peaks cannot mask)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vmhwm() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


class _Sampler:
    def __init__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _rss())


def child(args) -> None:
    """``--child-role memory``: one measurement; prints ``MEM_JSON {...}``."""
    import jax
    load_all()
    spec = json.loads(args.state_json)
    workdir = Path(tempfile.mkdtemp(prefix="ckbench-mem-", dir=args.workdir))
    if args.mem_mode == "restore":
        state = State.abstract("child", spec)
    else:
        state = State.build("child", spec)
    system = REGISTRY[args.system](Context(state, workdir, args))
    system.setup()
    gc.collect()
    base_rss = _rss()
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_hwm()
    sampler = _Sampler()
    t0 = time.perf_counter()
    if args.mem_mode == "restore":
        system.prepare("restore")
        out = system.restore(Path(args.path), state.targets)
        jax.block_until_ready(out)
        nbytes = tree_nbytes(out)
    else:
        system.prepare("save")
        system.save(state, workdir / "mem_save")
        nbytes = state.nbytes
    dt = time.perf_counter() - t0
    sampled = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm = _vmhwm()
    d = {"system": args.system, "mode": args.mem_mode, "base_rss": base_rss, "base_maxrss": base_max,
         "peak_maxrss": peak, "vmhwm": hwm, "peak_reset": reset, "sampled_peak": sampled,
         "delta_maxrss": peak - base_rss, "delta_vmhwm": (hwm - base_rss) if hwm else None,
         "delta_sampled": sampled - base_rss, "import_peak_masks": base_max >= peak,
         "bytes": nbytes, "time": dt}
    if args.mem_mode == "restore":
        d["delta"] = d["delta_maxrss"]          # as before the split: ru_maxrss above the base
    else:                                        # the state itself is part of ru_maxrss: use VmHWM
        d["delta"] = d["delta_vmhwm"] if reset and hwm else d["delta_sampled"]
    system.teardown()
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)
    print("MEM_JSON " + json.dumps(d))


def _spawn(args, mode: str, system: str, spec: dict, path: Path | None, console) -> dict | None:
    # Through a small shell that forks the child: Linux carries the exec'ing process's peak
    # RSS into ru_maxrss, so a child forked (or vforked) straight from this big process
    # would start with this process's peak.
    cmd = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-m", "benchmarks.ckbench",
           "--child-role", "memory", "--mem-mode", mode, "--system", system, "--state-json", json.dumps(spec),
           "--path", str(path or ""), "--workdir", str(args.workdir or tempfile.gettempdir())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env, check=False)
    line = [x for x in r.stdout.splitlines() if x.startswith("MEM_JSON ")]
    if r.returncode or not line:
        console.print(f"[red]memory child ({mode}) for {system} failed[/red]: {r.stderr[-2000:]}")
        return None
    return json.loads(line[-1][len("MEM_JSON "):])


def run_memory(args, run, console) -> dict:
    """``{"restore": {system: ...}, "save": {system: ...}}`` for the systems of ``run``."""
    nbytes = run.state.nbytes
    out = {"restore": {}, "save": {}}
    op_systems = {}
    for op in run.ops:
        if op.system.measure_memory:
            op_systems.setdefault(op.system.name, set()).add(op.action)
    for name, actions in op_systems.items():
        if "restore" in actions and name in run.sources:
            path = run.sources[name]
            warm_cache(path)
            d = _spawn(args, "restore", name, run.state.spec, path, console)
            if d:
                d["multiple_of_state"] = d["delta"] / nbytes
                d["multiple_of_state_vmhwm"] = d["delta_vmhwm"] / nbytes if d.get("delta_vmhwm") else None
                out["restore"][name] = d
                console.print(f"  peak RSS of {name} restore: +{d['delta'] / GB:.3f} GB = "
                              f"{d['multiple_of_state']:.2f}x state (VmHWM: {d['multiple_of_state_vmhwm'] or 0:.2f}x; "
                              f"{d['time']:.2f} s in a fresh process)"
                              + (" [import-time peak masks it]" if d["import_peak_masks"] else ""), highlight=False)
        if "save" in actions:
            d = _spawn(args, "save", name, run.state.spec, None, console)
            if d:
                d["multiple_of_state"] = d["delta"] / nbytes
                out["save"][name] = d
                console.print(f"  extra host memory of {name} save: +{d['delta'] / GB:.3f} GB = "
                              f"{d['multiple_of_state']:.2f}x state ({d['time']:.2f} s in a fresh process"
                              + ("" if d["peak_reset"] else "; sampled") + ")", highlight=False)
    return out
