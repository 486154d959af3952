#!/usr/bin/env python
"""Checkpoint benchmark: shardckpt against Orbax, ``np.savez`` and the machine's limits.

Everything is measured in ONE process on the same state, alternating between systems, after
a warm-up, median of ``--repeats`` (>= 3 for real numbers), in two memory regimes:

* ``cold``: the process sleeps ``--idle`` seconds (default 10) before each timed operation.
  On VMs that hand idle guest memory back to the host (free page reporting), the first touch
  of fresh memory (new arrays, page cache for new files, shared-memory pages) then costs
  ~0.4 GB/s and dominates; this is what a checkpoint every N minutes sees on such a VM.
* ``warm``: the operation runs once untimed immediately before the timed run (its memory
  is freed and reused at once), which is what a machine that keeps its memory sees.

Restores run with the files in the page cache (``hot``: read once just before) and out of it
(``cold``: fsync + ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file just before). Each
restore builds jax arrays from an abstract target (``nnx.eval_shape``) and waits for them.
Peak RSS of each restore is measured in a fresh subprocess. See benchmarks/README.md.

Other modes: ``--scaling`` (shardckpt's Ray backend on ``ray.cluster_utils.Cluster`` with
1, 2, 4 simulated nodes, one subprocess each) and ``--index-bench`` (the committer's and the
loader's cost for a synthetic index of 10^5..10^6 chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# If something outside kills our local Ray (a `ray stop` elsewhere on a shared machine), the
# driver would exit after 60 s without its GCS; stay alive and restart Ray instead.
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "3600")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1e9
DIRECT_BLOCK = 4096
IO_BLOCK = 16 << 20


# --------------------------------------------------------------------------------------------
# the state
# --------------------------------------------------------------------------------------------

def config_for(size_params: int | None, preset: str):
    """A ModelConfig: the preset, or the LMModel shape closest to ``size_params``."""
    from shardckpt.models import ModelConfig
    if not size_params:
        return ModelConfig.preset(preset)
    best = None
    for h in (64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 3072, 4096):
        inter = 8 * math.ceil(int(8 * h / 3) / 8)
        per_layer = 2 * h + 4 * h * h + 3 * h * inter
        for vocab in (32000, 8192, 2048, 512):
            base = vocab * h + h
            layers = round((size_params - base) / per_layer)
            if layers < 1:
                continue
            err = abs(base + layers * per_layer - size_params) / size_params
            # within 5 %, prefer transformer-like shapes: ~12 layers, a real vocabulary
            score = (err > 0.05, abs(math.log(layers / 12)) + (0.5 if vocab < 8192 else 0), err)
            if best is None or score < best[0]:
                best = (score, h, layers, vocab)
    if best is None:
        raise SystemExit(f"--size-params {size_params}: too small for an LMModel")
    _, h, layers, vocab = best
    return ModelConfig(vocab_size=vocab, hidden_size=h, n_layers=layers, n_heads=max(1, h // 64),
                       max_seq_len=1024)


def build_state(cfg):
    """The real model and its AdamW optimizer, with non-zero moments (so no format gains by
    compressing zeros), and the abstract target of both built with ``nnx.eval_shape``."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from shardckpt.models import LMModel

    model = LMModel(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    state = nnx.state(opt)
    key = jax.random.key(1)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    new = []
    for i, x in enumerate(leaves):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim:
            x = (jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) * 1e-3).astype(x.dtype)
        new.append(x)
    nnx.update(opt, jax.tree_util.tree_unflatten(treedef, new))
    jax.block_until_ready(nnx.state(opt))
    return model, opt


def abstract_targets(cfg) -> dict:
    import optax
    from flax import nnx
    from shardckpt.models import LMModel
    abs_model = nnx.eval_shape(lambda: LMModel(cfg, rngs=nnx.Rngs(0)))
    abs_opt = nnx.eval_shape(lambda m: nnx.Optimizer(m, optax.adamw(1e-4), wrt=nnx.Param), abs_model)
    return {"model": nnx.state(abs_model), "optimizer": nnx.state(abs_opt)}


def state_items(model, opt) -> dict:
    from flax import nnx
    return {"model": nnx.state(model), "optimizer": nnx.state(opt)}


def flat_host_arrays(items: dict) -> dict[str, Any]:
    """Dotted key -> host numpy view (zero-copy on CPU) of every array leaf."""
    import jax
    import numpy as np
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(items)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        out[key] = np.asarray(leaf)
    return out


def tree_nbytes(tree) -> int:
    import jax
    return sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# file-system helpers
# --------------------------------------------------------------------------------------------

def data_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in data_files(path))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Evict ``path``'s files from the page cache (fsync first: dirty pages stay cached)."""
    for p in data_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    """Read every file once so it sits in the page cache."""
    buf = bytearray(IO_BLOCK)
    for p in data_files(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# operations
# --------------------------------------------------------------------------------------------

class Op:
    """One benchmarked operation. ``pre``/``post`` are untimed; ``run`` returns
    metric -> seconds (most ops have one metric, "time")."""

    name = "op"
    label = "op"
    kind = "save"          # save | async | restore | limit
    cache = None           # restores: "hot" | "cold"
    system = ""
    metrics = ("time",)

    def setup(self) -> None: ...
    def pre(self) -> None: ...
    def run(self) -> dict[str, float]: raise NotImplementedError
    def post(self) -> None: ...
    def teardown(self) -> None: ...


class Bench:
    """Shared state of a run: the model, the abstract target, work directories."""

    def __init__(self, args, cfg, model, opt, workdir: Path):
        self.args = args
        self.cfg = cfg
        self.model = model
        self.opt = opt
        self.items = state_items(model, opt)
        self.targets = abstract_targets(cfg)
        self.nbytes = tree_nbytes(self.items)
        self.workdir = workdir
        self.step = 0

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def sub(self, name: str) -> Path:
        p = self.workdir / name
        p.mkdir(parents=True, exist_ok=True)
        return p


# --- shardckpt --------------------------------------------------------------------------------

class RayGuard:
    """The local Ray of the run, started once; restarted (and the next Ray operation warmed
    up again) if something outside killed it."""

    def __init__(self):
        self.restarts: list[str] = []
        self.start()

    def start(self) -> None:
        import ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")

    def alive(self) -> bool:
        try:
            from ray._private import worker
            node = worker._global_node
            return node is not None and not node.dead_processes()
        except Exception:  # noqa: BLE001
            return False

    def ensure(self) -> bool:
        """True when Ray had died and was restarted."""
        if self.alive():
            return False
        import ray
        from shardckpt.executors.ray import RayExecutor
        with contextlib.suppress(Exception):
            ray.shutdown()
        RayExecutor._instances.clear()
        self.start()
        self.restarts.append(time.strftime("%H:%M:%S"))
        return True


class ShardSave(Op):
    kind = "save"
    system = "shardckpt"

    def __init__(self, b: Bench, backend: str):
        self.b, self.backend = b, backend
        self.name = f"shardckpt_save_{backend}"
        self.label = f"shardckpt save ({backend}, durable)"
        self.needs_ray = backend == "ray"

    def setup(self):
        from shardckpt import CheckpointManager
        self.dir = self.b.sub(self.name)
        self.mgr = CheckpointManager(self.dir, max_to_keep=None, backend=self.backend, progress=False,
                                     save_timeout=180)

    def run(self):
        step = self.b.next_step()
        t0 = time.perf_counter()
        self.path = self.mgr.save(step, self.b.model, self.b.opt)
        return {"time": time.perf_counter() - t0}

    def post(self):
        self.size = du(self.path)
        rmtree(self.path)

    def teardown(self):
        self.mgr.close()


class ShardAsync(Op):
    kind = "async"
    system = "shardckpt"
    metrics = ("blocking", "total")
    name = "shardckpt_async"
    label = "shardckpt async save (threads)"

    def __init__(self, b: Bench):
        self.b = b

    def setup(self):
        from shardckpt import CheckpointManager
        self.dir = self.b.sub(self.name)
        self.mgr = CheckpointManager(self.dir, max_to_keep=None, backend="threads", async_save=True,
                                     progress=False)

    def run(self):
        step = self.b.next_step()
        t0 = time.perf_counter()
        self.path = self.mgr.save(step, self.b.model, self.b.opt)
        t1 = time.perf_counter()
        self.mgr.wait_until_finished()
        t2 = time.perf_counter()
        return {"blocking": t1 - t0, "total": t2 - t0}

    def post(self):
        rmtree(self.path)

    def teardown(self):
        self.mgr.close()


class Source:
    """A checkpoint written once per system and restored many times."""

    def __init__(self):
        self.path: Path | None = None


class ShardRestore(Op):
    kind = "restore"
    system = "shardckpt"

    def __init__(self, b: Bench, src: Source, cache: str, backend: str = "threads"):
        self.b, self.src, self.cache, self.backend = b, src, cache, backend
        tag = "" if backend == "threads" else f"_{backend}"
        self.name = f"shardckpt_restore{tag}_{cache}"
        self.label = f"shardckpt restore{' (' + backend + ')' if tag else ''} [{cache} cache]"
        self.needs_ray = backend == "ray"

    def setup(self):
        if self.src.path is None:
            from shardckpt import CheckpointManager
            d = self.b.sub("shardckpt_source")
            with CheckpointManager(d, max_to_keep=None, backend="threads", progress=False) as m:
                self.src.path = m.save(0, self.b.model, self.b.opt)

    def pre(self):
        (warm_cache if self.cache == "hot" else drop_cache)(self.src.path)
        self.executor = None
        if self.backend == "ray":
            from shardckpt.executors.ray import RayExecutor
            self.executor = RayExecutor.get(None, 180)

    def run(self):
        import jax
        from shardckpt import Checkpoint
        t0 = time.perf_counter()
        ck = Checkpoint(self.src.path)
        out = {name: ck.restore(name, target, progress=False, executor=self.executor)[0]
               for name, target in self.b.targets.items()}
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        self.result = out
        return {"time": dt}

    def post(self):
        self.result = None
        gc.collect()


# --- numpy ------------------------------------------------------------------------------------

class NpzSave(Op):
    kind = "save"
    system = "numpy"
    name = "npz_save"
    label = "np.savez + fsync"

    def __init__(self, b: Bench):
        self.b = b

    def setup(self):
        self.dir = self.b.sub(self.name)

    def run(self):
        import numpy as np
        path = self.dir / f"state_{self.b.next_step()}.npz"
        t0 = time.perf_counter()
        flat = flat_host_arrays(self.b.items)
        np.savez(path, **flat)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(self.dir)
        dt = time.perf_counter() - t0
        self.path = path
        return {"time": dt}

    def post(self):
        self.size = du(self.path)
        self.path.unlink()


class NpzRestore(Op):
    kind = "restore"
    system = "numpy"

    def __init__(self, b: Bench, src: Source, cache: str):
        self.b, self.src, self.cache = b, src, cache
        self.name = f"npz_load_{cache}"
        self.label = f"np.load -> jnp.asarray [{cache} cache]"

    def setup(self):
        import numpy as np
        if self.src.path is None:
            p = self.b.sub("npz_source") / "state.npz"
            np.savez(p, **flat_host_arrays(self.b.items))
            self.src.path = p

    def pre(self):
        (warm_cache if self.cache == "hot" else drop_cache)(self.src.path)

    def run(self):
        import jax
        import jax.numpy as jnp
        import numpy as np
        t0 = time.perf_counter()
        with np.load(self.src.path) as z:
            out = {k: jnp.asarray(z[k]) for k in z.files}
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        self.result = out
        return {"time": dt}

    def post(self):
        self.result = None
        gc.collect()


# --- Orbax ------------------------------------------------------------------------------------

class OrbaxSave(Op):
    kind = "save"
    system = "orbax"
    name = "orbax_save"
    label = "Orbax StandardCheckpointer save"

    def __init__(self, b: Bench):
        self.b = b

    def setup(self):
        import orbax.checkpoint as ocp
        self.dir = self.b.sub(self.name)
        self.ckptr = ocp.StandardCheckpointer()

    def run(self):
        path = self.dir / f"state_{self.b.next_step()}"
        t0 = time.perf_counter()
        self.ckptr.save(path, self.b.items)
        self.ckptr.wait_until_finished()
        dt = time.perf_counter() - t0
        self.path = path
        return {"time": dt}

    def post(self):
        self.size = du(self.path)
        rmtree(self.path)

    def teardown(self):
        self.ckptr.close()


class OrbaxAsync(Op):
    kind = "async"
    system = "orbax"
    metrics = ("blocking", "total")
    name = "orbax_async"
    label = "Orbax async CheckpointManager"

    def __init__(self, b: Bench):
        self.b = b

    def setup(self):
        self.root = self.b.sub(self.name)

    def pre(self):
        import orbax.checkpoint as ocp
        self.dir = self.root / f"run_{self.b.next_step()}"
        self.mgr = ocp.CheckpointManager(self.dir)

    def run(self):
        import orbax.checkpoint as ocp
        step = self.b.next_step()
        t0 = time.perf_counter()
        self.mgr.save(step, args=ocp.args.StandardSave(self.b.items))
        t1 = time.perf_counter()
        self.mgr.wait_until_finished()
        t2 = time.perf_counter()
        return {"blocking": t1 - t0, "total": t2 - t0}

    def post(self):
        self.mgr.close()
        rmtree(self.dir)


class OrbaxRestore(Op):
    kind = "restore"
    system = "orbax"

    def __init__(self, b: Bench, src: Source, cache: str):
        self.b, self.src, self.cache = b, src, cache
        self.name = f"orbax_restore_{cache}"
        self.label = f"Orbax StandardCheckpointer restore [{cache} cache]"

    def setup(self):
        import orbax.checkpoint as ocp
        self.ckptr = ocp.StandardCheckpointer()
        if self.src.path is None:
            p = self.b.sub("orbax_source") / "state"
            self.ckptr.save(p, self.b.items)
            self.ckptr.wait_until_finished()
            self.src.path = p

    def pre(self):
        (warm_cache if self.cache == "hot" else drop_cache)(self.src.path)

    def run(self):
        import jax
        t0 = time.perf_counter()
        out = self.ckptr.restore(self.src.path, self.b.targets)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        self.result = out
        return {"time": dt}

    def post(self):
        self.result = None
        gc.collect()

    def teardown(self):
        self.ckptr.close()


# --- raw limits -------------------------------------------------------------------------------

def _split_two(sizes: list[int]) -> list[list[int]]:
    """Indices of ``sizes`` in two groups of nearly equal total (largest first)."""
    groups, loads = [[], []], [0, 0]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += sizes[i]
    return groups


def _parallel(fns: list[Callable[[], None]]) -> None:
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class RawDump(Op):
    """Two threads write the state's bytes to two new files and fsync them: buffered (from
    the arrays themselves) or O_DIRECT (from one page-aligned copy of the state, so the disk
    alone is measured). No format, no checksum."""

    kind = "limit"
    system = "limit"

    def __init__(self, b: Bench, direct: bool):
        self.b, self.direct = b, direct
        self.name = "raw_write_direct" if direct else "raw_write_buffered"
        self.label = f"raw 2-thread write + fsync ({'O_DIRECT' if direct else 'buffered'})"

    def setup(self):
        self.dir = self.b.sub(self.name)
        self.arrays = list(flat_host_arrays(self.b.items).values())
        if self.direct:
            total = sum(a.nbytes for a in self.arrays)
            half = -(-total // 2 // DIRECT_BLOCK) * DIRECT_BLOCK
            self.half = half
            self.buf = mmap.mmap(-1, 2 * half)
            view, pos = memoryview(self.buf), 0
            for a in self.arrays:
                view[pos:pos + a.nbytes] = memoryview(a).cast("B")
                pos += a.nbytes
            view.release()

    def run(self):
        paths = [self.dir / f"part{i}_{self.b.next_step()}" for i in range(2)]

        def writer_buffered(path, idx):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for i in idx:
                    view = memoryview(self.arrays[i]).cast("B")
                    while len(view):
                        view = view[os.write(fd, view[:IO_BLOCK]):]
                os.fsync(fd)
            finally:
                os.close(fd)

        def writer_direct(path, part):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
            view = memoryview(self.buf)[part * self.half:(part + 1) * self.half]
            try:
                pos = 0
                while pos < len(view):
                    pos += os.write(fd, view[pos:pos + IO_BLOCK])
                os.fsync(fd)
            finally:
                view.release()
                os.close(fd)

        t0 = time.perf_counter()
        if self.direct:
            _parallel([lambda p=p, i=i: writer_direct(p, i) for i, p in enumerate(paths)])
        else:
            groups = _split_two([a.nbytes for a in self.arrays])
            _parallel([lambda p=p, g=g: writer_buffered(p, g) for p, g in zip(paths, groups)])
        fsync_dir(self.dir)
        dt = time.perf_counter() - t0
        self.paths = paths
        return {"time": dt}

    def post(self):
        for p in self.paths:
            p.unlink()

    def teardown(self):
        if self.direct:
            self.buf.close()


class RawRead(Op):
    """Two threads read shardckpt's shard files into fresh buffers (no format, no checksum):
    the read side's limit, hot or cold."""

    kind = "limit"
    system = "limit"

    def __init__(self, b: Bench, src: Source, cache: str):
        self.b, self.src, self.cache = b, src, cache
        self.name = f"raw_read_{cache}"
        self.label = f"raw 2-thread read into new memory [{cache} cache]"

    def pre(self):
        (warm_cache if self.cache == "hot" else drop_cache)(self.src.path)

    def run(self):
        import numpy as np
        files = [p for p in data_files(self.src.path) if p.suffix == ".npz"]
        sizes = [p.stat().st_size for p in files]
        out = [None] * len(files)

        def reader(idx):
            for i in idx:
                buf = np.empty(sizes[i], np.uint8)
                view = memoryview(buf)
                fd = os.open(files[i], os.O_RDONLY)
                try:
                    pos = 0
                    while pos < sizes[i]:
                        n = os.preadv(fd, [view[pos:pos + IO_BLOCK]], pos)
                        if n <= 0:
                            break
                        pos += n
                finally:
                    os.close(fd)
                out[i] = buf

        t0 = time.perf_counter()
        _parallel([lambda g=g: reader(g) for g in _split_two(sizes)])
        dt = time.perf_counter() - t0
        self.result = out
        return {"time": dt}

    def post(self):
        self.result = None
        gc.collect()


class Memcpy(Op):
    """One thread copies every array of the state into newly allocated memory."""

    kind = "limit"
    system = "limit"
    name = "memcpy"
    label = "memcpy of the state into new memory (1 thread)"

    def __init__(self, b: Bench):
        self.b = b

    def setup(self):
        self.arrays = list(flat_host_arrays(self.b.items).values())

    def run(self):
        import numpy as np
        t0 = time.perf_counter()
        out = []
        for a in self.arrays:
            d = np.empty_like(a)
            np.copyto(d, a)
            out.append(d)
        dt = time.perf_counter() - t0
        self.result = out
        return {"time": dt}

    def post(self):
        self.result = None
        gc.collect()


# --------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------

def make_ops(b: Bench, ray_on: bool) -> list[Op]:
    sc_src, np_src, ob_src = Source(), Source(), Source()
    ops: list[Op] = [ShardSave(b, "threads")]
    if ray_on:
        ops.append(ShardSave(b, "ray"))
    ops += [ShardAsync(b), NpzSave(b), OrbaxSave(b), OrbaxAsync(b),
            RawDump(b, direct=False), RawDump(b, direct=True), Memcpy(b)]
    for cache in ("hot", "cold"):
        ops += [ShardRestore(b, sc_src, cache), NpzRestore(b, np_src, cache),
                OrbaxRestore(b, ob_src, cache), RawRead(b, sc_src, cache)]
    if ray_on:
        ops.append(ShardRestore(b, sc_src, "hot", backend="ray"))
    return ops


class Watchdog:
    """Ends the process (after the partial results are on disk) if one operation hangs:
    a Ray call blocks for as long as Ray's GCS reconnect timeout when something outside
    kills the local Ray in the middle of an operation."""

    def __init__(self, limit: float, on_hang: Callable[[str], None]):
        self.limit, self.on_hang = limit, on_hang
        self.current: tuple[str, float] | None = None
        threading.Thread(target=self._watch, daemon=True, name="bench-watchdog").start()

    @contextlib.contextmanager
    def watch(self, name: str):
        self.current = (name, time.monotonic())
        try:
            yield
        finally:
            self.current = None

    def _watch(self) -> None:
        while True:
            time.sleep(5)
            cur = self.current
            if cur and time.monotonic() - cur[1] > self.limit:
                self.on_hang(cur[0])
                os._exit(3)


def measure(op: Op, regime: str, idle: float, guard: "RayGuard | None" = None) -> dict[str, float]:
    ray_op = getattr(op, "needs_ray", False) and guard is not None

    def revive() -> bool:
        if ray_op and guard.ensure():
            op.pre()          # Ray was restarted: warm the new actors up first
            op.run()
            op.post()
            return True
        return False

    revive()
    op.pre()
    if regime == "warm":
        op.run()      # the previous iteration, immediately before: its memory is reused hot
        op.post()
        op.pre()
    else:
        gc.collect()
        time.sleep(idle)
    if revive():      # checked again right before the timed run
        op.pre()
    try:
        return op.run()
    finally:
        op.post()


def check_restores(b: Bench, ops: list[Op], console) -> dict[str, bool]:
    """Every restore returns the saved values bit for bit (checked once, after the warm-up)."""
    import jax
    import numpy as np
    want = list(flat_host_arrays(b.items).values())
    out = {}
    for op in ops:
        if op.kind != "restore" or op.cache != "hot":
            continue
        op.pre()
        op.run()
        got = op.result
        leaves = list(got.values()) if op.system == "numpy" else jax.tree.leaves(got)
        leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
                  for x in leaves]
        ok = len(leaves) == len(want) and all(
            g.shape == w.shape and g.dtype == w.dtype
            and np.array_equal(g.reshape(-1).view(np.uint8), w.reshape(-1).view(np.uint8))
            for g, w in zip(leaves, want))
        out[op.name] = ok
        del got, leaves
        op.post()
        console.print(f"  check {op.name}: {'bit-exact' if ok else '[red]MISMATCH[/red]'}")
    return out


def rss_child(args) -> None:
    """Fresh process: imports and abstract target first, then one restore; prints JSON."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    cfg = _cfg_from_json(args.config_json)
    if args.system in ("shardckpt", "orbax"):
        targets = abstract_targets(cfg)
    if args.system == "orbax":
        import orbax.checkpoint as ocp
        ckptr = ocp.StandardCheckpointer()
    if args.system == "shardckpt":
        from shardckpt import Checkpoint
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        base_rss = int(f.read().split()[1]) * page
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = False
    try:   # reset VmHWM to the current RSS (a cross-check that import-time peaks cannot mask)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    t0 = time.perf_counter()
    if args.system == "shardckpt":
        ck = Checkpoint(args.path)
        out = {n: ck.restore(n, t, progress=False)[0] for n, t in targets.items()}
    elif args.system == "orbax":
        out = ckptr.restore(args.path, targets)
    else:
        with np.load(args.path) as z:
            out = {k: jnp.asarray(z[k]) for k in z.files}
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm = None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    nbytes = tree_nbytes(out)
    print("RSS_JSON " + json.dumps({"system": args.system, "base_rss": base_rss, "base_maxrss": base_max,
                                    "peak_maxrss": peak, "vmhwm": hwm, "peak_reset": reset,
                                    "delta": peak - base_rss, "delta_vmhwm": (hwm - base_rss) if hwm else None,
                                    "import_peak_masks": base_max >= peak,
                                    "restored_bytes": nbytes, "time": dt}))


def _cfg_from_json(s: str):
    from shardckpt.models import ModelConfig
    return ModelConfig.from_dict(json.loads(s))


def run_rss(b: Bench, sources: dict[str, Path], console) -> dict:
    out = {}
    for system, path in sources.items():
        if path is None:
            continue
        warm_cache(path)
        # Through a small shell that forks the child: Linux carries the exec'ing process's peak
        # RSS into ru_maxrss, so a child forked (or vforked) straight from this big process
        # would start with this process's peak.
        cmd = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(Path(__file__).resolve()),
               "--_child", "rss", "--system", system, "--path", str(path),
               "--config-json", json.dumps(b.cfg.to_dict())]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        line = [l for l in r.stdout.splitlines() if l.startswith("RSS_JSON ")]
        if r.returncode or not line:
            console.print(f"[red]RSS child for {system} failed[/red]: {r.stderr[-2000:]}")
            continue
        d = json.loads(line[-1][len("RSS_JSON "):])
        d["multiple_of_state"] = d["delta"] / b.nbytes
        d["multiple_of_state_vmhwm"] = d["delta_vmhwm"] / b.nbytes if d.get("delta_vmhwm") else None
        out[system] = d
        console.print(f"  peak RSS of {system} restore: +{d['delta'] / GB:.3f} GB = "
                      f"{d['multiple_of_state']:.2f}x state (VmHWM: {d['multiple_of_state_vmhwm'] or 0:.2f}x; "
                      f"{d['time']:.2f} s in a fresh process)"
                      + (" [import-time peak masks it]" if d["import_peak_masks"] else ""))
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

ORBAX_OF = {  # (op, metric) -> the Orbax measurement it is compared with
    "save": ("orbax_save", "time"),
    "async.blocking": ("orbax_async", "blocking"),
    "async.total": ("orbax_async", "total"),
    "restore.hot": ("orbax_restore_hot", "time"),
    "restore.cold": ("orbax_restore_cold", "time"),
}


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(results: dict, ops: list[Op], nbytes: int, regimes: list[str]) -> list[dict]:
    """Rows (op, metric) with per-regime median seconds, GB/s, ratios vs Orbax and the limit."""
    med = {(o, m, r): _median(results.get(o, {}).get(r, {}).get(m, [])) for o in results
           for r in regimes for m in ("time", "blocking", "total")}

    def limit_for(op: Op, metric: str, regime: str):
        if op.kind in ("save",) or (op.kind == "async" and metric == "total"):
            c = [med.get(("raw_write_buffered", "time", regime)), med.get(("raw_write_direct", "time", regime))]
            c = [x for x in c if x]
            return (min(c), "raw write") if c else (None, None)
        if op.kind == "restore":
            return med.get((f"raw_read_{op.cache}", "time", regime)), f"raw read {op.cache}"
        return None, None

    rows = []
    for op in ops:
        for metric in op.metrics:
            key = op.kind if op.kind == "save" else f"{op.kind}.{metric}" if op.kind == "async" else \
                f"restore.{op.cache}" if op.kind == "restore" else None
            row = {"op": op.name, "label": op.label + ("" if metric == "time" else f" - {metric}"),
                   "kind": op.kind, "metric": metric, "system": op.system, "cache": op.cache, "regimes": {}}
            for r in regimes:
                t = med.get((op.name, metric, r))
                samples = results.get(op.name, {}).get(r, {}).get(metric, [])
                cell = {"median_s": t, "samples_s": samples,
                        "gbps": (nbytes / t / GB) if t and metric != "blocking" else None}
                if key in ORBAX_OF and op.system != "orbax":
                    o = med.get((ORBAX_OF[key][0], ORBAX_OF[key][1], r))
                    cell["speedup_vs_orbax"] = (o / t) if (o and t) else None
                lim, lname = limit_for(op, metric, r)
                if lim and t and metric != "blocking":
                    cell["vs_limit"] = t / lim
                    cell["limit"] = lname
                row["regimes"][r] = cell
            rows.append(row)
    return rows


def targets_check(rows: list[dict], rss: dict, regimes: list[str]) -> list[dict]:
    def cell(op, metric, r):
        for row in rows:
            if row["op"] == op and row["metric"] == metric:
                return row["regimes"].get(r, {})
        return {}

    out = []
    for r in regimes:
        for backend in ("threads", "ray"):
            c = cell(f"shardckpt_save_{backend}", "time", r)
            if c.get("speedup_vs_orbax") is not None:
                out.append({"target": f"durable save ({backend}) >= 2.5x faster than Orbax", "regime": r,
                            "value": c["speedup_vs_orbax"], "unit": "x", "ok": c["speedup_vs_orbax"] >= 2.5})
        c = cell("shardckpt_restore_hot", "time", r)
        if c.get("speedup_vs_orbax") is not None:
            out.append({"target": "hot restore >= 3x faster than Orbax", "regime": r,
                        "value": c["speedup_vs_orbax"], "unit": "x", "ok": c["speedup_vs_orbax"] >= 3.0})
        s, o = cell("shardckpt_async", "blocking", r), cell("orbax_async", "blocking", r)
        if s.get("median_s") is not None and o.get("median_s") is not None:
            out.append({"target": "async blocking time <= Orbax's", "regime": r,
                        "value": s["median_s"], "orbax": o["median_s"], "unit": "s",
                        "ok": s["median_s"] <= o["median_s"]})
    if "shardckpt" in rss:
        m = rss["shardckpt"]["multiple_of_state"]
        out.append({"target": "restore peak RSS <= 1.25x state", "regime": "fresh process",
                    "value": m, "unit": "x state", "ok": m <= 1.25})
    return out


def print_table(console, rows, regimes, nbytes, rss, checks):
    from rich.table import Table
    t = Table(title=f"checkpoint benchmark, state {nbytes / GB:.3f} GB (median seconds; "
                    "xOrbax = Orbax time / this time; xlimit = this time / raw limit)")
    t.add_column("operation", no_wrap=True)
    for r in regimes:
        t.add_column(f"{r} s", justify="right")
        t.add_column(f"{r} GB/s", justify="right")
        t.add_column(f"{r} xOrbax", justify="right")
        t.add_column(f"{r} xlimit", justify="right")
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    last_kind = None
    for row in rows:
        if last_kind is not None and row["kind"] != last_kind:
            t.add_section()
        last_kind = row["kind"]
        cells = [row["label"]]
        for r in regimes:
            c = row["regimes"].get(r, {})
            cells += [f(c.get("median_s"), ".3f"), f(c.get("gbps"), ".2f"),
                      f(c.get("speedup_vs_orbax"), ".2f"), f(c.get("vs_limit"), ".2f")]
        t.add_row(*cells)
    console.print(t)
    if rss:
        rt = Table(title="restore peak RSS in a fresh process (above RSS after imports + abstract target)")
        rt.add_column("system")
        rt.add_column("peak - base GB", justify="right")
        rt.add_column("x state", justify="right")
        rt.add_column("restore s (fresh process)", justify="right")
        for sysname, d in rss.items():
            rt.add_row(sysname, f"{d['delta'] / GB:.3f}", f"{d['multiple_of_state']:.2f}", f"{d['time']:.2f}")
        console.print(rt)
    if checks:
        ct = Table(title="targets")
        ct.add_column("target")
        ct.add_column("regime")
        ct.add_column("measured", justify="right")
        ct.add_column("ok")
        for c in checks:
            v = f"{c['value']:.3f} {c['unit']}" + (f" (Orbax {c['orbax']:.3f} s)" if "orbax" in c else "")
            ct.add_row(c["target"], c["regime"], v, "[green]yes[/green]" if c["ok"] else "[red]NO[/red]")
        console.print(ct)


def plot(rows, regimes, nbytes, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [("save", [r for r in rows if r["kind"] in ("save", "async") or r["op"].startswith(("raw_write", "memcpy"))]),
              ("restore", [r for r in rows if r["kind"] == "restore" or r["op"].startswith("raw_read")])]
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 10))
    colors = {"cold": "#4a7fb5", "warm": "#e39b3a"}
    for ax, (name, rs) in zip(axes, groups):
        width = 0.8 / max(1, len(regimes))
        for j, reg in enumerate(regimes):
            xs, ys, lo, hi = [], [], [], []
            for i, r in enumerate(rs):
                c = r["regimes"].get(reg, {})
                t = c.get("median_s")
                s = c.get("samples_s") or []
                xs.append(i + (j - (len(regimes) - 1) / 2) * width)
                ys.append(t or 0)
                lo.append((t - min(s)) if s and t else 0)
                hi.append((max(s) - t) if s and t else 0)
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], label=f"{reg} regime", color=colors.get(reg), capsize=2)
            for x, y in zip(xs, ys):
                if y:
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["label"].replace(" [", "\n[").replace(" - ", "\n") for r in rs],
                           rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("seconds (median, bars min..max)")
        ax.set_title(f"{name}: {nbytes / GB:.2f} GB state")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# scaling on ray.cluster_utils.Cluster
# --------------------------------------------------------------------------------------------

def scaling_child(args) -> None:
    import jax
    import ray
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
    cfg = _cfg_from_json(args.config_json)
    model, opt = build_state(cfg)
    targets = abstract_targets(cfg)
    nbytes = tree_nbytes(state_items(model, opt))
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "scaling", "--nodes", str(n),
               "--config-json", json.dumps(cfg.to_dict()), "--repeats", str(args.repeats),
               "--workdir", str(args.workdir or tempfile.gettempdir()),
               "--object-store-mb", str(args.object_store_mb)]
        console.print(f"scaling: {n} simulated node(s) ... (load {load_avg()})")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
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


# --------------------------------------------------------------------------------------------
# coordinator / index cost for a synthetic 10^5..10^6 chunk checkpoint
# --------------------------------------------------------------------------------------------

def index_bench(args, console) -> dict:
    """Time what grows with the number of chunks: the committer (``commit_parts``: gather
    the parts' chunk lists, write structure + index + manifest, validate the index the way a
    loader will) and the loader (``Checkpoint(...).index()``), plus pickling the parts (what
    goes to the Ray coordinator). Fake shard reports, no shard data: only metadata costs."""
    import cProfile
    import pickle
    import pstats
    import io
    from shardckpt.checkpoint import Checkpoint, PartReport, commit_parts
    from shardckpt.format import ItemRecord
    from shardckpt.shard_io import ChunkRecord, ShardReport
    from shardckpt.storage import hidden_name
    from shardckpt.tree import ArraySpec

    results = []
    for spec_s in args.index_bench:
        total, per_array = (int(float(x)) for x in spec_s.split("x")) if "x" in spec_s else (int(float(spec_s)), 512)
        arrays = max(1, total // per_array)
        participants, files_per = 64, 8
        nfiles = participants * files_per
        rows, cols = per_array * 8, 1024
        chunk_bytes = 8 * cols * 4
        specs = {f"layers.{a // 9}.w{a % 9}": ArraySpec("float32", (rows, cols), "float32", (rows, cols))
                 for a in range(arrays)}
        keys = list(specs)
        rec = ItemRecord(specs, {})
        reports: list[list[ShardReport]] = [[] for _ in range(participants)]
        file_chunks: list[list[ChunkRecord]] = [[] for _ in range(nfiles)]
        file_pos = [0] * nfiles
        c = 0
        for a, key in enumerate(keys):
            for j in range(per_array):
                f = (a * per_array + j) % nfiles
                member = f"{key}@{j * 8}_0"
                file_chunks[f].append(ChunkRecord(key, member, (j * 8, 0), (8, cols), file_pos[f] + 128,
                                                  chunk_bytes, (c * 2654435761) & 0xFFFFFFFF))
                file_pos[f] += chunk_bytes + 128
                c += 1
        parts = []
        for p in range(participants):
            reps, item_of = [], {}
            for k in range(files_per):
                f = p * files_per + k
                name = f"state-p{p:05d}-{k:05d}-of-{files_per:05d}.npz"
                reps.append(ShardReport(name, file_pos[f] + 4096, "0123456789abcdef", file_chunks[f],
                                        {"host": f"h{p}", "pid": 1, "node_id": f"node{p:03d}", "writer": f"w{p}"}))
                item_of[name] = "state"
            parts.append(PartReport(p, {"state": rec}, reps, item_of))
        work = Path(tempfile.mkdtemp(prefix="indexbench-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            blob = pickle.dumps(parts, protocol=5)
            t_pickle = time.perf_counter() - t0
            final = work / "step_1"
            tmp = hidden_name(final, "tmp")
            os.mkdir(tmp)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            commit_parts(final, tmp, parts, step=1, json_files={"config.json": {}}, metrics={})
            prof.disable()
            t_commit = time.perf_counter() - t0
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(8)
            t0 = time.perf_counter()
            ck = Checkpoint(final)
            t_manifest = time.perf_counter() - t0
            t0 = time.perf_counter()
            index = ck.index()
            t_index = time.perf_counter() - t0
            # One host's restore planning (Checkpoint._read_boxes): each of its 8 devices wants
            # one box of every array; every chunk of the array is tested against every box.
            from shardckpt.plan import box_overlap
            rows_per_host = rows // participants if rows >= participants else rows
            t0 = time.perf_counter()
            hits = 0
            for key, entries in index["state"].items():
                boxes = [((d * rows_per_host // 8, 0), (max(1, rows_per_host // 8), cols)) for d in range(8)]
                for bo, bs in boxes:
                    for _f, ch in entries:
                        if box_overlap(ch.offset, ch.shape, bo, bs) is not None:
                            hits += 1
            t_plan = time.perf_counter() - t0
            d = {"chunks": c, "arrays": arrays, "chunks_per_array": per_array, "files": nfiles,
                 "participants": participants, "pickle_parts_s": t_pickle, "pickled_mb": len(blob) / 1e6,
                 "commit_s": t_commit, "open_manifest_s": t_manifest, "load_index_s": t_index,
                 "restore_plan_one_host_s": t_plan, "restore_plan_box_tests": len(index["state"]) * 8 * per_array,
                 "index_mb": (final / "index.msgpack").stat().st_size / 1e6,
                 "manifest_mb": (final / "manifest.json").stat().st_size / 1e6,
                 "commit_profile": s.getvalue()[-6000:], "load_avg": load_avg()}
            results.append(d)
            console.print(f"  {c:,} chunks ({arrays} arrays x {per_array}): pickle parts {t_pickle:.2f} s "
                          f"({d['pickled_mb']:.0f} MB), commit {t_commit:.2f} s, open manifest {t_manifest:.3f} s, "
                          f"load+validate index {t_index:.2f} s, one host's restore planning {t_plan:.2f} s, "
                          f"index {d['index_mb']:.1f} MB")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        del parts, reports, file_chunks
        gc.collect()
    return {"runs": results}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="100m", help="ModelConfig preset for the state (default 100m: ~1.31 GB with AdamW)")
    p.add_argument("--size-params", type=float, default=None,
                   help="build an LMModel of about this many parameters instead of the preset (state = ~12 bytes/param)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per operation and regime (default 3; 1 with --quick)")
    p.add_argument("--regimes", default="cold,warm", help="comma list of cold,warm")
    p.add_argument("--idle", type=float, default=None, help="idle seconds before each timed op in the cold regime (default 10; 2 with --quick)")
    p.add_argument("--only", default=None, help="comma list of operation names (see --list)")
    p.add_argument("--list", action="store_true", help="list operation names and exit")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--op-timeout", type=float, default=300.0,
                   help="end the run (keeping partial results) if one measurement takes longer")
    p.add_argument("--scaling", action="store_true", help="run only the Ray Cluster scaling benchmark (1, 2, 4 nodes)")
    p.add_argument("--scaling-nodes", default="1,2,4")
    p.add_argument("--scaling-params", type=float, default=25e6, help="parameters of the scaling state (25e6 = ~300 MB)")
    p.add_argument("--object-store-mb", type=int, default=1024, help="object store per simulated node (scaling)")
    p.add_argument("--index-bench", default=None,
                   help="run only the synthetic index benchmark: comma list of TOTALxPER_ARRAY chunk counts, e.g. 1e5x512,1e6x512")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for JSON and PNG")
    p.add_argument("--tag", default=None, help="result file name stem (default: bench_<mode>)")
    p.add_argument("--workdir", default=None, help="scratch directory for checkpoints (default: a new dir in $TMPDIR)")
    p.add_argument("--quick", action="store_true", help="~50 MB smoke run (1 repeat, 2 s idle)")
    # internal: subprocess modes
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.size_params = a.size_params or 50e6 / 12
        a.repeats = a.repeats or 1
        a.idle = 2.0 if a.idle is None else a.idle
    a.repeats = a.repeats or 3
    a.idle = 10.0 if a.idle is None else a.idle
    a.size_params = int(a.size_params) if a.size_params else None
    a.scaling_params = int(a.scaling_params)
    a.regimes = [r for r in a.regimes.split(",") if r]
    for r in a.regimes:
        if r not in ("cold", "warm"):
            p.error(f"--regimes: unknown regime {r!r}")
    a.scaling_nodes = [int(x) for x in a.scaling_nodes.split(",")]
    a.index_bench = a.index_bench.split(",") if a.index_bench else None
    return a


def environment() -> dict:
    import jax
    import flax
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
                                    capture_output=True, text=True).stdout.strip()
        env["git_dirty"] = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "shardckpt"],
                                               capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child == "rss":
        rss_child(args)
        return 0
    if args._child == "scaling":
        scaling_child(args)
        return 0

    from rich.console import Console
    console = Console(width=220)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = {"started": started, "argv": sys.argv[1:], "load_avg_start": load_avg(), "environment": environment()}

    if args.index_bench:
        console.print(f"index benchmark (load {load_avg()})")
        res = index_bench(args, console)
        meta["load_avg_end"] = load_avg()
        path = out_dir / f"{args.tag or 'index_bench'}.json"
        path.write_text(json.dumps({**meta, **res}, indent=1))
        console.print(f"wrote {path}")
        return 0

    if args.scaling:
        res = run_scaling(args, console)
        meta["load_avg_end"] = load_avg()
        path = out_dir / f"{args.tag or 'scaling'}.json"
        path.write_text(json.dumps({**meta, **res}, indent=1))
        console.print(f"wrote {path}")
        return 0

    import jax  # noqa: F401
    cfg = config_for(args.size_params, args.preset)
    t0 = time.perf_counter()
    model, opt = build_state(cfg)
    from shardckpt.models import count_params
    nparams = count_params(model)
    workdir = Path(tempfile.mkdtemp(prefix="shardckpt-bench-", dir=args.workdir))
    b = Bench(args, cfg, model, opt, workdir)
    console.print(f"state: {nparams / 1e6:.1f}M params + AdamW = {b.nbytes / GB:.3f} GB "
                  f"({len(jax.tree.leaves(b.items))} arrays), built in {time.perf_counter() - t0:.1f} s; "
                  f"workdir {workdir}; load {load_avg()}")

    ray_on = not args.no_ray
    guard = RayGuard() if ray_on else None
    ops = make_ops(b, ray_on)
    if args.list:
        console.print("\n".join(f"{o.name:32s} {o.label}" for o in ops))
        return 0
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {o.name for o in ops}
        if unknown:
            raise SystemExit(f"--only: unknown operations {sorted(unknown)} (see --list)")
        ops = [o for o in ops if o.name in wanted]
    results: dict[str, dict[str, dict[str, list[float]]]] = {o.name: {} for o in ops}
    sizes = {}
    try:
        console.print("setup + warm-up (each operation once, untimed) ...")
        for op in ops:
            op.setup()
        for op in ops:
            op.pre()
            op.run()
            op.post()
            if hasattr(op, "size"):
                sizes[op.name] = op.size
        for src_op in ops:
            if isinstance(getattr(src_op, "src", None), Source) and src_op.src.path is not None:
                sizes.setdefault(src_op.system + "_restore_source", du(src_op.src.path))
        checks = check_restores(b, ops, console)
        regimes = args.regimes
        n = len(ops)
        t_bench = time.perf_counter()
        load_samples = []
        stem = args.tag or ("bench_quick" if args.quick else "bench")
        partial = out_dir / f"{stem}.partial.json"
        errors = []
        def on_hang(name):
            errors.append({"op": name, "error": "hung; process ended by the watchdog", "at": time.strftime("%H:%M:%S")})
            partial.write_text(json.dumps({**meta, "raw": results, "errors": errors}, indent=1))
            print(f"watchdog: {name} hung for {args.op_timeout:.0f} s (Ray killed from outside?); "
                  f"partial results in {partial}", file=sys.stderr, flush=True)

        dog = Watchdog(args.op_timeout, on_hang)
        for rep in range(args.repeats):
            order = ops[rep % n:] + ops[:rep % n]      # rotate: no system always runs first
            for op in order:
                for regime in (regimes if rep % 2 == 0 else regimes[::-1]):
                    try:
                        with dog.watch(f"{op.name} ({regime})"):
                            r = measure(op, regime, args.idle, guard)
                    except Exception as e:  # noqa: BLE001 - one failed sample must not lose the run
                        errors.append({"op": op.name, "regime": regime, "repeat": rep,
                                       "error": f"{type(e).__name__}: {str(e)[:500]}", "at": time.strftime("%H:%M:%S")})
                        console.print(f"  [red]{op.name} ({regime}) failed: {type(e).__name__}: {str(e)[:200]}[/red]")
                        continue
                    for m, v in r.items():
                        results[op.name].setdefault(regime, {}).setdefault(m, []).append(v)
                    console.print(f"  [{rep + 1}/{args.repeats}] {regime:4s} {op.name:28s} "
                                  + " ".join(f"{m}={v:.3f}s" for m, v in r.items())
                                  + f"  (load {os.getloadavg()[0]:.2f})", highlight=False)
                    partial.write_text(json.dumps({**meta, "raw": results, "errors": errors}, indent=1))
            load_samples.append(load_avg())
            console.print(f"  repeat {rep + 1} done, {time.perf_counter() - t_bench:.0f} s, load {load_avg()}")
        rss = {}
        if not args.no_rss:
            console.print("peak RSS of each restore (fresh subprocesses) ...")
            sources = {}
            for op in ops:
                if op.kind == "restore" and op.cache == "hot" and op.name.count("_") <= 3 and "_ray" not in op.name:
                    sources[op.system] = op.src.path
            rss = run_rss(b, sources, console)
    finally:
        for op in ops:
            with contextlib.suppress(Exception):
                op.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
        if ray_on:
            import ray
            with contextlib.suppress(Exception):
                ray.shutdown()

    rows = summarize(results, ops, b.nbytes, regimes)
    tchecks = targets_check(rows, rss, regimes)
    print_table(console, rows, regimes, b.nbytes, rss, tchecks)
    meta.update({"load_avg_end": load_avg(), "load_avg_per_repeat": load_samples,
                 "bench_seconds": time.perf_counter() - t_bench, "state_bytes": b.nbytes, "params": nparams,
                 "model_config": cfg.to_dict(), "repeats": args.repeats, "regimes": regimes, "idle_s": args.idle,
                 "bytes_on_disk": sizes, "restore_checks": checks, "errors": errors,
                 "ray_restarts": guard.restarts if guard else []})
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps({**meta, "rows": rows, "rss": rss, "targets": tchecks, "raw": results}, indent=1))
    ppath = out_dir / f"{stem}.png"
    plot(rows, regimes, b.nbytes, ppath,
         f"shardckpt vs Orbax vs np.savez, {b.nbytes / GB:.2f} GB, median of {args.repeats}, "
         f"{os.cpu_count()} CPUs, load {meta['load_avg_start']} -> {meta['load_avg_end']}")
    partial.unlink(missing_ok=True)
    console.print(f"wrote {jpath} and {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
