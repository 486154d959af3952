"""Threads that keep working while the interpreter exits.

An async save that is still running when a program's last line returns must still commit.
``concurrent.futures`` cannot promise that: at exit its pools are shut down *before* the
interpreter waits for non-daemon threads, so a save still running then cannot start the
writer threads it needs ("cannot schedule new futures after interpreter shutdown"). The
threads of a save are therefore plain ``threading`` threads:

* ``Background`` runs one function (a manager's async save) in a non-daemon thread: the
  interpreter waits for it at exit;
* ``run_all`` maps a function over items on fresh threads, joined before it returns;
* ``WorkerPool`` keeps a few daemon threads for short tasks (an O_DIRECT write in flight,
  an S3 part upload); a task's submitter waits for it, so a daemon thread never holds the
  last of a save's work when the interpreter finalises.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Task:
    """The result of one function run on another thread."""

    def __init__(self):
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` here, keeping its result or exception for ``result()``."""
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value; its exception re-raised here."""
        if not self._done.wait(timeout):
            raise TimeoutError("the task did not finish in time")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        self._done.wait()
        return self._error


class Background(Task):
    """``fn()`` in a non-daemon thread, started at once."""

    def __init__(self, fn: Callable[[], Any], name: str):
        super().__init__()
        self.thread = threading.Thread(target=self.run, args=(fn,), name=name, daemon=False)
        self.thread.start()


def run_all(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on at most ``workers`` threads; the first failure is raised
    after all have finished (no stray writer left running)."""
    items = list(items)
    if len(items) <= 1 or workers <= 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    todo = iter(range(len(items)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: BLE001 - raised by the caller below
                errors[i] = e

    threads = [threading.Thread(target=worker, name="shardckpt-worker", daemon=True)
               for _ in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


class WorkerPool:
    """A few daemon threads taking short tasks from one queue, created on first use."""

    def __init__(self, size: int, name: str):
        self.size, self.name = size, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> Task:
        task = Task()
        self._queue.put((task, fn))
        with self._lock:
            if len(self._threads) < self.size and self._queue.qsize() > 0:
                t = threading.Thread(target=self._serve, name=self.name, daemon=True)
                t.start()
                self._threads.append(t)
        return task

    def _serve(self) -> None:
        while True:
            task, fn = self._queue.get()
            task.run(fn)
