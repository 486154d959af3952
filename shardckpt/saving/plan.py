"""Save and read plans: which shard file holds which box of which array.

Planning is pure arithmetic, kept apart from I/O so the thread and Ray executors run the
same plan and produce byte-identical checkpoints.

Save: pieces larger than a shard's fair share are split along axis 0, then the chunks are
placed on shards largest-first onto the least-loaded shard (LPT), which keeps the largest
shard within one chunk of the mean. Read: a target box is served by the stored chunks it
overlaps, each restricted to the overlap.
"""

from __future__ import annotations

import math
import re

from shardckpt.format.shard import MemberToWrite, ShardPlan
from shardckpt.tree import ArrayEntry, Piece

MIN_SHARD_BYTES = 4 << 20       # below this, more shards only add files
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@\-]")


def shard_file_name(item: str, index: int, count: int, process_index: int = 0,
                    process_count: int = 1, tag: str | None = None) -> str:
    """``{item}[-{tag}][-p{process}]-{index}-of-{count}.npz``; ``tag`` names the save that
    wrote the file where files of earlier saves sit beside it (incremental saves)."""
    head = f"{item}-{tag}" if tag else item
    if process_count > 1:
        return f"{head}-p{process_index:05d}-{index:05d}-of-{count:05d}.npz"
    return f"{head}-{index:05d}-of-{count:05d}.npz"


def default_num_shards(total_bytes: int, num_writers: int) -> int:
    return max(1, min(num_writers, math.ceil(total_bytes / MIN_SHARD_BYTES)))


def _split_axis0(piece: Piece, max_bytes: int) -> list[Piece]:
    data = piece.data
    if data.ndim == 0 or data.nbytes <= max_bytes or data.shape[0] < 2:
        return [piece]
    parts = min(data.shape[0], math.ceil(data.nbytes / max_bytes))
    rows = math.ceil(data.shape[0] / parts)
    out = []
    for start in range(0, data.shape[0], rows):
        offset = (piece.offset[0] + start,) + tuple(piece.offset[1:])
        out.append(Piece(offset, data[start:start + rows]))
    return out


def _member_name(key: str, offset: tuple[int, ...], whole: bool, taken: set[str]) -> str:
    base = _UNSAFE.sub("_", key) or "_"
    name = base if whole else f"{base}@{'_'.join(map(str, offset)) or '0'}"
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}~{n}", n + 1
    taken.add(candidate)
    return candidate


def plan_save(item: str, entries: list[ArrayEntry], num_shards: int, *,
              process_index: int = 0, process_count: int = 1, tag: str | None = None) -> list[ShardPlan]:
    """Assign every piece of ``entries`` (this process's share) to ``num_shards`` files."""
    total = sum(p.data.nbytes for e in entries for p in e.pieces)
    num_shards = max(1, num_shards)
    max_chunk = max(1, math.ceil(total / num_shards))
    chunks: list[tuple[ArrayEntry, Piece]] = []
    for entry in entries:
        for piece in entry.pieces:
            chunks.extend((entry, p) for p in _split_axis0(piece, max_chunk))
    num_shards = max(1, min(num_shards, len(chunks)))
    names = [shard_file_name(item, i, num_shards, process_index, process_count, tag) for i in range(num_shards)]
    shards = [ShardPlan(n) for n in names]
    whole = {e.key for e in entries if len(e.pieces) == 1 and process_count == 1
             and e.pieces[0].data.shape == e.spec.stored_shape}
    per_key_chunks: dict[str, int] = {}
    for e, _ in chunks:
        per_key_chunks[e.key] = per_key_chunks.get(e.key, 0) + 1
    taken: set[str] = set()
    # Largest first onto the least loaded shard; ties keep the tree's order (stable sort).
    order = sorted(range(len(chunks)), key=lambda i: -chunks[i][1].data.nbytes)
    for i in order:
        entry, piece = chunks[i]
        target = min(shards, key=lambda s: s.nbytes)
        is_whole = entry.key in whole and per_key_chunks[entry.key] == 1
        member = _member_name(entry.key, piece.offset, is_whole, taken)
        target.members.append(MemberToWrite(entry.key, member, piece.offset, piece.data))
        target.nbytes += piece.data.nbytes
    # Members in tree order inside each file: files read in the order humans expect.
    rank = {id(c[1].data): i for i, c in enumerate(chunks)}
    for s in shards:
        s.members.sort(key=lambda m: rank.get(id(m.data), 0))
    return shards
