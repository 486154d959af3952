"""What participants hand the committer: their part of a save, as values and as bytes.

A ``PartReport`` holds what one participant's items hold (specs and scalar leaves, the same
on every participant) and the reports of the shard files it wrote; ``CommitArgs`` what
participant 0 adds (step, metadata files, metrics). The Ray coordinator receives them as
objects, the ``jax.distributed`` protocol as staged files (``part_to_bytes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from shardckpt.format.manifest import FileRecord, ItemRecord, parse_array_spec
from shardckpt.format.shard import ChunkRecord, ShardReport


@dataclass
class PartReport:
    """One participant's contribution to a save: what its items hold (specs and scalar
    leaves, the same on every participant) and the reports of the shards it wrote."""

    participant: int
    items: dict[str, ItemRecord]
    reports: list[ShardReport]
    item_of_file: dict[str, str]
    digests: dict[str, str] | None = None    # item -> digest of its record, made by the participant

    def digest(self, item: str) -> str:
        """A checksum of what ``item`` holds (its record's canonical JSON): computed once, by
        the participant that wrote the part, so a committer of 1,024 parts compares short
        strings instead of 1,024 structures of thousands of arrays."""
        if self.digests is None:
            self.digests = {}
        if item not in self.digests:
            self.digests[item] = record_digest(self.items[item])
        return self.digests[item]


def record_digest(rec: ItemRecord) -> str:
    return xxhash.xxh3_128(json.dumps(rec.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Carry:
    """What a save takes from its base: the base's name (a checkpoint of the same store), its
    version id (checked again after the files are adopted), the files carried whole, and per
    item and array the base's chunk rows, which then lie in those files."""

    base: str
    base_id: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    rows: dict[str, dict[str, list[tuple[str, ChunkRecord]]]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(r.size for r in self.files.values())

    def __bool__(self) -> bool:
        return bool(self.rows)


@dataclass
class CommitArgs:
    """What participant 0 hands the committer besides the parts: the step, metadata files,
    metrics, whether to keep the checkpoint's other items, and what an incremental save
    carries from its base."""

    step: int | None = None
    json_files: dict[str, Any] | None = None
    metrics: dict | None = None
    keep_other_items: bool = False
    carry: Carry | None = None


PART_MAGIC = b"shardckpt-part1\n"
_PART_HEAD = len(PART_MAGIC) + 16        # magic, body length (8 bytes LE), xxh3-64 of the body


PART_MAGIC = b"shardckpt-part1\n"
_PART_HEAD = len(PART_MAGIC) + 16        # magic, body length (8 bytes LE), xxh3-64 of the body


def part_to_bytes(part: PartReport) -> bytes:
    """A participant's report as a staged file: framed with its length and checksum, since
    a file being written may be read before it is whole (``part_body``)."""
    body = msgpack.packb({
        "participant": part.participant,
        "items": {n: r.to_json() for n, r in part.items.items()},
        "item_of_file": part.item_of_file,
        "digests": {n: part.digest(n) for n in part.items},
        "reports": [{"file": r.file, "size": r.size, "xxh3_64": r.xxh3_64, "writer": r.writer,
                     "chunks": [[c.key, c.member, list(c.offset), list(c.shape),
                                 -1 if c.data_offset is None else c.data_offset, c.nbytes, c.crc32]
                                for c in r.chunks]} for r in part.reports],
    }, use_bin_type=True)
    return PART_MAGIC + len(body).to_bytes(8, "little") + xxhash.xxh3_64_digest(body) + body


def part_body(raw: bytes) -> bytes | None:
    """The body of a staged part, or None while it is not whole yet (shorter than its
    frame says, or its checksum does not match: still being written)."""
    if len(raw) < _PART_HEAD or not raw.startswith(PART_MAGIC):
        return None
    n = int.from_bytes(raw[len(PART_MAGIC):len(PART_MAGIC) + 8], "little")
    body = raw[_PART_HEAD:]
    if len(body) != n or xxhash.xxh3_64_digest(body) != raw[len(PART_MAGIC) + 8:_PART_HEAD]:
        return None
    return body


def part_from_bytes(body: bytes, where: str) -> PartReport:
    """A part from its body (``part_body``)."""
    d = msgpack.unpackb(body, raw=False)
    items = {n: ItemRecord({k: parse_array_spec(k, v, where) for k, v in r["arrays"].items()}, r["scalars"])
             for n, r in d["items"].items()}
    reports = [ShardReport(r["file"], r["size"], r["xxh3_64"],
                           [ChunkRecord(k, m, tuple(o), tuple(s), None if off < 0 else off, n, crc)
                            for k, m, o, s, off, n, crc in r["chunks"]], r["writer"]) for r in d["reports"]]
    return PartReport(d["participant"], items, reports, d["item_of_file"], d.get("digests"))
