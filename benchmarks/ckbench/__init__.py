"""ckbench: the checkpoint benchmark as a package.

Layout (one job per module)::

    common.py       process environment, constants, file-system helpers
    states.py       the states: lm (LMModel), many_small, few_huge (all + AdamW, dense moments)
    systems/        one module per system; base.py has System, the registry and Context
      shardckpt.py  shardckpt (threads), shardckpt_ray
      orbax.py      orbax (defaults) and its best settings as variants
      numpy.py      np.savez / np.load
      limits.py     raw O_DIRECT / buffered write + fsync, raw read, memcpy
    regimes.py      cold / warm, and one timed sample
    harness.py      systems -> operations, warm-up, bit-exact check, alternating timed loop
    memory.py       restore peak RSS and save extra host memory, in fresh subprocesses
    report.py       medians, ratios (x Orbax default, x Orbax best, of limit), table, plot
    raysupport.py   the run's local Ray, watchdog
    scaling.py      --scaling;  index_bench.py: --index-bench
    cli.py          options and main; ``python -m benchmarks.ckbench`` or
                    ``python benchmarks/bench_checkpoint.py``
"""
