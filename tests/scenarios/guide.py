"""Running the blocks of a docs page as written: the one runner the guide tests share.

The convention of docs/*.md: a ```python block runs (in order, in one session started in
an empty directory, each block seeing what the earlier ones defined); a ```bash block runs
too, one ``shardckpt ...`` command a line, through ``tools.cli.main`` with the arguments as
the shell splits them (comments dropped); ```py and untagged blocks are illustrations that
do not run. A ```bash line that is not a ``shardckpt`` command fails: a page cannot show a
command that no test runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from shardckpt.tools.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDE = DOCS / "checkpointing_guide.md"
RUNNABLE = ("python", "bash")
_FENCE = re.compile(r"^```([A-Za-z]*)\n(.*?)^```$", re.S | re.M)


def blocks(text: str, section: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of ``text`` (or of its ``## section``), in
    order, untagged ones as language ``""``."""
    if section is not None:
        start = text.index(section)
        end = text.find("\n## ", start + len(section))
        text = text[start:end if end >= 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def run_block(lang: str, code: str, scope: dict, name: str) -> int:
    """Run one block: returns the number of shell commands it ran (0 for python). A command
    that exits nonzero raises AssertionError (the caller's capsys/capfd holds its stderr)."""
    if lang == "python":
        exec(compile(code, name, "exec"), scope)  # noqa: S102 - the page's own code
        return 0
    assert lang == "bash", f"{name}: {lang!r} blocks do not run"
    commands = 0
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "shardckpt", f"{name}: {line!r} is not a shardckpt command"
        rc = main(argv[1:])
        assert rc == 0, f"{name}: {line!r} exited {rc}"
        commands += 1
    return commands
