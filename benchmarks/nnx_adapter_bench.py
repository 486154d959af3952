"""Issue #21: the nnx adapter's load cost against ``Checkpoint.restore`` of prebuilt targets.

Saves one LMModel + AdamW checkpoint (``--preset``, default 100m), then times, alternating
within one process: ``Checkpoint(path).restore`` of prebuilt abstract targets (model and
optimizer), ``CheckpointManager.load_latest(tx=)`` (model built from the saved config) and
``load_latest(model=<concrete LMModel>, tx=)``; warm (page cache hot) and cold
(``drop_cache``). Each result is freed outside the timed region (the variants used to
free their 1.31 GB at return, inside it); ``load_latest(model=)`` still frees the model's
old arrays inside it, as a resume does. Prints medians and the ratios to the restore.

    python benchmarks/nnx_adapter_bench.py --preset 100m --repeats 5 --cache warm,cold
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="100m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default="warm,cold")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--src", default=None, help="import shardckpt from this directory (a 'before' tree)")
    ap.add_argument("--profile", default=None, help="cProfile one load_latest(tx=) warm into this file")
    args = ap.parse_args()

    import jax
    import optax
    from ckbench.common import drop_cache, warm_cache
    from ckbench.states import abstract_targets, build_model_opt
    if args.src:      # ckbench put this repo first on sys.path: the tree under test goes before it
        sys.path.insert(0, args.src)
    from flax import nnx

    import shardckpt
    from shardckpt import Checkpoint, CheckpointManager
    from shardckpt.lm.models import LMModel, ModelConfig
    print(f"shardckpt from {Path(shardckpt.__file__).parent}")
    cfg = ModelConfig.preset(args.preset)
    spec = {"kind": "lm", "model_config": cfg.to_dict()}
    root = Path(args.dir or tempfile.mkdtemp(prefix="nnx21_"))
    mgr = CheckpointManager(root, max_to_keep=None, progress=False)
    if mgr.latest_step is None:
        model, opt = build_model_opt(spec)
        mgr.save(0, model, opt)
        del model, opt
    path = Path(mgr.step_path(mgr.latest_step))
    mgr.close()
    targets = abstract_targets(spec)
    concrete = LMModel(cfg, rngs=nnx.Rngs(1))

    def v_restore():
        ck = Checkpoint(path)
        out = {n: ck.restore(n, t, progress=False)[0] for n, t in targets.items()}
        jax.block_until_ready(out)
        return out

    def v_load_tx():
        with CheckpointManager(root, max_to_keep=None, progress=False) as m:
            s = m.load_latest(tx=optax.adamw(1e-4))
        jax.block_until_ready((nnx.state(s.model), nnx.state(s.optimizer)))
        return s

    def v_load_model():
        with CheckpointManager(root, max_to_keep=None, progress=False) as m:
            s = m.load_latest(model=concrete, tx=optax.adamw(1e-4))
        jax.block_until_ready((nnx.state(s.model), nnx.state(s.optimizer)))
        return s

    variants = {"Checkpoint.restore (prebuilt targets)": v_restore,
                "load_latest(tx=)": v_load_tx,
                "load_latest(model=, tx=)": v_load_model}
    first = {}
    for name, f in variants.items():   # warm-up: imports; the adapter's first call traces (not cached yet)
        gc.collect()
        warm_cache(path)
        t = time.perf_counter()
        result = f()
        first[name] = time.perf_counter() - t
        del result
    if args.profile:
        import cProfile
        warm_cache(path)
        cProfile.runctx("v_load_tx()", globals(), {"v_load_tx": v_load_tx}, args.profile)
        cProfile.runctx("v_load_model()", globals(), {"v_load_model": v_load_model}, args.profile + ".model")
        cProfile.runctx("v_restore()", globals(), {"v_restore": v_restore}, args.profile + ".restore")
    times = {c: {n: [] for n in variants} for c in args.cache.split(",")}
    load0 = os.getloadavg()
    for _ in range(args.repeats):
        for cache in times:
            for name, f in variants.items():
                gc.collect()     # the last result is freed here, outside every variant's time
                (warm_cache if cache == "warm" else drop_cache)(path)
                t = time.perf_counter()
                result = f()
                times[cache][name].append(time.perf_counter() - t)
                del result
    load1 = os.getloadavg()
    nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"{args.preset}: {nbytes / 1e9:.2f} GB at {path}; load avg before {load0[0]:.2f} after {load1[0]:.2f}")
    out = {"preset": args.preset, "bytes": nbytes, "loadavg": [load0, load1], "times": times, "first_call_warm": first,
           "shardckpt": str(Path(shardckpt.__file__).parent)}
    for name, t in first.items():
        print(f"  first call in the process, warm: {name:40s} {t:.3f} s")
    for cache, rows in times.items():
        base = statistics.median(rows["Checkpoint.restore (prebuilt targets)"])
        for name, ts in rows.items():
            med = statistics.median(ts)
            print(f"  {cache:4s} {name:40s} median {med:.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  "
                  f"ratio {med / base:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
