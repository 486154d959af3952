"""A trainer that does nothing but checkpoint, to be killed at random moments.

``save_loop`` saves small NumPy trees (``reliability.tree_for(step, version)``) in a loop
through the real API: ``CheckpointManager.save`` (blocking and async), bare
``save_checkpoint`` followed by ``apply_retention``, and re-saves of a step it already
holds (a replacement), with random shard counts and compression, retention
``max_to_keep=3``. Around every save it appends to its log, unbuffered, so a SIGKILL loses
nothing it wrote::

    BEGIN <step> <version>                 before the save starts
    COMMITTED <step> <version> <digest>    after save() returned (async: after the wait)
    ABORTED <step> <version> <error>       the save raised a CheckpointError (Ray trials)

As a script (``python crash_worker.py DIR LOG SEED START ray``) it first starts its own
local Ray and saves through the Ray backend; it then also reports the pids of the Ray
processes doing the work (``PIDS coordinator=<pid> writers=<pid>,<pid>``) so the parent
can kill those, and it obeys ``PAUSE``/``RESUME`` lines on stdin between saves.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402,F401 - imported by every manager save; preloaded by the forkserver

from shardckpt import CheckpointError, CheckpointManager  # noqa: E402
from shardckpt.api.session import resolve_executor  # noqa: E402
from shardckpt.testing import save_items  # noqa: E402
from tests.scenarios.reliability import MAX_TO_KEEP, Tiny, digest, tree_for  # noqa: E402


class Log:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, *words) -> None:
        os.write(self.fd, (" ".join(str(w) for w in words) + "\n").encode())


def save_loop(directory: str, log_path: str, seed: int, start_step: int, backend: str = "threads",
              control=None, max_saves: int | None = None, no_exchange: bool = False) -> None:
    """``no_exchange``: run as on a filesystem without ``renameat2(RENAME_EXCHANGE)`` (the
    storage seam refuses the exchange with EINVAL), so replacements take the fallback path
    (old copy renamed aside, repaired by the Catalog's leftovers plan after a crash)."""
    if no_exchange:
        import errno

        from shardckpt.testing import Fault, FaultPlan
        FaultPlan(Fault("exchange", "*", errno.EINVAL, times=1 << 62)).__enter__()
    log = Log(log_path)
    rng = random.Random(seed)
    managers = {
        "sync": CheckpointManager(directory, max_to_keep=MAX_TO_KEEP, backend=backend, num_writers=2),
        "async": CheckpointManager(directory, max_to_keep=MAX_TO_KEEP, backend=backend, num_writers=2,
                                   async_save=True),
    }
    executor = resolve_executor(backend, 2)
    step = start_step
    saves = 0
    log("STARTED", os.getpid())
    while max_saves is None or saves < max_saves:
        if control is not None:
            control.between_saves(log, managers["sync"])
        kind = rng.choices(["manager", "async", "direct", "resave"], weights=[5, 2, 2, 2])[0]
        held = managers["sync"].all_steps()
        if kind == "resave" and held:
            target = rng.choice(held[-MAX_TO_KEEP:])
        else:
            target = step
            step += 1
        version = rng.getrandbits(31)
        tree = tree_for(target, version)
        mgr = managers["async" if kind == "async" else "sync"]
        mgr.num_shards = rng.choice([None, 1, 2, 3, 5])
        mgr.compress = rng.random() < 0.25
        log("BEGIN", target, version)
        try:
            if kind == "direct":
                save_items(mgr.step_path(target), {"model": tree}, step=target, executor=executor,
                                num_shards=mgr.num_shards, compress=mgr.compress)
                mgr.apply_retention()
            else:
                mgr.save(target, Tiny(tree), metrics={"version": version})
                mgr.wait_until_finished()
        except CheckpointError as e:
            if backend == "threads":
                log("FAILED", target, version, type(e).__name__, str(e).replace("\n", " ")[:300])
                raise
            log("ABORTED", target, version, type(e).__name__, str(e).replace("\n", " ")[:200])
            continue
        log("COMMITTED", target, version, digest(tree))
        saves += 1


class RayControl:
    """Between saves: report the pids of the Ray processes that save, and pause when the
    parent asks (it then checks the directory while nothing is being written)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.pause = threading.Event()
        self.resume = threading.Event()
        threading.Thread(target=self._read_stdin, daemon=True).start()
        self.last_pids = None

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            if line.strip() == "PAUSE":
                self.resume.clear()
                self.pause.set()
            elif line.strip() == "RESUME":
                self.pause.clear()
                self.resume.set()

    def between_saves(self, log, mgr) -> None:
        from shardckpt.coord.ray_actor import get_coordinator
        from shardckpt.saving.commit import commit
        from shardckpt.store.registry import open_store
        if self.pause.is_set():
            log("PAUSED")
            self.resume.wait()
            log("RESUMED")
        try:
            coord = ray.get(get_coordinator(open_store(self.directory), commit).ping.remote(), timeout=60)["pid"]
            ex = resolve_executor(mgr.backend, mgr.num_writers, mgr.save_timeout)
            writers = ray.get([h.identity.remote() for h, _, _ in ex.actors()], timeout=60)
            pids = (coord, ",".join(str(w["pid"]) for w in writers))
        except Exception as e:  # noqa: BLE001 - an actor just killed: the next save rebuilds it
            log("NOPIDS", type(e).__name__)
            return
        if pids != self.last_pids:
            log("PIDS", f"coordinator={pids[0]}", f"writers={pids[1]}")
            self.last_pids = pids


def main(argv: list[str]) -> None:
    directory, log_path, seed, start = argv[0], argv[1], int(argv[2]), int(argv[3])
    backend = argv[4] if len(argv) > 4 else "threads"
    control = None
    if backend == "ray":
        import ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        control = RayControl(directory)
    Log(log_path)("READY", os.getpid())
    save_loop(directory, log_path, seed, start, backend=backend, control=control)


if __name__ == "__main__":
    main(sys.argv[1:])
