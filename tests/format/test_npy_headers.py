""".npy headers are parsed by our own reader (#17.9), never through ``ast``: numpy's reader
runs the header dictionary through ``ast.literal_eval``, which CPython 3.11 cannot run in
several threads at once (cpython#106905: "AST constructor recursion depth mismatch" on a
healthy compressed checkpoint restored with threads). The reader accepts exactly what numpy
writes, for every dtype a checkpoint holds, and refuses everything else with our error."""

from __future__ import annotations

import ast
import io
import threading

import ml_dtypes
import numpy as np
import pytest

from shardckpt import CorruptCheckpointError, restore, save
from shardckpt.format.shard import read_npy_header


def _header(arr: np.ndarray, version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(buf, d)
    return buf.getvalue()


DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "float32", "float64", "complex64", "complex128", ">f4", ">i8", "V2"]
SHAPES = [(), (0,), (1,), (7,), (3, 4), (2, 0, 5), (1,) * 32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fortran", [False, True])
def test_every_header_numpy_writes_parses_as_numpy_reads_it(dtype, shape, fortran):
    arr = np.zeros(shape, dtype=np.dtype(dtype), order="F" if fortran else "C")
    for version in ((1, 0), (2, 0)):
        raw = _header(arr, version)
        ref = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        f = io.BytesIO(raw)
        np.lib.format.read_magic(f)
        want = ref(f)
        got = read_npy_header(io.BytesIO(raw), "m")
        assert got[:3] == (tuple(want[0]), want[1], want[2]) and got[3] == len(raw)


BAD = {
    "object dtype": b"{'descr': '|O', 'fortran_order': False, 'shape': (3,), }",
    "structured": b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }",
    "python code": b"{'descr': __import__('os').system('true'), 'fortran_order': False, 'shape': (3,), }",
    "missing shape": b"{'descr': '<f4', 'fortran_order': False, }",
    "repeated key": b"{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
    "unknown key": b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1, }",
    "negative dim": b"{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",
    "float dim": b"{'descr': '<f4', 'fortran_order': False, 'shape': (3.0,), }",
    "65 dims": b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"1, " * 65 + b"), }",
    "fortran not bool": b"{'descr': '<f4', 'fortran_order': 0, 'shape': (3,), }",
    "not a dict": b"['<f4', False, (3,)]",
    "trailing junk": b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } junk",
    "datetime": b"{'descr': '<M8[s]', 'fortran_order': False, 'shape': (3,), }",
    "unicode": b"{'descr': '<U4', 'fortran_order': False, 'shape': (3,), }",
}


def _framed(body: bytes, version: int = 1) -> bytes:
    body = body + b" " * ((-len(body) - 11) % 64) + b"\n"
    width = 2 if version == 1 else 4
    return b"\x93NUMPY" + bytes([version, 0]) + len(body).to_bytes(width, "little") + body


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_other_header_is_refused_with_our_error(case):
    with pytest.raises(CorruptCheckpointError):
        read_npy_header(io.BytesIO(_framed(BAD[case])), "member")


@pytest.mark.parametrize("raw", [b"", b"\x93NUMP", b"\x93NUMPY\x09\x00", b"\x93NUMPY\x01\x00\xff\xff",
                                 b"\x93NUMPY\x01\x00\x10\x00{'descr'", b"NOTNUMPY\x01\x00\x00\x00"])
def test_truncated_or_foreign_magic_is_refused(raw):
    with pytest.raises(CorruptCheckpointError):
        read_npy_header(io.BytesIO(raw), "member")


def test_loads_never_go_through_ast(tmp_path, monkeypatch):
    """A compressed checkpoint and the original single-file layout load with numpy's header
    reader and ``ast.literal_eval`` made to fail: neither is used."""
    tree = {f"w{i}": np.arange(i + 3, dtype=np.float32) for i in range(20)}
    tree["b"] = np.arange(6, dtype=ml_dtypes.bfloat16)
    save(tmp_path / "c", tree, compress=True, num_shards=3)

    def forbidden(*a, **k):
        raise AssertionError("ast / numpy's header reader used")
    monkeypatch.setattr(ast, "literal_eval", forbidden)
    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", forbidden)
    monkeypatch.setattr(np.lib.format, "read_array_header_2_0", forbidden)
    out = restore(tmp_path / "c")
    assert all(np.array_equal(out[k], v) for k, v in tree.items())


def test_compressed_restores_in_many_threads_at_once(tmp_path):
    """What failed with ``SystemError`` on CPython 3.11: many restores of a healthy
    compressed checkpoint running at the same time, each on several reader threads."""
    tree = {f"layer{i:03d}": np.full((16, 8), i, np.float32) for i in range(120)}
    save(tmp_path / "c", tree, compress=True, num_shards=6)
    errors = []

    def run():
        try:
            for _ in range(3):
                out = restore(tmp_path / "c", num_writers=4)
                assert all(np.array_equal(out[k], v) for k, v in tree.items())
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
