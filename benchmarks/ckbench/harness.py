"""The timing harness: systems -> operations, warm-up, bit-exact check, alternating timed
runs in both regimes, median.

Everything is measured in ONE process on the same state, alternating between operations
(the order rotates every repeat, and the regime order flips), after a warm-up (each
operation once, untimed), ``--repeats`` samples per operation and regime.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

from .common import du, set_cache
from .raysupport import Watchdog
from .regimes import measure
from .states import flat_host_arrays
from .systems import REGISTRY, Context, System

FAMILY_ORDER = {"shardckpt": 0, "numpy": 1, "orbax": 2, "limit": 9}


class Op:
    """One timed operation of one system: ``save``, ``async`` or ``restore`` (hot/cold).
    ``pre``/``post`` are untimed; ``run`` returns metric -> seconds."""

    def __init__(self, system: System, action: str, cache: str | None, sources: dict[str, Path]):
        self.system, self.action, self.cache, self.sources = system, action, cache, sources
        self.name = system.op_name(action, cache)
        self.label = system.op_label(action, cache)
        self.family = system.family
        self.kind = "limit" if system.family == "limit" else action
        self.metrics = ("blocking", "total") if action == "async" else ("time",)
        self.needs_ray = system.needs_ray
        self.size: int | None = None
        self.result = None
        self.path: Path | None = None
        self._n = 0

    @property
    def source(self) -> Path:
        return self.sources[self.system.restores_from or self.system.name]

    def pre(self) -> None:
        if self.action == "restore":
            set_cache(self.source, self.cache)
        self.system.prepare(self.action)

    def _fresh_path(self) -> Path:
        self._n += 1
        return self.system.ctx.sub(self.name) / f"run{self._n}"

    def run(self) -> dict[str, float]:
        s, state = self.system, self.system.ctx.state
        if self.action == "save":
            path = self._fresh_path()
            t0 = time.perf_counter()
            written = s.save(state, path)
            dt = time.perf_counter() - t0
            self.path = written if written is not None else path
            return {"time": dt}
        if self.action == "async":
            path = self._fresh_path()
            t0 = time.perf_counter()
            written, wait = s.async_save(state, path)
            t1 = time.perf_counter()
            wait()
            t2 = time.perf_counter()
            self.path = written if written is not None else path
            return {"blocking": t1 - t0, "total": t2 - t0}
        t0 = time.perf_counter()
        out = s.restore(self.source, state.targets)
        dt = time.perf_counter() - t0
        self.result = out
        return {"time": dt}

    def post(self) -> None:
        if self.action == "restore":
            self.result = None
            gc.collect()
            return
        if self.action == "save" and self.path is not None and self.path.exists():
            self.size = du(self.path)
        self.system.cleanup(self.action, self.path)
        self.path = None


def select_systems(args) -> list[type[System]]:
    """The registered systems of this run, in a stable order (family, then registration)."""
    order = {n: i for i, n in enumerate(REGISTRY)}
    if args.systems:
        wanted = [n for n in args.systems.split(",") if n]
        unknown = [n for n in wanted if n not in REGISTRY]
        if unknown:
            raise SystemExit(f"--systems: unknown {unknown} (see --list)")
        classes = [REGISTRY[n] for n in wanted]
    else:
        classes = [c for c in REGISTRY.values() if c.default]
    if args.no_ray:
        classes = [c for c in classes if not c.needs_ray]
    return sorted(classes, key=lambda c: (FAMILY_ORDER.get(c.family, 5), order[c.name]))


def make_ops(systems: list[System], sources: dict[str, Path]) -> list[Op]:
    ops = []
    for s in systems:
        for action in ("save", "async"):
            if s.can("save" if action == "save" else "async_save"):
                ops.append(Op(s, action, None, sources))
    for cache in ("hot", "cold"):
        for s in systems:
            if s.can("restore") and cache in s.restore_caches:
                ops.append(Op(s, "restore", cache, sources))
    return ops


def list_ops(classes: list[type[System]]) -> list[tuple[str, str]]:
    """(operation name, label) of every operation of ``classes``, without running anything."""
    dummy = [c(Context(None, Path("."))) for c in classes]
    return [(o.name, o.label) for o in make_ops(dummy, {})]


def check_restores(state, ops: list[Op], console) -> dict[str, bool]:
    """Every restore returns the saved values bit for bit (checked once, after the warm-up)."""
    import jax
    import numpy as np
    want = list(flat_host_arrays(state.items).values())
    out = {}
    for op in ops:
        if op.kind != "restore" or op.cache != "hot":
            continue
        op.pre()
        op.run()
        leaves = op.system.result_leaves(op.result)
        if leaves is None:
            op.post()
            continue
        leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
                  for x in leaves]
        ok = len(leaves) == len(want) and all(
            g.shape == w.shape and g.dtype == w.dtype
            and np.array_equal(g.reshape(-1).view(np.uint8), w.reshape(-1).view(np.uint8))
            for g, w in zip(leaves, want))
        out[op.name] = ok
        del leaves
        op.post()
        console.print(f"  check {op.name}: {'bit-exact' if ok else '[red]MISMATCH[/red]'}")
    return out


class StateRun:
    """Everything measured on one state: set-up, warm-up, check, timed loop, teardown."""

    def __init__(self, args, state, classes: list[type[System]], workdir: Path, console, guard,
                 partial: Path, meta: dict):
        self.args, self.state, self.console, self.guard = args, state, console, guard
        self.partial, self.meta = partial, meta
        self.ctx = Context(state, workdir, args)
        self.systems = [c(self.ctx) for c in classes]
        self.extra: list[System] = []          # sources of restores_from not selected
        self.sources: dict[str, Path] = {}
        self.ops = make_ops(self.systems, self.sources)
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {o.name for o in self.ops}
            if unknown:
                raise SystemExit(f"--only: unknown operations {sorted(unknown)} (see --list)")
            self.ops = [o for o in self.ops if o.name in wanted]
        self.results: dict[str, dict[str, dict[str, list[float]]]] = {o.name: {} for o in self.ops}
        self.sizes: dict[str, int] = {}
        self.errors: list[dict] = []
        self.load_samples: list[list[float]] = []

    def system(self, name: str) -> System:
        for s in self.systems + self.extra:
            if s.name == name:
                return s
        s = REGISTRY[name](self.ctx)
        s.setup()
        self.extra.append(s)
        return s

    def setup(self) -> None:
        used = {o.system.name for o in self.ops}
        self.systems = [s for s in self.systems if s.name in used]
        for s in self.systems:
            s.setup()
        for o in self.ops:
            if o.action == "restore":
                src = o.system.restores_from or o.system.name
                if src not in self.sources:
                    self.sources[src] = self.system(src).make_source(self.ctx.sub("sources") / src)
                    self.sizes[f"{src}_restore_source"] = du(self.sources[src])

    def teardown(self) -> None:
        for s in self.systems + self.extra:
            with contextlib.suppress(Exception):
                s.teardown()

    def _dump_partial(self) -> None:
        self.partial.write_text(json.dumps({**self.meta, "state": self.state.name, "raw": self.results,
                                            "errors": self.errors}, indent=1))

    def run(self) -> None:
        args, console = self.args, self.console
        console.print("setup + warm-up (each operation once, untimed) ...")
        self.setup()
        for op in self.ops:
            op.pre()
            op.run()
            op.post()
            if op.size is not None:
                self.sizes[op.name] = op.size
        self.checks = check_restores(self.state, self.ops, console)

        def on_hang(name):
            self.errors.append({"op": name, "error": "hung; process ended by the watchdog",
                                "at": time.strftime("%H:%M:%S")})
            self._dump_partial()
            print(f"watchdog: {name} hung for {args.op_timeout:.0f} s (Ray killed from outside?); "
                  f"partial results in {self.partial}", file=sys.stderr, flush=True)

        dog = Watchdog(args.op_timeout, on_hang)
        ops, n, regimes = self.ops, len(self.ops), args.regimes
        t_bench = time.perf_counter()
        for rep in range(args.repeats):
            order = ops[rep % n:] + ops[:rep % n]      # rotate: no system always runs first
            for op in order:
                for regime in (regimes if rep % 2 == 0 else regimes[::-1]):
                    try:
                        with dog.watch(f"{op.name} ({regime})"):
                            r = measure(op, regime, args.idle, self.guard)
                    except Exception as e:  # noqa: BLE001 - one failed sample must not lose the run
                        self.errors.append({"op": op.name, "regime": regime, "repeat": rep,
                                            "error": f"{type(e).__name__}: {str(e)[:500]}",
                                            "at": time.strftime("%H:%M:%S")})
                        console.print(f"  [red]{op.name} ({regime}) failed: {type(e).__name__}: {str(e)[:200]}[/red]")
                        continue
                    for m, v in r.items():
                        self.results[op.name].setdefault(regime, {}).setdefault(m, []).append(v)
                    console.print(f"  [{rep + 1}/{args.repeats}] {regime:4s} {op.name:32s} "
                                  + " ".join(f"{m}={v:.3f}s" for m, v in r.items())
                                  + f"  (load {os.getloadavg()[0]:.2f})", highlight=False)
                    self._dump_partial()
            from .common import load_avg
            self.load_samples.append(load_avg())
            console.print(f"  repeat {rep + 1} done, {time.perf_counter() - t_bench:.0f} s, load {load_avg()}")
        self.bench_seconds = time.perf_counter() - t_bench
        dog.limit = float("inf")
