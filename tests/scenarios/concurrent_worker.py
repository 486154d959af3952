"""Processes that save and load one checkpoint directory at the same time (the
concurrency tests). Each appends what it did to its own log, one line per operation:

    BEGIN <step> <version> / COMMITTED <step> <version> / FAILED <step> <version> <error>
    OK <step> <digest> / ERR <step> <ExceptionType> <message>      (readers)
    CRASH <ExceptionType> <message>                                  (anything else)
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np

from shardckpt import CheckpointError, CheckpointManager
from tests.scenarios.crash_worker import Log
from tests.scenarios.reliability import Tiny, digest, tree_for

KEYS = list(tree_for(0))          # every array of a saved tree, the frozen one included


def saver(directory: str, log_path: str, steps: list[int], seed: int, max_to_keep: int | None,
          start_file: str | None = None) -> None:
    log = Log(log_path)
    rng = random.Random(seed)
    mgr = CheckpointManager(directory, max_to_keep=max_to_keep, backend="threads", num_writers=2)
    _wait_for(start_file)
    for step in steps:
        version = rng.getrandbits(31)
        mgr.num_shards = rng.choice([1, 2, 4])
        log("BEGIN", step, version)
        try:
            mgr.save(step, Tiny(tree_for(step, version)))
        except CheckpointError as e:
            log("FAILED", step, version, type(e).__name__, str(e).replace("\n", " ")[:300])
            continue
        except BaseException as e:  # noqa: BLE001 - the parent fails the test on CRASH
            log("CRASH", type(e).__name__, str(e).replace("\n", " ")[:300])
            raise
        log("COMMITTED", step, version)


def params_of(module) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(module, k).get_value()) for k in KEYS}


def reader(directory: str, log_path: str, step: int | None, stop_file: str, seed: int, verify: bool) -> None:
    """Load ``step`` (or a random listed step) again and again until ``stop_file`` exists."""
    log = Log(log_path)
    rng = random.Random(seed)
    mgr = CheckpointManager(directory, max_to_keep=None, backend="threads", verify=verify)
    target = Tiny({k: np.zeros_like(v) for k, v in tree_for(0).items()})
    while not os.path.exists(stop_file):
        want = step
        if want is None:
            steps = mgr.all_steps()
            if not steps:
                time.sleep(0.001)
                continue
            want = rng.choice(steps)
        try:
            mgr.load_step(want, model=target)
        except CheckpointError as e:
            log("ERR", want, type(e).__name__, str(e).replace("\n", " ")[:300])
            time.sleep(0.002)
            continue
        except BaseException as e:  # noqa: BLE001 - the parent fails the test on CRASH
            log("CRASH", type(e).__name__, str(e).replace("\n", " ")[:300])
            raise
        log("OK", want, digest(params_of(target)))


def _wait_for(path: str | None) -> None:
    while path and not Path(path).exists():
        time.sleep(0.001)
