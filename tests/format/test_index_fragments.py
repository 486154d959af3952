"""Chunk index fragments (#13.1): an index of more than ``FRAGMENT_ROWS`` chunks is written as
fragments by writer plus a directory; a reader reads only the fragments holding the chunks it
restores; damaged or lying directories and fragments are refused, and no box is handed out
that its chunks do not cover exactly. ``FRAGMENT_ROWS`` is lowered here so that small real
checkpoints (saved by the public functions) are fragmented."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import xxhash

import shardckpt.format.fragments as frag
from shardckpt import CorruptCheckpointError
from shardckpt.format.manifest import seal_manifest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items
from shardckpt.tools.verify import verify

ROWS = 4096


def _items(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"model": {"w": rng.standard_normal((ROWS, 16)).astype(np.float32),
                      **{f"small{i}": np.full((3,), i + seed, np.int32) for i in range(20)}},
            "optimizer": {"mu": rng.standard_normal((ROWS, 8)).astype(np.float32),
                          "nu": rng.standard_normal((ROWS // 2, 8)).astype(np.float32)}}


@pytest.fixture
def small_fragments(monkeypatch):
    monkeypatch.setattr(frag, "FRAGMENT_ROWS", 8)


def _rows(table) -> list:
    return sorted((f, c.key, c.offset, c.shape, c.nbytes, c.crc32) for f, c in table)


def test_fragmented_index_round_trips_and_equals_the_single_file(tmp_path, small_fragments, monkeypatch):
    items = _items()
    save_items(tmp_path / "frag", items, num_shards=64)
    names = sorted(p.name for p in (tmp_path / "frag").iterdir() if p.name.startswith("index"))
    assert "index.msgpack" in names and len(names) > 4           # a directory and its fragments
    monkeypatch.setattr(frag, "FRAGMENT_ROWS", 1 << 16)
    save_items(tmp_path / "one", items, num_shards=64)
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if p.name.startswith("index")) == ["index.msgpack"]
    a, b = Checkpoint(tmp_path / "frag"), Checkpoint(tmp_path / "one")
    full_a, full_b = a.index(), b.index()
    for item in items:
        for key in items[item]:
            assert _rows(full_a[item][key]) == _rows(full_b[item][key]), key
    for item, arrays in items.items():
        got = Checkpoint(tmp_path / "frag").read_arrays(item)
        for key, value in arrays.items():
            assert np.array_equal(got[key], value), key
    report = verify(tmp_path / "frag")
    assert report.ok, report.problems


def test_a_box_reads_only_the_fragments_that_meet_it(tmp_path, small_fragments):
    save_items(tmp_path / "ck", _items(), num_shards=64)
    whole = Checkpoint(tmp_path / "ck")
    whole.index()
    total = whole.committed.fragments().bytes_read                   # every fragment
    ck = Checkpoint(tmp_path / "ck")
    tables = ck.chunk_tables("model", {"w": [((0, 0), (64, 16))]})
    assert tables["w"].overlapping_rows((0, 0), (64, 16))
    assert len(ck.committed.fragments().loaded) == 1
    assert ck.committed.fragments().bytes_read < total / 4
    assert ck.index_bytes_read < whole.index_bytes_read
    late = Checkpoint(tmp_path / "ck")
    late.chunk_tables("model", {"w": [((ROWS - 64, 0), (64, 16))]})
    assert set(late.committed.fragments().loaded) != set(ck.committed.fragments().loaded)


def test_restoring_one_item_reads_only_its_fragments(tmp_path, small_fragments):
    items = _items(1)
    save_items(tmp_path / "ck", {"model": items["model"]}, num_shards=64)
    save_items(tmp_path / "ck", {"optimizer": items["optimizer"]}, num_shards=64, keep_other_items=True)
    ck = Checkpoint(tmp_path / "ck")
    got = ck.read_arrays("optimizer")
    assert all(np.array_equal(got[k], v) for k, v in items["optimizer"].items())
    directory = ck.committed.fragments().directory
    model_frags = {int(k) for w in directory.arrays["model"].values() for k in w.frag}
    assert not set(ck.committed.fragments().loaded) & (model_frags - {int(k) for w in directory.arrays["optimizer"].values()
                                                            for k in w.frag})
    model = Checkpoint(tmp_path / "ck").read_arrays("model")
    assert all(np.array_equal(model[k], v) for k, v in items["model"].items())
    listed = set(json.loads((tmp_path / "ck" / "manifest.json").read_text())["meta_files"])
    on_disk = {p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("index")}
    assert on_disk == {n for n in listed if n.startswith("index")}     # the carried-over save left no stale fragment
    assert verify(tmp_path / "ck").ok


def test_fragmented_save_and_load_on_s3(s3_server, small_fragments, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    items = _items(2)
    save_items("s3://ckpts/fragments/step_1", items, num_shards=32)
    ck = Checkpoint.at(*__import__("shardckpt.store.registry", fromlist=["resolve"]).resolve("s3://ckpts/fragments/step_1"))
    assert len(ck.manifest.meta_files) > 4
    for item, arrays in items.items():
        got = ck.read_arrays(item)
        assert all(np.array_equal(got[k], v) for k, v in arrays.items())


# --- damage -------------------------------------------------------------------------------------

def _rewrite(path, name: str, data: bytes) -> None:
    """Replace metadata file ``name`` and reseal the manifest around it: a consistent but
    hostile checkpoint (its checksums all match)."""
    (path / name).write_bytes(data)
    doc = json.loads((path / "manifest.json").read_text())
    doc["meta_files"][name].update(size=len(data), xxh3_64=xxhash.xxh3_64(data).hexdigest())
    (path / "manifest.json").write_text(json.dumps(seal_manifest(doc)))


def _directory(path) -> dict:
    return msgpack.unpackb((path / "index.msgpack").read_bytes(), raw=False)


def _pack(doc) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def _boxes(entry) -> np.ndarray:
    return np.frombuffer(entry["box"], "<i8").reshape(-1, 2, 2).copy()


@pytest.fixture
def fragmented(tmp_path, small_fragments):
    save_items(tmp_path / "ck", {"model": _items()["model"]}, num_shards=64)
    return tmp_path / "ck"


def _load_box(path, box=((0, 0), (ROWS, 16))):
    ck = Checkpoint(path)
    return ck.chunk_tables("model", {"w": [box]})


def test_a_directory_hiding_a_fragment_cannot_leave_a_gap(fragmented):
    doc = _directory(fragmented)
    entry = doc["items"]["model"]["w"]
    boxes = _boxes(entry)
    boxes[0] = [[ROWS - 1, 0], [ROWS, 16]]         # fragment 0's rows declared at the far end
    entry["box"] = boxes.astype("<i8").tobytes()
    _rewrite(fragmented, "index.msgpack", _pack(doc))
    with pytest.raises(CorruptCheckpointError, match="cover|outside the box"):
        _load_box(fragmented, ((0, 0), (64, 16)))
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(fragmented).read_arrays("model")
    assert not verify(fragmented).ok


@pytest.mark.parametrize("damage", ["count", "box_too_small", "unknown_fragment", "missing_array", "fragment_order",
                                    "trailing"])
def test_damaged_directory_is_refused(fragmented, damage):
    doc = _directory(fragmented)
    entry = doc["items"]["model"]["w"]
    if damage == "count":
        rows = np.frombuffer(entry["rows"], "<i8").copy()
        rows[0] += 1
        entry["rows"] = rows.tobytes()
    elif damage == "box_too_small":
        boxes = _boxes(entry)
        boxes[0][1][0] = boxes[0][0][0] + 1
        entry["box"] = boxes.astype("<i8").tobytes()
    elif damage == "unknown_fragment":
        doc["fragments"][0] = "index-99999.msgpack"
    elif damage == "missing_array":
        del doc["items"]["model"]["small3"]
    elif damage == "fragment_order":
        f = np.frombuffer(entry["frag"], "<i4").copy()
        f[[0, 1]] = f[[1, 0]]
        entry["frag"] = f.tobytes()
    raw = _pack(doc) + (b"\x00" if damage == "trailing" else b"")
    _rewrite(fragmented, "index.msgpack", raw)
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(fragmented).read_arrays("model")
    assert not verify(fragmented).ok


@pytest.mark.parametrize("damage", ["bitflip", "other_fragment", "dropped_array", "extra_field"])
def test_damaged_fragment_is_refused(fragmented, damage):
    name = "index-00000.msgpack"
    raw = (fragmented / name).read_bytes()
    if damage == "bitflip":                 # not resealed: the manifest's checksum catches it
        data = bytearray(raw)
        data[len(data) // 2] ^= 0x10
        (fragmented / name).write_bytes(bytes(data))
    else:
        doc = msgpack.unpackb(raw, raw=False)
        if damage == "other_fragment":
            doc["fragment"] = 1
        elif damage == "dropped_array":
            doc["items"]["model"].pop("w")
        else:
            doc["extra"] = 1
        _rewrite(fragmented, name, _pack(doc))
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(fragmented).read_arrays("model")
    assert not verify(fragmented).ok


def _synthetic_parts(participants: int, arrays: int, rows_per: int = 4):
    """FSDP-like part reports (metadata only): participant p wrote rows [p*r, (p+1)*r) of
    every array, in two files, the reports arriving in reverse order."""
    from shardckpt.format.manifest import ItemRecord
    from shardckpt.format.parts import PartReport
    from shardckpt.format.shard import ChunkRecord, ShardReport
    from shardckpt.tree import ArraySpec
    rows, cols = participants * rows_per, 8
    specs = {f"w{a}": ArraySpec("float32", (rows, cols), "float32", (rows, cols)) for a in range(arrays)}
    keys = list(specs)
    parts = []
    nbytes = rows_per * cols * 4
    for p in range(participants):
        reports, item_of = [], {}
        for f, group in enumerate((keys[::2], keys[1::2])):
            name = f"state-p{p:03d}-{f}.npz"
            chunks = [ChunkRecord(k, f"{k}@{p}", (p * rows_per, 0), (rows_per, cols), 64 + i * nbytes, nbytes, 7)
                      for i, k in enumerate(group)]
            reports.append(ShardReport(name, 64 + len(group) * nbytes, "0123456789abcdef", chunks, {"host": "h"}))
            item_of[name] = "state"
        parts.append(PartReport(p, {"state": ItemRecord(dict(specs), {})}, reports, item_of))
    return parts[::-1], rows, cols


def test_fragments_follow_writers_so_a_participant_reads_one(tmp_path, monkeypatch):
    from shardckpt.format.parts import CommitArgs
    from shardckpt.saving.commit import commit
    from shardckpt.store.local import LocalStore
    monkeypatch.setattr(frag, "FRAGMENT_ROWS", 40)          # 4 participants x 10 arrays
    parts, rows, cols = _synthetic_parts(participants=16, arrays=10)
    store = LocalStore(tmp_path)
    commit(store.stage("step_1", "t" * 32), parts, CommitArgs(step=1))
    ck = Checkpoint(tmp_path / "step_1")
    directory = ck.committed.fragments().directory
    assert len(directory.fragments) == 4
    for key, where in directory.arrays["state"].items():
        # fragment k holds exactly the rows of participants 4k..4k+3
        assert where.frag.tolist() == [0, 1, 2, 3], key
        assert where.lo[:, 0].tolist() == [0, 16, 32, 48] and where.hi[:, 0].tolist() == [16, 32, 48, 64], key
    for p in (0, 5, 15):
        reader = Checkpoint(tmp_path / "step_1")
        requests = {k: [((p * 4, 0), (4, cols))] for k in directory.arrays["state"]}
        tables = reader.chunk_tables("state", requests)
        assert set(reader.committed.fragments().loaded) == {p // 4}
        assert all(t.overlapping_rows((p * 4, 0), (4, cols)) for t in tables.values())
    # a box straddling two participants of different fragments reads both, checked exactly
    reader = Checkpoint(tmp_path / "step_1")
    reader.chunk_tables("state", {"w0": [((14, 0), (4, cols))]})
    assert set(reader.committed.fragments().loaded) == {0, 1}
    assert len(Checkpoint(tmp_path / "step_1").index()["state"]["w3"]) == 16
