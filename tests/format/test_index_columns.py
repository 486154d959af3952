"""Chunk index version 2 (columnar, #13.1): round trips, version-1 indexes still load, damaged
version-2 blobs are refused, ``ChunkTable.overlapping`` equals brute force, and the commit's
check (``check_index`` on the columns it serialises) agrees with ``load_index``."""

from __future__ import annotations

import json
import random

import msgpack
import numpy as np
import pytest
import xxhash

from shardckpt import CorruptCheckpointError
from shardckpt.format import limits
from shardckpt.format.index import ChunkTable, check_index, dump_index, index_columns, load_index
from shardckpt.format.manifest import FileRecord, ItemRecord, Manifest, seal_manifest
from shardckpt.format.shard import ChunkRecord
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.geometry import box_overlap
from shardckpt.testing import dump_index_v1, save_items
from shardckpt.tree import ArraySpec
from tests.format.test_validation import grid_boxes, guillotine
from tests.format.test_validation import layout as validation_layout

FILE = "model-00000-of-00001.npz"


def tiling(shape: tuple, n: int, rng: random.Random) -> list:
    return guillotine(shape, n, rng) if shape else [((), ())]


def layout(arrays: dict, nfiles: int = 4, itemsize: int = 4, compressed_every: int = 0):
    return validation_layout(arrays, nfiles, itemsize, compressed_every)


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_round_trip_v2_synthetic(seed):
    rng = random.Random(seed)
    arrays = {"grid": ((40, 30), grid_boxes((40, 30), (4, 3))),
              "irregular": ((17, 9, 5), guillotine((17, 9, 5), 30, rng)),
              "scalar": ((), [((), ())]),
              "empty": ((0, 5), [((0, 0), (0, 5))]),
              "vector": ((100,), guillotine((100,), 7, rng))}
    m, chunks = layout(arrays, compressed_every=3)
    raw = dump_index(chunks)
    assert msgpack.unpackb(raw, raw=False)["version"] == 2
    got = load_index(raw, m, "ck")["model"]
    for key, rows in chunks["model"].items():
        table = got[key]
        assert isinstance(table, ChunkTable)
        assert len(table) == len(rows) and list(table) == rows and table == rows
        assert [table[i] for i in range(len(rows))] == rows and table[-1] == rows[-1] and table[1:3] == rows[1:3]
    # what the commit checks is what the loader returns
    assert check_index(index_columns(chunks), m, "ck")["model"] == got
    # re-serialising loaded tables gives the same bytes
    assert dump_index(got and {"model": got}) == raw
    assert load_index(dump_index_v1(chunks), m, "ck")["model"] == got


def test_round_trip_real_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((64, 8)).astype(np.float32), "b": np.ones(5, np.int32),
            "h": rng.standard_normal((3, 4, 5)).astype(np.float16), "s": np.float32(2.5)}
    for compress in (False, True):
        path = save_items(tmp_path / f"ck{compress}", {"model": tree}, step=1, num_shards=3, compress=compress)
        raw = (path / "index.msgpack").read_bytes()
        assert msgpack.unpackb(raw, raw=False)["version"] == 2
        ck = Checkpoint(path)
        got = ck.read_arrays("model")
        for k, v in tree.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v)
        for key, table in ck.index()["model"].items():
            assert table.overlapping((0,) * len(table.offs[0]), tuple(ck.manifest.items["model"].arrays[key].stored_shape)) \
                == list(table)


def _reseal_index(path, raw: bytes) -> None:
    (path / "index.msgpack").write_bytes(raw)
    m = json.loads((path / "manifest.json").read_text())
    m["meta_files"]["index.msgpack"] = {"size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))


@pytest.mark.parametrize("compress", [False, True])
def test_a_version_1_index_still_loads(tmp_path, compress):
    """A checkpoint whose index has the version-1 rows, written by hand as the old writer did."""
    tree = {"w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8), "b": np.arange(5, dtype=np.int64)}
    path = save_items(tmp_path / "ck", {"model": tree}, step=1, num_shards=2, compress=compress)
    index = Checkpoint(path).index()
    files: dict[str, int] = {}
    items = {it: {k: [[files.setdefault(f, len(files)), c.member, list(c.offset), list(c.shape),
                       -1 if c.data_offset is None else c.data_offset, c.nbytes, c.crc32] for f, c in rows]
                  for k, rows in by_key.items()} for it, by_key in index.items()}
    raw = msgpack.packb({"version": 1, "files": list(files), "items": items}, use_bin_type=True)
    _reseal_index(path, raw)
    ck = Checkpoint(path)
    assert ck.index() == index
    got = ck.read_arrays("model")
    for k, v in tree.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v)


# --- hostile version-2 indexes -------------------------------------------------------------

def _small():
    """Array w (4, 4) float32 in two chunks (rows 0-1 stored, rows 2-3 stored) in one file."""
    specs = {"w": ArraySpec("float32", (4, 4), "float32", (4, 4))}
    m = Manifest(step=1, items={"model": ItemRecord(specs, {})},
                 files={FILE: FileRecord(4096, "0" * 16, "model")}, meta_files={})
    rows = [(FILE, ChunkRecord("w", "w@0", (0, 0), (2, 4), 64, 32, 7)),
            (FILE, ChunkRecord("w", "w@1", (2, 0), (2, 4), 128, 32, 8))]
    return m, msgpack.unpackb(dump_index({"model": {"w": rows}}), raw=False)


def _col(name, dtype, values):
    return np.asarray(values).astype(dtype).tobytes()


def _set(name, value):
    def change(d):
        d["items"]["model"]["w"][name] = value
    return change


def _box(offs, shps):
    return np.stack([np.array(offs), np.array(shps)], axis=1).astype("<i8").tobytes()


DAMAGE = {
    "file blob too short": _set("file", b"\0\0\0\0"),
    "file blob too long": _set("file", b"\0" * 12),
    "file blob as list": _set("file", [0, 0]),
    "file blob as str": _set("file", "\0" * 8),
    "file number negative": _set("file", _col("file", "<i4", [0, -1])),
    "file number out of range": _set("file", _col("file", "<i4", [0, 1])),
    "file as int64": _set("file", _col("file", "<i8", [0, 0])),
    "box wrong rank": _set("box", _box([[0], [2]], [[2], [2]])),
    "box truncated": _set("box", _box([[0, 0], [2, 0]], [[2, 4], [2, 4]])[:-1]),
    "box as int32": _set("box", np.array([[[0, 0], [2, 4]], [[2, 0], [2, 4]]], "<i4").tobytes()),
    "box negative": _set("box", _box([[0, 0], [-2, 0]], [[2, 4], [2, 4]])),
    "box huge": _set("box", _box([[0, 0], [2 ** 62, 0]], [[2, 4], [2, 4]])),
    "box overlapping": _set("box", _box([[0, 0], [1, 0]], [[2, 4], [2, 4]])),
    "box shape huge": _set("box", _box([[0, 0], [2, 0]], [[2, 4], [2 ** 63 - 1, 4]])),
    "box gap": _set("box", _box([[0, 0], [2, 0]], [[1, 4], [2, 4]])),
    "data offset below -1": _set("data_offset", _col("", "<i8", [64, -2])),
    "data offset huge": _set("data_offset", _col("", "<i8", [64, 2 ** 63 - 1])),
    "data beyond file": _set("data_offset", _col("", "<i8", [64, 4090])),
    "data offset as uint32": _set("data_offset", _col("", "<u4", [64, 128])),
    "nbytes wrong": _set("nbytes", _col("", "<i8", [32, 31])),
    "nbytes negative": _set("nbytes", _col("", "<i8", [32, -32])),
    "nbytes huge": _set("nbytes", _col("", "<i8", [32, 2 ** 63 - 1])),
    "crc as int64": _set("crc", _col("", "<i8", [7, 8])),
    "crc short": _set("crc", b"\0" * 7),
    "member not str": _set("member", ["w@0", 5]),
    "member not list": _set("member", "w@0"),
    "member count differs": _set("member", ["w@0"]),
    "no members": _set("member", []),
    "column missing": lambda d: d["items"]["model"]["w"].pop("crc"),
    "unknown column": _set("extra", b""),
    "array as rows": lambda d: d["items"]["model"].__setitem__("w", [[0, "w@0", [0, 0], [4, 4], 0, 64, 7]]),
    "array as None": lambda d: d["items"]["model"].__setitem__("w", None),
    "version 3": lambda d: d.__setitem__("version", 3),
    "version as str": lambda d: d.__setitem__("version", "2"),
    "version true": lambda d: d.__setitem__("version", True),
    "unknown item": lambda d: d["items"].__setitem__("other", {}),
    "unknown array": lambda d: d["items"]["model"].__setitem__("v", d["items"]["model"]["w"]),
    "no arrays": lambda d: d["items"].__setitem__("model", {}),
    "file not in manifest": lambda d: d.__setitem__("files", ["other.npz"]),
    "file name unsafe": lambda d: d.__setitem__("files", ["../" + FILE]),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_v2_index_is_corrupt(name):
    m, d = _small()
    load_index(msgpack.packb(d, use_bin_type=True), m, "ck")        # the undamaged one loads
    DAMAGE[name](d)
    with pytest.raises(CorruptCheckpointError):
        load_index(msgpack.packb(d, use_bin_type=True), m, "ck")


def test_claimed_bytes_and_chunk_cap(monkeypatch):
    m, d = _small()
    raw = msgpack.packb(d, use_bin_type=True)
    m.files[FILE] = FileRecord(160, "0" * 16, "model")       # both chunks fit, in separate ranges
    load_index(raw, m, "ck")
    m.files[FILE] = FileRecord(63, "0" * 16, "model")       # each chunk fits, both do not
    d["items"]["model"]["w"]["data_offset"] = _col("", "<i8", [0, 31])
    with pytest.raises(CorruptCheckpointError, match="claim more bytes"):
        load_index(msgpack.packb(d, use_bin_type=True), m, "ck")
    monkeypatch.setattr(limits, "MAX_INDEX_CHUNKS", 1)
    with pytest.raises(CorruptCheckpointError, match="more than 1 chunks"):
        load_index(raw, m, "ck")


def test_repeated_item_array_or_column_refused():
    m, d = _small()
    p = msgpack.Packer(use_bin_type=True)
    cols = d["items"]["model"]["w"]
    head = p.pack_map_header(3) + p.pack("version") + p.pack(2) + p.pack("files") + p.pack([FILE]) + p.pack("items")
    twice_key = head + p.pack_map_header(1) + p.pack("model") + p.pack_map_header(2) + (p.pack("w") + p.pack(cols)) * 2
    with pytest.raises(CorruptCheckpointError, match="twice"):
        load_index(twice_key, m, "ck")
    col_twice = (head + p.pack_map_header(1) + p.pack("model") + p.pack_map_header(1) + p.pack("w")
                 + p.pack_map_header(len(cols) + 1) + b"".join(p.pack(k) + p.pack(v) for k, v in cols.items())
                 + p.pack("crc") + p.pack(cols["crc"]))
    with pytest.raises(CorruptCheckpointError, match="repeated column"):
        load_index(col_twice, m, "ck")
    v1_after_v2 = msgpack.packb({"files": [FILE], "items": d["items"], "version": 2}, use_bin_type=True)
    with pytest.raises(CorruptCheckpointError):       # no version before items: read as version 1
        load_index(v1_after_v2, m, "ck")


# --- overlapping -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_overlapping_equals_brute_force(seed):
    """Few candidates are tested in Python, many (> 32) with numpy: both against brute force."""
    rng = random.Random(seed)
    nd = rng.randrange(0, 4)
    shape = tuple(rng.randrange(1, 12) for _ in range(nd))
    if seed >= 8:
        shape = (rng.randrange(30, 60), rng.randrange(10, 20))
        boxes = guillotine(shape, 300, rng) if seed % 2 else grid_boxes(shape, (shape[0], 1))
    elif seed == 7:
        shape = (0, 5)
        boxes = [((0, 0), (0, 2)), ((0, 2), (0, 3))]
    elif seed % 2:
        grid = tuple(rng.choice([d for d in range(1, s + 1) if s % d == 0]) for s in shape)
        boxes = grid_boxes(shape, grid)
    else:
        boxes = tiling(shape, rng.randrange(1, 40), rng)
    m, chunks = layout({"w": (shape, boxes)})
    table = load_index(dump_index(chunks), m, "ck")["model"]["w"]
    rows = chunks["model"]["w"]
    for _ in range(200):
        lo = tuple(rng.randrange(0, s + 1) for s in shape)
        size = tuple(rng.randrange(0, s - o + 1) for o, s in zip(lo, shape))
        want = [(f, c) for f, c in rows if box_overlap(c.offset, c.shape, lo, size) is not None]
        assert table.overlapping(lo, size) == want, (lo, size)
        assert table.overlapping_rows(lo, size) == [i for i, (f, c) in enumerate(rows) if (f, c) in want]
    assert table.overlapping((0,) * len(shape), shape) == rows
    assert table.file_names() == {f for f, _ in rows}


# --- the commit's check agrees with the loader ------------------------------------------------

def mutate_row(rng: random.Random, rows: list, m: Manifest) -> list:
    i = rng.randrange(len(rows))
    f, c = rows[i]
    kind = rng.randrange(12)
    nd = len(c.offset)
    if kind == 0 and nd:
        c = ChunkRecord(c.key, c.member, tuple(o + rng.choice([-1, 1, 1000]) for o in c.offset), c.shape,
                        c.data_offset, c.nbytes, c.crc32)
    elif kind == 1 and nd:
        c = ChunkRecord(c.key, c.member, c.offset, tuple(s + rng.choice([-1, 1]) for s in c.shape),
                        c.data_offset, c.nbytes, c.crc32)
    elif kind == 2:
        c = ChunkRecord(c.key, c.member, c.offset, c.shape, c.data_offset, c.nbytes + rng.choice([-4, 4, 1]), c.crc32)
    elif kind == 3:
        c = ChunkRecord(c.key, c.member, c.offset, c.shape, rng.choice([-2, -1, 2 ** 40, m.files[f].size]),
                        c.nbytes, c.crc32)
    elif kind == 4:
        c = ChunkRecord(c.key, c.member, c.offset, c.shape, c.data_offset, c.nbytes, rng.choice([-1, 2 ** 32, 0]))
    elif kind == 5:
        c = ChunkRecord(c.key, rng.choice([None, 5, b"x", "ok"]), c.offset, c.shape, c.data_offset, c.nbytes, c.crc32)
    elif kind == 6:
        f = rng.choice(["not-listed.npz", "../x.npz", f])
    elif kind == 7 and len(rows) > 1:
        j = rng.randrange(len(rows))
        return [r for k, r in enumerate(rows) if k != j]             # a gap
    elif kind == 8 and len(rows) > 1:
        rows = list(rows)
        rows[i] = rows[(i + 1) % len(rows)]                          # duplicate over another
        return rows
    elif kind == 9:
        c = ChunkRecord(c.key, c.member, c.offset + (0,), c.shape + (1,), c.data_offset, c.nbytes, c.crc32)
    elif kind == 10:
        c = ChunkRecord(c.key, c.member, c.offset, c.shape, 2 ** 63, c.nbytes, c.crc32)   # beyond int64
    else:
        c = ChunkRecord(c.key, c.member, c.offset, c.shape, c.data_offset, c.nbytes, c.crc32)
    rows = list(rows)
    rows[i] = (f, c)
    return rows


def _outcome(fn):
    try:
        return fn()
    except CorruptCheckpointError:
        return "refused"


@pytest.mark.parametrize("seed", range(40))
def test_commit_check_agrees_with_load_index(seed):
    """For random valid and damaged chunk sets: the commit-side check (``check_index`` on
    ``index_columns``) accepts exactly what ``load_index`` of the serialised index accepts,
    and returns the same tables."""
    rng = random.Random(seed)
    arrays = {}
    for a in range(rng.randrange(1, 4)):
        nd = rng.randrange(0, 3)
        shape = tuple(rng.randrange(1, 9) for _ in range(nd))
        arrays[f"a{a}"] = (shape, tiling(shape, rng.randrange(1, 12), rng))
    m, chunks = layout(arrays, compressed_every=rng.choice([0, 2]))
    if seed % 4:
        for _ in range(rng.randrange(1, 3)):
            key = rng.choice(list(arrays))
            chunks["model"][key] = mutate_row(rng, chunks["model"][key], m)
    try:
        cols = index_columns(chunks)
        raw = dump_index(cols)
    except CorruptCheckpointError:
        return                              # nothing an index can hold: the commit refuses before writing
    commit = _outcome(lambda: check_index(cols, m, "ck"))
    load = _outcome(lambda: load_index(raw, m, "ck"))
    assert (commit == "refused") == (load == "refused"), (commit, load)
    if commit != "refused":
        assert commit == load
        if seed % 4 == 0:
            assert all(load["model"][k] == v for k, v in chunks["model"].items())
