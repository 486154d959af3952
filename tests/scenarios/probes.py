"""Functions the reliability tests run in a worker process (forked from the forkserver, see
``reliability.forkserver``), where resource limits can be set without touching the test
process: an address-space limit that turns any attempt to allocate a hostile checkpoint's
declared terabytes into a ``MemoryError`` the test then sees, and a file-size limit that
makes the kernel refuse writes (EFBIG)."""

from __future__ import annotations

import json
import resource
import signal
import time
from pathlib import Path

import numpy as np

from tests.scenarios.reliability import Tiny, peak_rss_bytes, peak_rss_reset, tree_for


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def bounded_load(path: str, how: str, out: str, headroom: int = 1 << 30) -> None:
    """Load ``path`` the way ``how`` says, with at most ``headroom`` bytes of address space
    more than the process has now; write {result, seconds, rss_growth} to ``out``."""
    from shardckpt.loading.open import open_checkpoint
    limit = _vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    peak_rss_reset()
    rss0 = peak_rss_bytes()
    t0 = time.time()
    try:
        ck = open_checkpoint(path)
        if how == "read_arrays":
            ck.read_arrays("model")
        elif how == "restore":
            import jax
            rec = ck.item_record("model")
            target = {k: jax.ShapeDtypeStruct(s.shape, np.dtype(s.stored_dtype)) for k, s in rec.arrays.items()}
            ck.restore("model", target, strict=False)
        elif how == "read_json":
            ck.read_json("config.json")
        elif how != "open":
            raise ValueError(how)
        result = "ok"
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback
        result = f"{type(e).__module__}.{type(e).__name__}: {str(e)[:400]}"
        where = "".join(traceback.format_tb(e.__traceback__)[-3:])
    else:
        where = ""
    Path(out).write_text(json.dumps({"result": result, "seconds": time.time() - t0,
                                     "rss_growth": peak_rss_bytes() - rss0, "where": where}))


def save_under_fsize_limit(directory: str, limit: int, step: int, out: str) -> None:
    """Save step ``step`` (a ~``limit``-byte array among others) with writes past ``limit``
    bytes refused by the kernel; write the outcome to ``out``."""
    from shardckpt import CheckpointManager
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    big = {"big": np.arange(limit // 4 + 4096, dtype=np.float32), **tree_for(step)}
    mgr = CheckpointManager(directory, max_to_keep=3, backend="threads")
    try:
        mgr.save(step, Tiny(big))
        result = "saved"
    except Exception as e:  # noqa: BLE001 - reported to the parent
        result = f"{type(e).__module__}.{type(e).__name__}: {e}"
    Path(out).write_text(result)
