"""What the committer may skip when it validates an index, and what it may not (#20).

* an array stored as one chunk is checked on Python integers (``IndexValidator._one_row``):
  it accepts exactly what the full numpy checks accept (for random valid and damaged rows),
  and a refusal names the fault as the full checks do;
* rows this process validated itself (``ValidatedRows``, the base's rows an incremental
  save carries) are not checked row by row again, but the combination still is: the spec
  must be the manifest's (else the rows are checked in full), the array listed once, and
  their bytes count in the claims per file;
* a ``Manifest.encode`` gives the bytes of ``dumps`` and the manifest ``loads`` reads
  from them.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from shardckpt import CorruptCheckpointError
from shardckpt.format import index as index_mod
from shardckpt.format.index import ValidatedRows, check_index, dump_index, index_columns, load_index
from shardckpt.format.manifest import FileRecord, ItemRecord, Manifest
from shardckpt.format.shard import ChunkRecord
from shardckpt.tree import ArraySpec
from tests.format.test_index_columns import mutate_row
from tests.format.test_validation import layout


def _outcome(fn):
    try:
        return fn()
    except CorruptCheckpointError as e:
        return ("refused", str(e))


@pytest.mark.parametrize("seed", range(60))
def test_one_chunk_fast_path_accepts_exactly_what_the_full_checks_accept(seed, monkeypatch):
    rng = random.Random(seed)
    arrays = {}
    for a in range(rng.randrange(1, 5)):
        nd = rng.randrange(0, 4)
        shape = tuple(rng.choice([0, 1, 3, 7]) if rng.random() < 0.2 else rng.randrange(1, 9) for _ in range(nd))
        arrays[f"a{a}"] = (shape, [((0,) * nd, shape)])
    m, chunks = layout(arrays, compressed_every=rng.choice([0, 1]))
    for _ in range(rng.randrange(0, 3)):
        key = rng.choice(list(arrays))
        chunks["model"][key] = mutate_row(rng, chunks["model"][key], m)
    try:
        cols = index_columns(chunks)
    except CorruptCheckpointError:
        return
    fast = _outcome(lambda: check_index(cols, m, "ck"))
    monkeypatch.setattr(index_mod.IndexValidator, "_one_row", lambda self, key, spec, c: None)
    full = _outcome(lambda: check_index(cols, m, "ck"))
    assert fast == full


def _validated(shape=(8, 4)):
    """A manifest with one array in one file, and its rows as validated by a load."""
    m, chunks = layout({"w": (shape, [((0, 0), shape)])}, nfiles=1)
    tables = load_index(dump_index(chunks), m, "ck")
    table = tables["model"]["w"]
    return m, chunks, table


def test_validated_rows_skip_the_row_checks_but_not_the_combination(monkeypatch):
    m, chunks, table = _validated()
    spec = m.items["model"].arrays["w"]
    calls = []
    monkeypatch.setattr(index_mod.IndexValidator, "check_rows",
                        lambda self, *a: calls.append(a) or pytest.fail("validated rows checked again"))
    got = check_index(index_columns({"model": {"w": ValidatedRows(table, spec, table.files)}}), m, "ck")
    assert got["model"]["w"] == table and not calls


def test_validated_rows_under_another_spec_are_checked_in_full():
    m, chunks, table = _validated()
    other = ArraySpec("float32", (4, 8), "float32", (4, 8))
    m.items["model"].arrays["w"] = other          # the array changed shape: the carried rows do not tile it
    with pytest.raises(CorruptCheckpointError):
        check_index(index_columns({"model": {"w": ValidatedRows(table, ArraySpec("float32", (8, 4), "float32", (8, 4)),
                                                               table.files)}}), m, "ck")


def test_new_rows_claiming_a_carried_files_bytes_are_refused():
    """A carried file holds what its validated rows claim; a new array claiming the same
    bytes again exceeds the file, as in a full validation."""
    m, chunks, table = _validated()
    (fname, rec), = chunks["model"]["w"]
    m.items["model"].arrays["v"] = ArraySpec("float32", (8, 4), "float32", (8, 4))
    twin = ChunkRecord("v", "v@0", (0, 0), (8, 4), rec.data_offset, rec.nbytes, rec.crc32)
    spec = m.items["model"].arrays["w"]
    cols = index_columns({"model": {"w": ValidatedRows(table, spec, table.files), "v": [(fname, twin)]}})
    with pytest.raises(CorruptCheckpointError, match="claim more bytes"):
        check_index(cols, m, "ck")


def test_validated_rows_of_a_file_not_carried_are_refused():
    m, chunks, table = _validated()
    spec = m.items["model"].arrays["w"]
    with pytest.raises(CorruptCheckpointError, match="not carried"):
        index_columns({"model": {"w": ValidatedRows(table, spec, [None] * len(table.files))}})


def test_validated_rows_never_travel():
    m, chunks, table = _validated()
    with pytest.raises(TypeError):
        pickle.dumps(ValidatedRows(table, m.items["model"].arrays["w"], table.files))


def test_encode_is_dumps_and_loads():
    specs = {f"k{i}": ArraySpec("bfloat16", (i, 3), "uint16", (i, 3)) for i in range(5)}
    m = Manifest(step=7, items={"model": ItemRecord(specs, {"lr": {"type": "float", "value": 0.5}},
                                                    {"k1": "xxh3-64:0123456789abcdef"})},
                 files={"model-00000-of-00001.npz": FileRecord(10, "0" * 16, "model", {"host": "h"})},
                 meta_files={"index.msgpack": FileRecord(3, "1" * 16)}, metrics={"loss": 1.5, "n": [1, {"a": 2}]},
                 created="2026-12-03T00:00:00.000+00:00")
    raw, parsed = m.encode("ck")
    assert raw == m.dumps()
    assert parsed == Manifest.loads(raw, "ck")
    assert np.all([len(line) < 400 for line in raw.decode().splitlines()])


@pytest.mark.parametrize("seed", range(20))
def test_one_row_encoding_is_the_numpy_encoding(seed, monkeypatch):
    rng = random.Random(seed)
    nd = rng.randrange(0, 4)
    shape = tuple(rng.randrange(0, 9) for _ in range(nd))
    m, chunks = layout({"a": (shape, [((0,) * nd, shape)])}, compressed_every=rng.choice([0, 1]))
    cols = index_columns(chunks)
    fast = dump_index(cols)
    monkeypatch.setattr(index_mod, "_encode_one", lambda c: None)
    assert dump_index(cols) == fast


@pytest.mark.parametrize("seed", range(40))
def test_one_row_columns_are_the_general_columns(seed, monkeypatch):
    """``index_columns`` of one-chunk arrays: the same columns (or the same refusal) as the
    general path, for valid and damaged records (numpy ints, bools, huge ints, ranks)."""
    rng = random.Random(seed)
    arrays = {f"a{i}": (s, [((0,) * len(s), s)]) for i, s in enumerate(
        tuple(rng.randrange(0, 9) for _ in range(rng.randrange(0, 4))) for _ in range(3))}
    m, chunks = layout(arrays)
    key = rng.choice(list(arrays))
    (f, c), = chunks["model"][key]
    odd = rng.choice([None, np.int64(3), True, 1 << 63, -1, 2.0, "x"])
    if odd is not None:
        field = rng.choice(["nbytes", "crc32", "data_offset", "offset"])
        value = (odd,) * len(c.offset) if field == "offset" else odd
        chunks["model"][key] = [(f, ChunkRecord(**{**c.__dict__, field: value}))]

    def outcome():
        try:
            cols = index_columns(chunks)
        except CorruptCheckpointError as e:
            return str(e)
        return {k: (cols.files, v.fidx.tolist(), v.offs.tolist(), v.shps.tolist(), v.doff.tolist(), v.nbytes.tolist(),
                    v.crc.tolist(), v.members, v.offs.shape, v.shps.shape) for k, v in cols.items["model"].items()}
    fast = outcome()
    monkeypatch.setattr(index_mod, "_one_row_columns", lambda row, fmap: None)
    assert outcome() == fast
