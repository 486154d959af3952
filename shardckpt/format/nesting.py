"""How deeply a JSON text nests, measured on its bytes before it is parsed.

``json.loads`` recurses once per level, in C: a hostile file of 100,000 ``[`` raises
``RecursionError`` at the default recursion limit, and crashes the interpreter (a C stack
overflow, SIGSEGV) in a program that raised the limit (``sys.setrecursionlimit``). Checking
the decoded document afterwards (``manifest.json_depth``) comes too late for that, so
readers of untrusted JSON measure the text first: ``raw_json_depth(raw) > limit`` refuses
it without recursing at all, in linear time and memory proportional to the input.
"""

from __future__ import annotations

import re

import numpy as np

# A JSON string (escapes included), written so the engine loops over runs of plain
# characters rather than one alternation per character.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


def raw_json_depth(raw: bytes | str) -> int:
    """The bracket nesting depth of ``raw`` outside JSON strings: exactly the depth that
    ``json.loads`` reaches (a scalar is 0, ``[]`` is 1) for valid JSON, and never less than
    the depth it could reach for any other text (an unterminated string counts its
    brackets), so ``raw_json_depth(raw) <= limit`` is a safe bound to parse under."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if b"[" not in raw and b"{" not in raw:
        return 0
    if b'"' in raw:
        raw = _STRING.sub(b'""', raw)
    a = np.frombuffer(raw, np.uint8)
    opens = (a == _OPEN[0]) | (a == _OPEN[1])
    where = np.flatnonzero(opens | (a == _CLOSE[0]) | (a == _CLOSE[1]))
    if where.size == 0:
        return 0
    steps = np.where(opens[where], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))
