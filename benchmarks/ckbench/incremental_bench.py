"""Incremental saves (``--incremental``): a LoRA fine-tune of the LMModel preset (rank
``--lora-rank`` adapters on q/k/v/o, the base frozen, AdamW over ``nnx.LoRAParam``), one real
training step before every save, saved by

* the shardckpt manager (incremental, the default): writes the adapters and their moments,
  carries the frozen base from the previous step (hard links);
* the shardckpt manager with ``incremental=False`` (every array every time);
* Orbax's fastest save configurations (``PyTreeCheckpointHandler`` compression off, with
  and without OCDBT; durable, ``wait_until_finished``), the best of the two per sample;
* the machine's limit for the full state (two threads writing its bytes + fsync);

alternating, in the same minutes, median of ``--repeats``. Then full-parameter training
(every array changes between saves): the manager with and without ``incremental``, to show
what the digests cost when nothing can be carried.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

from .common import GB, du, fsync_dir, rmtree


def _flat(tree) -> list:
    import jax
    import numpy as np
    out = []
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _raw_write(arrays: list, path: Path) -> None:
    """The limit: the state's bytes written by two threads into two files, fsynced."""
    halves = [arrays[0::2], arrays[1::2]]

    def write(i):
        fd = os.open(path.with_name(f"{path.name}_{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for a in halves[i]:
                view = memoryview(a).cast("B") if a.nbytes else b""
                while len(view):
                    view = view[os.write(fd, view[:8 << 20]):]
            os.fsync(fd)
        finally:
            os.close(fd)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fsync_dir(path.parent)


def _orbax(kwargs: dict):
    import orbax.checkpoint as ocp
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    return ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(**kwargs))


ORBAX_BEST = {"orbax_nocomp": {"use_compression": False},
              "orbax_nocomp_noocdbt": {"use_compression": False, "use_ocdbt": False}}


def run_incremental(args, console) -> dict:
    import jax
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx

    from shardckpt import CheckpointManager, LMModel, ModelConfig
    from shardckpt.lm.lora import add_lora, lora_optimizer, lora_train_step
    from shardckpt.lm.training import batch_for_step

    repeats = args.repeats or 5
    work = Path(args.workdir or os.environ.get("TMPDIR", "/tmp")) / f"incremental-bench-{os.getpid()}"
    rmtree(work)
    work.mkdir(parents=True)
    cfg = ModelConfig.preset(args.preset)
    model = add_lora(LMModel(cfg, nnx.Rngs(0)), args.lora_rank, nnx.Rngs(1))
    opt = lora_optimizer(model, optax.adamw(1e-4))
    arrays = _flat({"model": nnx.state(model), "optimizer": nnx.state(opt)})
    total = sum(a.nbytes for a in arrays)
    lora_bytes = sum(a.nbytes for a in _flat(nnx.state(model, nnx.LoRAParam))) + \
        sum(a.nbytes for a in _flat(nnx.state(opt)))
    console.print(f"LoRA state: preset {args.preset}, rank {args.lora_rank}, {len(arrays)} arrays, "
                  f"{total / GB:.3f} GB in all, {lora_bytes / 1e6:.1f} MB adapters + optimizer")

    inc = CheckpointManager(work / "inc", max_to_keep=2, progress=False)
    full = CheckpointManager(work / "full", max_to_keep=2, progress=False, incremental=False)
    orbax = {name: _orbax(kw) for name, kw in ORBAX_BEST.items()}
    times = {k: [] for k in ("incremental", "full", "orbax_best", "limit", *ORBAX_BEST)}
    written = {k: [] for k in ("incremental", "full", "orbax_best")}

    def orbax_save(name, step):
        path = work / name / f"step_{step}"
        rmtree(path.parent)
        t = time.perf_counter()
        orbax[name].save(path, args=ocp.args.PyTreeSave({"model": nnx.state(model), "optimizer": nnx.state(opt)}))
        orbax[name].wait_until_finished()
        return time.perf_counter() - t, du(path)

    step = 0
    for sample in range(repeats + 1):                 # sample 0 warms up (compiles, first touch)
        lora_train_step(model, opt, batch_for_step(step, cfg))
        jax.block_until_ready(nnx.state(opt))
        t = time.perf_counter()
        inc.save(step, model, opt)
        t_inc = time.perf_counter() - t
        t = time.perf_counter()
        full.save(step, model, opt)
        t_full = time.perf_counter() - t
        ob = {name: orbax_save(name, step) for name in ORBAX_BEST}
        t = time.perf_counter()
        _raw_write(_flat({"model": nnx.state(model), "optimizer": nnx.state(opt)}), work / "raw")
        t_raw = time.perf_counter() - t
        step += 1
        if sample == 0:
            continue
        best = min(ob, key=lambda n: ob[n][0])
        times["incremental"].append(t_inc)
        times["full"].append(t_full)
        times["limit"].append(t_raw)
        times["orbax_best"].append(ob[best][0])
        for name in ORBAX_BEST:
            times[name].append(ob[name][0])
        written["incremental"].append(inc.last_save.bytes_written)
        written["full"].append(full.last_save.bytes_written)
        written["orbax_best"].append(ob[best][1])
        console.print(f"  sample {sample}: incremental {t_inc:.3f} s ({inc.last_save.bytes_written / 1e6:.1f} MB "
                      f"written, {inc.last_save.bytes_carried / 1e6:.1f} MB carried), full {t_full:.3f} s, "
                      f"Orbax best {ob[best][0]:.3f} s ({best}), limit {t_raw:.3f} s")
    for ck in orbax.values():
        ck.close()

    # full-parameter training: every array changes; digests are pure overhead here
    def perturb(s):
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x + 1e-3 * (s + 1), state))
        jax.block_until_ready(nnx.state(model))
    ftimes = {"incremental": [], "full": []}
    fwritten = {"incremental": [], "full": []}
    for sample in range(repeats + 1):
        perturb(sample)
        order = [("incremental", inc), ("full", full)] if sample % 2 else [("full", full), ("incremental", inc)]
        for name, mgr in order:
            t = time.perf_counter()
            mgr.save(step, model, opt)
            if sample:
                ftimes[name].append(time.perf_counter() - t)
                fwritten[name].append(mgr.last_save.bytes_written)
        step += 1
    rmtree(work)

    med = {k: statistics.median(v) for k, v in times.items()}
    fmed = {k: statistics.median(v) for k, v in ftimes.items()}
    res = {
        "state": {"preset": args.preset, "lora_rank": args.lora_rank, "arrays": len(arrays), "bytes": total,
                  "lora_and_optimizer_bytes": lora_bytes},
        "lora": {"seconds": times, "median_s": med, "bytes_written": written,
                 "median_bytes_written": {k: statistics.median(v) for k, v in written.items()}},
        "full_training": {"seconds": ftimes, "median_s": fmed,
                          "median_bytes_written": {k: statistics.median(v) for k, v in fwritten.items()}},
    }
    console.print(f"LoRA saves, median of {repeats}:")
    for k in ("incremental", "full", "orbax_best", *ORBAX_BEST, "limit"):
        extra = f", {statistics.median(written[k]) / 1e6:.1f} MB written" if k in written else ""
        console.print(f"  {k:22s} {med[k]:.3f} s{extra}")
    console.print(f"  incremental vs full: {med['full'] / med['incremental']:.1f}x faster, "
                  f"{statistics.median(written['full']) / statistics.median(written['incremental']):.1f}x fewer bytes; "
                  f"vs Orbax best {med['orbax_best'] / med['incremental']:.1f}x; vs the limit "
                  f"{med['limit'] / med['incremental']:.1f}x")
    console.print(f"full training, median of {repeats}: incremental {fmed['incremental']:.3f} s, "
                  f"incremental=False {fmed['full']:.3f} s ({fmed['incremental'] / fmed['full']:.2f}x)")
    return res
