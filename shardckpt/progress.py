"""Progress bars for long saves and loads, and the one-line summary each leaves.

A bar costs a terminal redraw per update, so it is drawn only when stderr is a terminal
and the transfer is large (or when the caller passes ``progress=True``); updates come from
many writer threads and are serialised by a lock. The bar is transient: when it ends it is
replaced by one line (``saved step_7: 1.3 GiB in 0.82 s, 1.6 GiB/s``), and the same line
goes to the ``shardckpt`` logger at INFO for logs. Sizes are binary (KiB, MiB, GiB)
everywhere, as in the ``shardckpt`` command's tables.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

SHOW_ABOVE_BYTES = 64 << 20     # small checkpoints finish before a bar is worth drawing
LOG = logging.getLogger("shardckpt")


def size_text(n: float | None) -> str:
    """Bytes as people read them, in binary units: ``512 B``, ``3.0 KiB``, ``1.3 GiB``."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary(done: str, total: int, seconds: float) -> str:
    rate = total / seconds if seconds > 0 else 0.0
    return f"{done}: {size_text(total)} in {seconds:.2f} s, {size_text(rate)}/s"


@contextlib.contextmanager
def byte_progress(description: str, total: int, enabled: bool | None,
                  done: str | None = None) -> Iterator[Callable[[int], None] | None]:
    """Yield ``advance(nbytes)`` for a rich progress bar, or None when no bar is drawn.
    When the block ends without an error, ``done`` (default: the description) is
    summarised in one line: on stderr where the bar was drawn, and in the log."""
    show = (sys.stderr.isatty() and total >= SHOW_ABOVE_BYTES) if enabled is None else bool(enabled)
    start = time.perf_counter()
    if not show:
        yield None
        LOG.info(summary(done or description, total, time.perf_counter() - start))
        return
    from rich.console import Console  # rich only when a bar is drawn
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Bytes(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{size_text(task.completed)}/{size_text(task.total)}")

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text("?" if task.speed is None else f"{size_text(task.speed)}/s")

    lock = threading.Lock()
    console = Console(file=sys.stderr, highlight=False, emoji=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), Bytes(), Speed(), TimeRemainingColumn(),
                  transient=True, console=console) as bar:
        task = bar.add_task(description, total=total)

        def advance(nbytes: int) -> None:
            with lock:
                bar.advance(task, nbytes)

        yield advance
    line = summary(done or description, total, time.perf_counter() - start)
    console.print(line, markup=False)
    LOG.info(line)


SHOW_ABOVE_ITEMS = 4            # fewer deletions finish before a bar is worth drawing


@contextlib.contextmanager
def count_progress(description: str, total: int, enabled: bool | None = None) -> Iterator[Callable[[], None]]:
    """Yield ``step()`` for a bar over ``total`` items (directories ``gc`` removes), drawn
    only on a terminal for more than a few; a no-op otherwise."""
    show = (sys.stderr.isatty() and total > SHOW_ABOVE_ITEMS) if enabled is None else bool(enabled)
    if not show:
        yield lambda: None
        return
    from rich.console import Console  # rich only when a bar is drawn
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True,
                  console=Console(file=sys.stderr, highlight=False, emoji=False)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task, 1)
