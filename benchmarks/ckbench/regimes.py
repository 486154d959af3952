"""The two memory regimes every timed operation runs in.

* ``cold``: the process sleeps ``--idle`` seconds (default 10) before each timed operation.
  On VMs that hand idle guest memory back to the host (free page reporting), the first touch
  of fresh memory (new arrays, page cache for new files, shared-memory pages) then costs
  ~0.4 GB/s and dominates; this is what a checkpoint every N minutes sees on such a VM.
* ``warm``: the operation runs once untimed immediately before the timed run (its memory is
  freed and reused at once), which is what a machine that keeps its memory sees.
"""

from __future__ import annotations

import gc
import time

REGIMES = ("cold", "warm")


def measure(op, regime: str, idle: float, guard=None) -> dict[str, float]:
    """One timed sample of ``op`` in ``regime``: metric -> seconds."""
    ray_op = op.needs_ray and guard is not None

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
