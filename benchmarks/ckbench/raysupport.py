"""The run's local Ray, and a watchdog for operations that hang.

Internal shardckpt name used: ``shardckpt.executors.ray.RayExecutor.forget_all`` (called
after a Ray restart so the next operation starts new writer actors).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable


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
        import ray
        try:
            return ray.is_initialized() and bool(ray.cluster_resources())
        except Exception:  # noqa: BLE001 - the local Ray died
            return False

    def ensure(self) -> bool:
        """True when Ray had died and was restarted."""
        if self.alive():
            return False
        import ray

        from shardckpt.executors.ray import RayExecutor
        with contextlib.suppress(Exception):
            ray.shutdown()
        RayExecutor.forget_all()
        self.start()
        self.restarts.append(time.strftime("%H:%M:%S"))
        return True

    def shutdown(self) -> None:
        import ray
        with contextlib.suppress(Exception):
            ray.shutdown()


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
