"""A participant's staged report is read while another process may still be writing it:
every prefix of it reads as "not there yet", never as a broken report (CI once read a
part one byte long: ``5 exceeds max_map_len(0)``)."""

from __future__ import annotations

from shardckpt.format.manifest import ItemRecord
from shardckpt.format.parts import PartReport, part_body, part_from_bytes, part_to_bytes
from shardckpt.format.shard import ChunkRecord, ShardReport


def _part() -> PartReport:
    chunks = [ChunkRecord("a.b", "a.b.npy", (0, 0), (2, 3), 128, 24, 12345)]
    return PartReport(1, {"state": ItemRecord()}, [ShardReport("state-p00001-00000-of-00001.npz", 400, "0" * 16,
                                                               chunks, "w0")],
                      {"state-p00001-00000-of-00001.npz": "state"})


def test_every_prefix_of_a_part_reads_as_not_yet_written():
    raw = part_to_bytes(_part())
    for n in range(len(raw)):
        assert part_body(raw[:n]) is None, n
    back = part_from_bytes(part_body(raw), "here")
    assert back.participant == 1 and back.reports[0].chunks == _part().reports[0].chunks


def test_a_part_with_a_changed_byte_or_a_tail_is_not_taken():
    raw = bytearray(part_to_bytes(_part()))
    raw[-1] ^= 1
    assert part_body(bytes(raw)) is None
    assert part_body(part_to_bytes(_part()) + b"x") is None
    assert part_body(b"\x85" + b"\0" * 40) is None        # a bare msgpack map (the old format)
