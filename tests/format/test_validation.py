"""Validation of untrusted manifests and chunk indexes (shardckpt/format.py, tree.py):

1. exact tiling for any chunk count (regular grids, near-grids, irregular layouts);
2. the manifest's own checksum (every field), legacy manifests without one;
3. dtypes and scalar leaf records outside the supported set;
4. parse memory bounded by a small multiple of the input;
5. file names (no trailing newline);
6. every kind of damage is a CorruptCheckpointError, deep JSON included.

Timings and memory ratios are printed (``-s``), not asserted tightly: the machine is shared.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest

from shardckpt import CorruptCheckpointError
from shardckpt.format import limits, tiling
from shardckpt.format.index import dump_index, load_index
from shardckpt.format.manifest import FileRecord, ItemRecord, Manifest, manifest_checksum, parse_array_spec, seal_manifest
from shardckpt.format.names import check_file_name
from shardckpt.format.shard import ChunkRecord
from shardckpt.format.tiling import check_boxes
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import dump_index_v1, save_items
from shardckpt.tree import ArraySpec, decode_scalar, real_dtype

# --- synthetic manifests and indexes ----------------------------------------------------------


def grid_boxes(shape: tuple[int, ...], grid: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes of a regular ``grid`` over ``shape`` (each dim divisible)."""
    step = [s // g for s, g in zip(shape, grid)]
    out = []
    for cell in np.ndindex(*grid):
        out.append((tuple(c * st for c, st in zip(cell, step)), tuple(step)))
    return out


def layout(arrays: dict, nfiles: int = 8, itemsize: int = 4, compressed_every: int = 0):
    """A manifest and ``{"model": {key: [(file, ChunkRecord)]}}`` for ``arrays``: key -> (shape,
    boxes); every ``compressed_every``-th chunk is a compressed one (no data offset)."""
    specs, chunks, fsize = {}, {}, {}
    for a, (key, (shape, boxes)) in enumerate(arrays.items()):
        specs[key] = ArraySpec("float32", tuple(shape), "float32", tuple(shape))
        rows = []
        for i, (off, shp) in enumerate(boxes):
            f = f"model-{(a + i) % nfiles:05d}-of-{nfiles:05d}.npz"
            nb = int(np.prod(shp, dtype=np.int64)) * itemsize
            at = fsize.get(f, 0)
            do = None if compressed_every and i % compressed_every == 0 else at
            rows.append((f, ChunkRecord(key, f"{key}@{i}", tuple(off), tuple(shp), do, nb, (i * 2654435761) & 0xFFFFFFFF)))
            fsize[f] = at + nb + 64
        chunks[key] = rows
    files = {f: FileRecord(s, "0" * 16, "model") for f, s in fsize.items()}
    return Manifest(step=1, items={"model": ItemRecord(specs, {})}, files=files, meta_files={}), {"model": chunks}


def synth(arrays: dict[str, tuple[tuple[int, ...], list]], nfiles: int = 8, itemsize: int = 4, v1: bool = False):
    """A manifest and index (version 2; ``v1``: the row layout): ``arrays`` maps key -> (shape, boxes)."""
    m, chunks = layout(arrays, nfiles, itemsize)
    return m, (dump_index_v1 if v1 else dump_index)(chunks)


def dup_and_miss(boxes: list, dup: int, miss: int) -> list:
    """Chunk ``miss`` replaced by a copy of chunk ``dup``: same count, same total volume."""
    out = list(boxes)
    out[miss] = boxes[dup]
    return out


def arrays_of(boxes: list, nd: int) -> tuple[np.ndarray, np.ndarray]:
    offs = np.array([b[0] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
    shps = np.array([b[1] for b in boxes], dtype=np.int64).reshape(len(boxes), nd)
    return offs, shps


def brute_exact(shape, boxes) -> bool:
    count = np.zeros(shape, dtype=np.int64)
    for off, shp in boxes:
        if any(o < 0 or s < 0 or o + s > g for o, s, g in zip(off, shp, shape)):
            return False
        count[tuple(slice(o, o + s) for o, s in zip(off, shp))] += 1
    return bool((count == 1).all()) and (count.size > 0 or len(boxes) > 0)


def guillotine(shape: tuple[int, ...], n: int, rng: random.Random) -> list:
    """A random irregular exact tiling: split random boxes at random positions."""
    boxes = [((0,) * len(shape), tuple(shape))]
    tries = 0
    while len(boxes) < n and tries < 50 * n:
        tries += 1
        i = rng.randrange(len(boxes))
        off, shp = boxes[i]
        k = rng.randrange(len(shape))
        if shp[k] < 2:
            continue
        cut = rng.randrange(1, shp[k])
        a = (off, shp[:k] + (cut,) + shp[k + 1:])
        b = (off[:k] + (off[k] + cut,) + off[k + 1:], shp[:k] + (shp[k] - cut,) + shp[k + 1:])
        boxes[i] = a
        boxes.append(b)
    return boxes


@pytest.fixture(params=["auto", "paint", "sweep"])
def path(request, monkeypatch):
    """Force the near-grid (paint) or the irregular (sweep) algorithm."""
    if request.param == "paint":
        monkeypatch.setattr(tiling, "GRID_CELLS_PER_BOX", 1 << 20)
    elif request.param == "sweep":
        monkeypatch.setattr(tiling, "GRID_CELLS_PER_BOX", 0)
        monkeypatch.setattr(tiling, "GRID_MIN_CELLS", 0)
    return request.param


# --- 1. exact tiling --------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(10,), (2, 5), (100, 50), (500, 200)], ids=["10", "10-2d", "5000", "100000"])
def test_duplicated_and_missing_chunk_is_refused(grid):
    shape = tuple(g * 3 for g in grid)
    boxes = grid_boxes(shape, grid)
    n = len(boxes)
    m, raw = synth({"w": (shape, boxes)})
    t = time.perf_counter()
    assert set(load_index(raw, m, "ck")["model"]) == {"w"}
    print(f"\n{n} chunks: valid index loaded in {time.perf_counter() - t:.3f} s")
    rng = random.Random(n)
    for dup, miss in [(0, n - 1), (n - 1, 0), (rng.randrange(n), rng.randrange(n))]:
        if dup == miss:
            continue
        m, raw = synth({"w": (shape, dup_and_miss(boxes, dup, miss))})
        t = time.perf_counter()
        with pytest.raises(CorruptCheckpointError, match=r"'w'.*overlap"):
            load_index(raw, m, "ck")
        print(f"{n} chunks: duplicate {dup} over {miss} refused in {time.perf_counter() - t:.3f} s")


def test_duplicated_and_missing_chunk_among_many_arrays():
    arrays = {f"layer.{i}": ((40, 30), grid_boxes((40, 30), (4, 3))) for i in range(50)}
    m, raw = synth(arrays)
    load_index(raw, m, "ck")
    arrays["layer.37"] = ((40, 30), dup_and_miss(arrays["layer.37"][1], 2, 5))
    m, raw = synth(arrays)
    with pytest.raises(CorruptCheckpointError, match=r"layer\.37"):
        load_index(raw, m, "ck")


def test_duplicate_and_missing_chunk_in_a_real_checkpoint(tmp_path):
    tree = {"w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8), "b": np.ones(5, np.float32)}
    path = save_items(tmp_path / "ck", {"model": tree}, step=1, num_shards=2)
    ck = Checkpoint(path)
    assert len(ck.index()["model"]["w"]) >= 1
    d = msgpack.unpackb(dump_index_v1(ck.index()), raw=False)                        # rows (version 1)
    d["items"]["model"]["w"] = [[0, "w@0", [0, 0], [32, 8], 0, 32 * 8 * 4, 0]] * 2    # twice the top half
    raw = msgpack.packb(d, use_bin_type=True)
    manifest = Checkpoint(path).manifest
    manifest.files = {f: FileRecord(1 << 30, r.xxh3_64, r.item) for f, r in manifest.files.items()}
    with pytest.raises(CorruptCheckpointError, match=r"'w'.*overlap"):
        load_index(raw, manifest, str(path))


@pytest.mark.parametrize("seed", range(6))
def test_irregular_layouts_exact(path, seed):
    """Random guillotine tilings are accepted; damaged ones (a box moved, grown and its
    neighbour shrunk to keep the volume, a duplicate) are refused; brute force agrees."""
    rng = random.Random(seed)
    shape = [(37,), (23, 19), (9, 11, 7), (5, 4, 6, 3)][seed % 4]
    boxes = guillotine(shape, rng.randrange(2, 60), rng)
    offs, shps = arrays_of(boxes, len(shape))
    check_boxes("w", shape, offs, shps, "ck")
    for trial in range(30):
        bad = [list(map(list, b)) for b in boxes]
        i = rng.randrange(len(bad))
        k = rng.randrange(len(shape))
        kind = trial % 3
        if kind == 0:           # move a box by one (stays inside if possible)
            bad[i][0][k] += rng.choice([-1, 1])
        elif kind == 1:         # grow one, shrink another: equal volume, overlap + gap
            j = rng.randrange(len(bad))
            bad[i][1][k] += 1
            bad[j][1][k] -= 1
        else:                   # duplicate
            j = rng.randrange(len(bad))
            bad[j] = [list(bad[i][0]), list(bad[i][1])]
        bad = [(tuple(o), tuple(s)) for o, s in bad]
        exact = brute_exact(shape, bad) if all(s >= 0 for _, sh in bad for s in sh) else False
        offs, shps = arrays_of(bad, len(shape))
        if exact:
            check_boxes("w", shape, offs, shps, "ck")
        else:
            with pytest.raises(CorruptCheckpointError, match="'w'"):
                check_boxes("w", shape, offs, shps, "ck")


def test_irregular_overlap_with_equal_volume(path):
    """Two 2x2 squares overlapping in one element, and two 1-element gaps elsewhere."""
    shape = (4, 4)
    boxes = [((0, 0), (2, 2)), ((1, 1), (2, 2)), ((0, 2), (1, 2)), ((3, 0), (1, 4)),
             ((1, 3), (2, 1))]
    assert sum(np.prod(s) for _, s in boxes) == 16 and not brute_exact(shape, boxes)
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        check_boxes("w", shape, *arrays_of(boxes, 2), "ck")


def test_brick_wall_and_row_split_layouts(path):
    """Near-grids: a brick wall (rows offset by half a brick), shards split by rows."""
    bricks = []
    for r in range(20):
        shift = 2 if r % 2 else 0
        cols = [0] + list(range(shift or 4, 40, 4)) + [40]
        cols = sorted(set(cols))
        bricks += [((r, a), (1, b - a)) for a, b in zip(cols, cols[1:])]
    check_boxes("w", (20, 40), *arrays_of(bricks, 2), "ck")
    split = []
    for off, shp in grid_boxes((30, 16), (3, 4)):
        rows = [4, 3, 3] if off[1] % 8 == 0 else [5, 5]
        at = off[0]
        for r in rows:
            split.append(((at, off[1]), (r, shp[1])))
            at += r
    check_boxes("w", (30, 16), *arrays_of(split, 2), "ck")
    split[3] = split[4]
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        check_boxes("w", (30, 16), *arrays_of(split, 2), "ck")


@pytest.mark.parametrize("box", [((-1, 0), (2, 4)), ((0, 0), (5, 4)), ((4, 0), (1, 4)), ((0, -4), (4, 8)),
                                 ((2 ** 62, 0), (1, 1)), ((0, 0), (2 ** 62, 4)), ((2, 0), (-2, 4))])
def test_boxes_outside_the_array(box):
    boxes = [box, ((0, 0), (4, 4))]
    with pytest.raises(CorruptCheckpointError, match="outside the array"):
        check_boxes("w", (4, 4), *arrays_of(boxes, 2), "ck")
    m, raw = synth({"w": ((4, 4), [((0, 0), (4, 4))])}, v1=True)
    d = msgpack.unpackb(raw, raw=False)
    d["items"]["model"]["w"][0][2:4] = [list(box[0]), list(box[1])]
    with pytest.raises(CorruptCheckpointError):
        load_index(msgpack.packb(d), m, "ck")


def test_empty_and_zero_size_arrays():
    check_boxes("w", (0, 5), *arrays_of([((0, 0), (0, 5))], 2), "ck")
    check_boxes("w", (0, 5), *arrays_of([((0, 0), (0, 2)), ((0, 2), (0, 3))], 2), "ck")
    with pytest.raises(CorruptCheckpointError, match="at least one chunk"):
        check_boxes("w", (0, 5), *arrays_of([], 2), "ck")
    check_boxes("w", (), np.zeros((1, 0), np.int64), np.zeros((1, 0), np.int64), "ck")   # a scalar
    with pytest.raises(CorruptCheckpointError, match="cover 2 of 1"):
        check_boxes("w", (), np.zeros((2, 0), np.int64), np.zeros((2, 0), np.int64), "ck")


def test_32_dimensions_and_33_refused():
    shape = (2,) * 12 + (1,) * 20
    boxes = grid_boxes(shape, shape)           # 4,096 chunks of one element each
    m, raw = synth({"w": (shape, boxes)})
    t = time.perf_counter()
    load_index(raw, m, "ck")
    print(f"\n32-dim array in 4,096 chunks validated in {time.perf_counter() - t:.3f} s")
    m, raw = synth({"w": (shape, dup_and_miss(boxes, 7, 4000))})
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        load_index(raw, m, "ck")
    assert limits.MAX_NDIM == 32
    spec = {"dtype": "float32", "stored_dtype": "float32", "shape": [1] * 33, "stored_shape": [1] * 33}
    with pytest.raises(CorruptCheckpointError, match="shape"):
        parse_array_spec("w", spec, "ck")
    parse_array_spec("w", {**spec, "shape": [1] * 32, "stored_shape": [1] * 32}, "ck")
    # an irregular 32-dim layout takes the sweep or paint path, exact as well
    shape = (3,) * 4 + (1,) * 28
    boxes = guillotine(shape, 40, random.Random(5))
    check_boxes("w", shape, *arrays_of(boxes, 32), "ck")
    boxes[1] = boxes[2]
    with pytest.raises(CorruptCheckpointError, match="'w'.*(overlap|cover)"):
        check_boxes("w", shape, *arrays_of(boxes, 32), "ck")
    boxes = guillotine(shape, 40, random.Random(5))
    same = [(i, j) for i in range(40) for j in range(i) if boxes[i][1] == boxes[j][1]]
    i, j = same[0]
    boxes[i] = boxes[j]          # equal volume: only the overlap test can tell
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        check_boxes("w", shape, *arrays_of(boxes, 32), "ck")


@pytest.mark.parametrize("n_side", [100, 316])
def test_validation_time_is_near_linear(n_side):
    """10^4 and 10^5 chunks of one array, and 10^5 over 100 arrays: printed, not asserted."""
    shape = (n_side * 4, n_side * 2)
    boxes = grid_boxes(shape, (n_side, n_side))
    offs, shps = arrays_of(boxes, 2)
    t = time.perf_counter()
    check_boxes("w", shape, offs, shps, "ck")
    t_check = time.perf_counter() - t
    m, raw = synth({"w": (shape, boxes)})
    t = time.perf_counter()
    load_index(raw, m, "ck")
    print(f"\n{len(boxes)} chunks: check_boxes {t_check:.3f} s, load_index {time.perf_counter() - t:.3f} s "
          f"({len(raw)} index bytes)")


def test_irregular_layout_cost_is_bounded(monkeypatch):
    """A layout needing more comparisons than the budget is refused, not validated for minutes."""
    boxes = [((0, i), (1, 1)) for i in range(3000)]          # one slab; a sweep on dim 0 is quadratic
    monkeypatch.setattr(tiling, "GRID_CELLS_PER_BOX", 0)
    monkeypatch.setattr(tiling, "GRID_MIN_CELLS", 0)
    check_boxes("w", (1, 3000), *arrays_of(boxes, 2), "ck")    # the sweep picks dim 1: linear
    monkeypatch.setattr(tiling, "SWEEP_BUDGET", 10)
    boxes = guillotine((64, 64), 200, random.Random(3))
    with pytest.raises(CorruptCheckpointError, match="too irregular"):
        check_boxes("w", (64, 64), *arrays_of(boxes, 2), "ck")


# --- 2. manifest integrity ------------------------------------------------------------------------


def _save(tmp_path: Path) -> Path:
    tree = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "lr": 0.125, "name": "run-a", "n": 7}
    return save_items(tmp_path / "ck", {"model": tree}, step=1000, num_shards=2,
                           json_files={"config.json": {"model_config": None, "step": 1000}},
                           metrics={"loss": 0.5, "acc": 0.75})


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old, new", [
    ('"step": 1000', '"step": 1200'),
    ('"loss": 0.5', '"loss": 0.7'),
    ('"value": 0.125', '"value": 0.135'),
    ('"value": 7', '"value": 5'),
    ('"value": "run-a"', '"value": "run-c"'),
    ('"host_count": 1', '"host_count": 3'),
    ('"created": "2', '"created": "3'),
    ('"float32"', '"float64"'),
    ('"index": "index.msgpack"', '"index": "index.msgpacj"'),
])
def test_manifest_field_changes_are_caught(tmp_path, old, new):
    path = _save(tmp_path)
    Checkpoint(path).read_arrays("model")
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(_replace_once(text, old, new))
    with pytest.raises(CorruptCheckpointError, match="manifest.json|checksum"):
        Checkpoint(path).read_arrays("model")


def test_manifest_file_size_and_checksum_changes_are_caught(tmp_path):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    for section in ("files", "meta_files"):
        for name in d[section]:
            for field, change in (("size", lambda v: v + 256), ("xxh3_64", lambda v: "f" + v[1:])):
                bad = json.loads(json.dumps(d))
                bad[section][name][field] = change(bad[section][name][field])
                (path / "manifest.json").write_text(json.dumps(bad, indent=1))
                with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
                    Checkpoint(path)


def test_every_single_bit_flip_in_the_manifest(tmp_path):
    """Every bit of every byte: refused, or (whitespace, an equivalent escape) the very same
    manifest. Never a different step, metric, leaf or file record."""
    path = _save(tmp_path)
    raw = (path / "manifest.json").read_bytes()
    want = Manifest.loads(raw, "ck").to_json()
    refused = same = 0
    for pos in range(len(raw)):
        for bit in range(8):
            b = bytearray(raw)
            b[pos] ^= 1 << bit
            try:
                got = Manifest.loads(bytes(b), "ck").to_json()
            except CorruptCheckpointError:
                refused += 1
                continue
            assert got == want, (pos, bit)
            same += 1
    print(f"\n{len(raw) * 8} bit flips of manifest.json: {refused} refused, {same} harmless")
    assert refused > 0.9 * len(raw) * 8


def test_checksum_roundtrip_and_canonical_form(tmp_path):
    path = _save(tmp_path)
    raw = (path / "manifest.json").read_bytes()
    d = json.loads(raw)
    assert d["checksum"].startswith("xxh3-64:") and d["checksum"] == manifest_checksum(d)
    m = Manifest.loads(raw, "ck")
    assert m.dumps() == Manifest.loads(m.dumps(), "ck").dumps()
    # insensitive to formatting and key order, as defined
    compact = json.dumps(dict(reversed(list(d.items()))), separators=(",", ":")).encode()
    assert Manifest.loads(compact, "ck").to_json() == m.to_json()


def test_legacy_manifest_without_checksum_loads(tmp_path):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    del d["checksum"]
    (path / "manifest.json").write_text(json.dumps(d, indent=1))
    got = Checkpoint(path).read_arrays("model")
    assert got["w"].shape == (4, 6)
    # but a manifest without a checksum and with a field the legacy writer never wrote is not
    for extra in ("chdcksum", "checksun", "extra"):
        (path / "manifest.json").write_text(json.dumps({**d, extra: "xxh3-64:" + "0" * 16}))
        with pytest.raises(CorruptCheckpointError, match="no checksum"):
            Checkpoint(path)


@pytest.mark.parametrize("value", ["xxh3-64:" + "0" * 15, "XXH3-64:" + "0" * 16, "sha256:" + "0" * 16,
                                   "xxh3-64:" + "0" * 16 + "\n", 123, None, ["xxh3-64:" + "0" * 16]])
def test_malformed_checksum_field(tmp_path, value):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    d["checksum"] = value
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        Manifest.loads(json.dumps(d).encode(), "ck")


# --- 3. dtypes and scalar records -----------------------------------------------------------------


BAD_DTYPES = ["S4", "U1", "O", "V3", "object", "str", "void", "bytes", "datetime64", "timedelta64", "M8", "m8",
              "i4,i4", "(2,)i4", "float32\n", " float32", "garbage!!", "", "a" * 200, "S99999999999999999999",
              "U2147483647", "float32,", "<f4", 5, 4.0, None, True, ["f4"], {"names": ["a"], "formats": ["f4"]}]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=repr)
@pytest.mark.parametrize("field", ["dtype", "stored_dtype"])
def test_unsupported_dtypes_are_corrupt(dtype, field):
    spec = {"dtype": "float32", "stored_dtype": "float32", "shape": [4], "stored_shape": [4], field: dtype}
    with pytest.raises(CorruptCheckpointError, match="'layers.0.w'"):
        parse_array_spec("layers.0.w", spec, "ck")


@pytest.mark.parametrize("dtype", ["S4", "U1", "O", "V3", 7, "nonsense"])
def test_unsupported_dtype_in_a_sealed_manifest(tmp_path, dtype):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    d["items"]["model"]["arrays"]["w"]["dtype"] = dtype
    (path / "manifest.json").write_text(json.dumps(seal_manifest(d)))
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        Checkpoint(path).read_arrays("model")


def test_supported_dtypes_still_parse():
    for name in ["bool", "int8", "uint64", "float16", "float32", "float64", "complex64", "complex128",
                 "bfloat16", "float8_e4m3fn", "float8_e5m2", "int4", "uint4"]:
        real_dtype(name)


@pytest.mark.parametrize("record", [
    {"type": "complex", "value": 1}, {"type": 5, "value": 1}, {"type": None}, {"type": ["int"]}, {}, [], "x", 3,
    None, {"type": "int", "value": 1.5}, {"type": "int", "value": True}, {"type": "bool", "value": 1},
    {"type": "str", "value": 3}, {"type": "float", "value": "1e5"}, {"type": "float", "value": [1.0]},
    {"type": "float", "value": True}, {"type": "float", "value": None},
], ids=repr)
def test_unknown_scalar_records_are_corrupt(tmp_path, record):
    with pytest.raises(CorruptCheckpointError, match="'lr'"):
        decode_scalar("lr", record)
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    d["items"]["model"]["scalars"]["lr"] = record
    with pytest.raises(CorruptCheckpointError, match="'lr'"):
        Manifest.loads(json.dumps(seal_manifest(d)).encode(), "ck")


def test_scalar_records_as_written_still_decode():
    assert decode_scalar("k", {"type": "float", "value": 0.5}) == 0.5
    assert np.isnan(decode_scalar("k", {"type": "float", "value": "nan"}))
    assert decode_scalar("k", {"type": "float", "value": "-inf"}) == float("-inf")
    assert decode_scalar("k", {"type": "int", "value": 2 ** 70}) == 2 ** 70
    assert decode_scalar("k", {"type": "none"}) is None
    assert decode_scalar("k", {"type": "bool", "value": False}) is False


# --- 4. memory --------------------------------------------------------------------------------------


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_parse_memory_is_a_small_multiple_of_the_input():
    arrays = {f"layers.{a}.mlp.kernel": ((400, 320), grid_boxes((400, 320), (50, 20))) for a in range(100)}
    m, raw = synth(arrays, nfiles=64)          # 10^5 chunks
    index_peak = _peak(lambda: load_index(raw, m, "ck"))
    specs = {f"layers.{i}.block.{j}.kernel": ArraySpec("bfloat16", (4096, 4096), "uint16", (4096, 4096))
             for i in range(400) for j in range(50)}
    scalars = {f"step.{i}": {"type": "int", "value": i} for i in range(20000)}
    files = {f"model-{i:05d}-of-20000.npz": FileRecord(1 << 30, "0123456789abcdef", "model") for i in range(20000)}
    big = Manifest(step=1, items={"model": ItemRecord(specs, scalars)}, files=files, meta_files={},
                   metrics={f"m{i}": i * 0.5 for i in range(10000)}).dumps()
    manifest_peak = _peak(lambda: Manifest.loads(big, "ck"))
    print(f"\nindex: {len(raw) / 1e6:.1f} MB, 10^5 chunks, parse peak {index_peak / 1e6:.1f} MB "
          f"({index_peak / len(raw):.1f}x); manifest: {len(big) / 1e6:.1f} MB, parse peak "
          f"{manifest_peak / 1e6:.1f} MB ({manifest_peak / len(big):.1f}x)")
    assert index_peak < 12 * len(raw)
    assert manifest_peak < 30 * len(big)
    # worst cases at the caps fit a host comfortably
    assert limits.MAX_INDEX_BYTES <= 256 << 20 and limits.MAX_MANIFEST_BYTES <= 64 << 20


DENSE = {
    "1-key dicts in metrics": lambda n: {"metrics": {f"m{i}": {"a": {}} for i in range(n)}},
    "empty lists": lambda n: {"metrics": {"x": [[] for _ in range(4 * n)]}},
}


@pytest.mark.parametrize("shape", sorted(DENSE))
def test_dense_hostile_manifests_are_refused_before_parsing(shape):
    """A sealed manifest of tiny JSON containers (~24 MiB) asked for >1 GiB to parse: its
    parse cost is estimated from byte counts first and refused at a few x the input, before
    ``json.loads`` runs."""
    doc = {"format": "shardckpt", "version": 1, "step": 1, "created": "", "writers": {}, "host_count": 1,
           "metrics": {}, "items": {}, "files": {}, "meta_files": {}, "index": "index.msgpack"}
    doc.update(DENSE[shape](400_000))
    raw = json.dumps(seal_manifest(doc), separators=(",", ":")).encode()
    assert len(raw) > limits.JSON_COST_SLACK // 4
    peak = _peak(lambda: pytest.raises(CorruptCheckpointError, Manifest.loads, raw, "ck"))
    assert peak < 4 * len(raw), f"{peak / len(raw):.1f}x the input before refusing"
    with pytest.raises(CorruptCheckpointError, match="implausibly dense"):
        Manifest.loads(raw, "ck")


def test_a_legit_manifest_of_many_scalar_leaves_still_parses():
    """The bound leaves room for what a save can legitimately write: 150,000 int leaves (a
    data-loader state) cost ~12x their text to parse, under the cap."""
    scalars = {f"loader.{i}": {"type": "int", "value": i} for i in range(150_000)}
    raw = Manifest(step=1, items={"data": ItemRecord({}, scalars)}, files={}, meta_files={}).dumps()
    peak = _peak(lambda: Manifest.loads(raw, "ck"))
    assert peak < limits.MAX_JSON_COST_FACTOR * len(raw) + limits.JSON_COST_SLACK


def test_size_caps(tmp_path):
    m, raw = synth({"w": ((4,), [((0,), (4,))])})
    with pytest.raises(CorruptCheckpointError, match="over the limit"):
        load_index(raw + b"\0" * (limits.MAX_INDEX_BYTES + 1 - len(raw)), m, "ck")
    with pytest.raises(CorruptCheckpointError, match="over the limit"):
        Manifest.loads(b" " * (limits.MAX_MANIFEST_BYTES + 1), "ck")
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    d["meta_files"]["index.msgpack"]["size"] = limits.MAX_INDEX_BYTES + 1
    with pytest.raises(CorruptCheckpointError, match="over the limit"):
        Manifest.loads(json.dumps(seal_manifest(d)).encode(), "ck")


# --- 5. file names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.npz\n", "model.npz\r", "\nmodel.npz", "v0123abcd/model.npz\n",
                                  "model\n.npz", "model.npz\x00", "model.npz ", "model.npz\n\n"])
def test_file_names_with_line_breaks_are_refused(name):
    with pytest.raises(CorruptCheckpointError, match="file name"):
        check_file_name(name, "ck")
    assert check_file_name("model.npz", "ck") == "model.npz"
    assert check_file_name("v0123abcd/model.npz", "ck")


def test_trailing_newline_in_a_sealed_manifest(tmp_path):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    name = sorted(d["files"])[0]
    d["files"][name + "\n"] = d["files"].pop(name)
    with pytest.raises(CorruptCheckpointError, match="file name"):
        Manifest.loads(json.dumps(seal_manifest(d)).encode(), "ck")


# --- 6. every kind of damage is CorruptCheckpointError ---------------------------------------------


def _nested(depth: int):
    v: object = 1
    for i in range(depth):
        v = [v] if i % 2 else {"a": v}
    return v


@pytest.mark.parametrize("depth", [65, 700, 1000, 5000, 100000])
@pytest.mark.parametrize("sealed", [True, False])
def test_deeply_nested_metric(tmp_path, depth, sealed):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    del d["checksum"]
    raw = '{"deep": ' + "[" * depth + "1" + "]" * depth + "}"
    text = json.dumps(d).replace('"metrics": {', '"metrics": {"deep": ' + "[" * depth + "1" + "]" * depth + ", ", 1)
    assert raw
    if sealed:   # a sealed one: the checksum is computed over the nested value as well
        try:
            doc = json.loads(text)
            text = json.dumps(seal_manifest(doc))
        except RecursionError:
            pass   # too deep for json itself: the unsealed text is what the loader sees
    with pytest.raises(CorruptCheckpointError):
        Manifest.loads(text.encode(), "ck")


def test_shallow_nested_metric_is_accepted():
    m = Manifest(step=1, items={}, files={}, meta_files={}, metrics={"deep": _nested(40)})
    assert Manifest.loads(m.dumps(), "ck").metrics == {"deep": _nested(40)}
    with pytest.raises(Exception, match="nested deeper"):
        Manifest(step=1, items={}, files={}, meta_files={}, metrics={"deep": _nested(700)}).dumps()


def _index(rows, key="w", files=None, order=("version", "files", "items")):
    files = files if files is not None else ["model-00000-of-00001.npz"]
    parts = {"version": 1, "files": files, "items": {"model": {key: rows}}}
    return msgpack.packb({k: parts[k] for k in order}, use_bin_type=True)


GOOD_ROW = [0, "w@0", [0, 0], [4, 4], 0, 64, 7]


def _manifest_for_index():
    specs = {"w": ArraySpec("float32", (4, 4), "float32", (4, 4))}
    return Manifest(step=1, items={"model": ItemRecord(specs, {})},
                    files={"model-00000-of-00001.npz": FileRecord(4096, "0" * 16, "model")}, meta_files={})


def _with(i, v):
    row = list(GOOD_ROW)
    row[i] = v
    return row


@pytest.mark.parametrize("raw", [
    _index([GOOD_ROW[:6]]), _index([GOOD_ROW + [1]]), _index([tuple(GOOD_ROW)[:0]]), _index(["row"]), _index([None]),
    _index([_with(0, 1)]), _index([_with(0, -1)]), _index([_with(0, "0")]), _index([_with(0, True)]),
    _index([_with(1, 5)]), _index([_with(1, None)]),
    _index([_with(2, [0.0, 0])]), _index([_with(2, [True, 0])]), _index([_with(2, ["0", 0])]),
    _index([_with(2, [0])]), _index([_with(2, [0, 0, 0])]), _index([_with(2, 0)]), _index([_with(2, [2 ** 63, 0])]),
    _index([_with(2, [2 ** 64 - 1, 0])]), _index([_with(3, [4, 2 ** 63 + 1])]), _index([_with(3, [-4, -4])]),
    _index([_with(4, -2)]), _index([_with(4, 2 ** 63)]), _index([_with(4, 4090)]), _index([_with(4, 1.5)]),
    _index([_with(5, 63)]), _index([_with(5, -64)]), _index([_with(5, 2 ** 64 - 1)]), _index([_with(5, "64")]),
    _index([_with(6, -1)]), _index([_with(6, 2 ** 32)]), _index([_with(6, 1.0)]),
    _index([GOOD_ROW, GOOD_ROW]), _index([]), _index(GOOD_ROW), _index({"a": 1}), _index([GOOD_ROW], key="v"),
    _index([GOOD_ROW], files=["../x.npz"]), _index([GOOD_ROW], files=["model-00000-of-00001.npz\n"]),
    _index([GOOD_ROW], files="model-00000-of-00001.npz"), _index([GOOD_ROW], files=[]),
    _index([GOOD_ROW]) + b"\x00", _index([GOOD_ROW])[:-3], b"", b"\xc1", msgpack.packb([1, 2]),
    msgpack.packb({"files": ["model-00000-of-00001.npz"]}), msgpack.packb({"items": {}}),
    msgpack.packb({1: 2}), msgpack.packb({"files": [], "items": {"nope": {}}}),
])
def test_index_damage_is_corrupt(raw):
    with pytest.raises(CorruptCheckpointError):
        load_index(raw, _manifest_for_index(), "ck")


def test_index_good_rows_and_field_order():
    m = _manifest_for_index()
    for order in (("version", "files", "items"), ("items", "files", "version"), ("files", "items")):
        got = load_index(_index([GOOD_ROW], order=order), m, "ck")
        (f, c), = got["model"]["w"]
        assert f == "model-00000-of-00001.npz" and c == ChunkRecord("w", "w@0", (0, 0), (4, 4), 0, 64, 7)
    split = [[0, "w@0", [0, 0], [2, 4], -1, 32, 1], [0, "w@1", [2, 0], [2, 4], 32, 32, 2]]
    got = load_index(_index(split), m, "ck")["model"]["w"]
    assert [c.data_offset for _, c in got] == [None, 32]


def test_duplicate_keys_in_the_index_are_refused():
    p = msgpack.Packer(use_bin_type=True)
    raw = (p.pack_map_header(2) + p.pack("files") + p.pack(["model-00000-of-00001.npz"]) + p.pack("items")
           + p.pack_map_header(1) + p.pack("model") + p.pack_map_header(2) + p.pack("w") + p.pack([GOOD_ROW])
           + p.pack("w") + p.pack([GOOD_ROW]))
    with pytest.raises(CorruptCheckpointError, match="twice"):
        load_index(raw, _manifest_for_index(), "ck")


def test_chunk_count_cap(monkeypatch):
    """Parse memory is per chunk (~0.4-0.7 KiB): the count is capped as well as the bytes."""
    arrays = {f"a{i}": ((8, 8), grid_boxes((8, 8), (2, 2))) for i in range(3)}
    m, raw = synth(arrays)
    load_index(raw, m, "ck")
    monkeypatch.setattr(limits, "MAX_INDEX_CHUNKS", 11)
    with pytest.raises(CorruptCheckpointError, match="more than 11 chunks"):
        load_index(raw, m, "ck")


@pytest.mark.parametrize("change", [
    lambda d, f: d["files"][f].__setitem__("item", ["model"]),
    lambda d, f: d["files"][f].__setitem__("writer", "thread-0"),
    lambda d, f: d["files"][f].__setitem__("size", 2 ** 70),
    lambda d, f: d["files"][f].__setitem__("size", True),
    lambda d, f: d.__setitem__("created", 5),
    lambda d, f: d.__setitem__("transaction", ["t"]),
    lambda d, f: d.__setitem__("writers", []),
    lambda d, f: d.__setitem__("step", 1.5),
    lambda d, f: d["items"]["model"].__setitem__("arrays", []),
    lambda d, f: d["items"]["model"]["arrays"]["w"].__setitem__("shape", "4,6"),
    lambda d, f: d["items"]["model"]["arrays"]["w"].pop("stored_shape"),
    lambda d, f: d.pop("files"),
])
def test_sealed_manifest_type_confusion_is_corrupt(tmp_path, change):
    path = _save(tmp_path)
    d = json.loads((path / "manifest.json").read_text())
    change(d, sorted(d["files"])[0])
    with pytest.raises(CorruptCheckpointError):
        Manifest.loads(json.dumps(seal_manifest(d)).encode(), "ck")
