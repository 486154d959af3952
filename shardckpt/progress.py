"""Progress bars for long saves and loads: shown only on an interactive terminal.

A bar costs a terminal redraw per update, so it is off when stderr is not a tty (CI, logs,
notebooks piping output) or when the caller passes ``progress=False``; updates come from
many writer threads and are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

SHOW_ABOVE_BYTES = 64 << 20     # small checkpoints finish before a bar is worth drawing


@contextlib.contextmanager
def byte_progress(description: str, total: int, enabled: bool | None) -> Iterator[Callable[[int], None] | None]:
    """Yield ``advance(nbytes)`` for a rich progress bar, or None when no bar is drawn."""
    show = (sys.stderr.isatty() and total >= SHOW_ABOVE_BYTES) if enabled is None else bool(enabled)
    if not show:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    lock = threading.Lock()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(nbytes: int) -> None:
            with lock:
                bar.advance(task, nbytes)

        yield advance
