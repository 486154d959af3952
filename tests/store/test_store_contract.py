"""The Store contract, run against every Store: the local POSIX store, the in-memory store
(``shardckpt.testing``), S3 on the loopback moto server and a local pyarrow filesystem.

What every layer above relies on: staged files are invisible until ``publish``; a publish
replaces the previous version whole (no file of the old version is read through the new
manifest, unreferenced ones go); an aborted or crashed save is a leftover the store itself
names; ``retire`` makes a checkpoint stop being one; reads are bounded and checked. Then a
whole save, restore and ``verify`` run through each, and a damaged file is reported by
``verify`` the same way on every store.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from shardckpt import CorruptCheckpointError, restore, verify
from shardckpt.errors import CheckpointError
from shardckpt.format.manifest import MANIFEST
from shardckpt.store.registry import open_store
from shardckpt.testing import save_items


def _unique(request) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name) + f"-{time.monotonic_ns()}"


def _memory(request, tmp_path):
    return f"memory://contract-{_unique(request)}"


def _local(request, tmp_path):
    return str(tmp_path / "root")


def _s3(request, tmp_path):
    server = request.getfixturevalue("s3_server")
    return f"s3://ckpts/contract/{_unique(request)}?endpoint_url={server.endpoint}"


def _arrow(request, tmp_path):
    pafs = pytest.importorskip("pyarrow.fs")
    (tmp_path / "arrow").mkdir()
    request.node.arrow_fs = pafs.SubTreeFileSystem(str(tmp_path / "arrow"), pafs.LocalFileSystem())
    return "arrow://bucket/root"


ROOTS = {"local": _local, "memory": _memory, "s3": _s3, "arrow": _arrow}


@pytest.fixture(params=sorted(ROOTS))
def root(request, tmp_path):
    """(store root URI, pyarrow filesystem or None) of each kind of store."""
    uri = ROOTS[request.param](request, tmp_path)
    return uri, getattr(request.node, "arrow_fs", None)


def _store(root):
    uri, fs = root
    store = open_store(uri, fs)
    store.prepare_parent()
    return store


def _child(root, name: str) -> str:
    uri, _ = root
    base, _, query = uri.partition("?")
    return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")


def _stage_one(store, final: str, txn: str, files: dict[str, bytes]):
    staging = store.stage(final, txn)
    for name, data in files.items():
        written = staging.write_bytes(name, data)
        assert written.size == len(data)
    return staging


MANIFEST_STUB = b'{"not": "read by the store"}'


def test_staged_files_are_invisible_until_published(root):
    store = _store(root)
    staging = _stage_one(store, "ck", "a" * 32, {"x.bin": b"1234"})
    assert store.size(f"ck/{MANIFEST}") is None
    staging.publish(MANIFEST_STUB)
    assert store.read_bytes(f"ck/{MANIFEST}", 1 << 20) == MANIFEST_STUB
    assert store.size(f"ck/{staging.stored_name('x.bin')}") == 4
    with store.open(f"ck/{staging.stored_name('x.bin')}") as src:
        buf = bytearray(2)
        src.readinto(1, memoryview(buf))
        assert bytes(buf) == b"23"
        with pytest.raises(CorruptCheckpointError):
            src.readinto(3, memoryview(bytearray(2)))     # past the end: our error, never short data
    assert store.is_dir("ck") and not store.is_dir("nothing-here")


def test_reads_are_bounded(root):
    store = _store(root)
    _stage_one(store, "ck", "b" * 32, {"big.bin": b"x" * 100}).publish(MANIFEST_STUB)
    name = [e.name for e in store.list("ck") if e.name != MANIFEST][0]
    path = f"ck/{name}/big.bin" if store.is_dir(f"ck/{name}") else "ck/big.bin"
    with pytest.raises(CorruptCheckpointError):
        store.read_bytes(path, 10)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("ck/missing.bin", 10)


def test_discard_and_abort_leave_nothing_visible(root):
    store = _store(root)
    staging = _stage_one(store, "ck", "c" * 32, {"x.bin": b"abc"})
    staging.mark_aborted("test")
    assert staging.aborted()
    assert store.size(f"ck/{MANIFEST}") is None
    for lo in store.leftovers(lambda n: n == "ck", time.time()):
        assert lo.action in ("remove", "keep")


def test_a_crashed_save_is_a_leftover_the_store_names(root):
    store = _store(root)
    # never published, never aborted; named as a save names its shards (on object stores, an
    # object of any other name in a version prefix is the user's and stays: #17.12b)
    _stage_one(store, "step_1", "d" * 32, {"x-00000-of-00001.npz": b"abc"})
    plan = store.leftovers(lambda n: n == "step_1", time.time() + 10 * 24 * 3600)
    assert plan, "the unpublished save is not reported as a leftover"
    assert {lo.checkpoint for lo in plan} == {"step_1"}
    for lo in plan:
        if lo.action == "remove":
            store.remove_leftover(lo.name)
    assert not [lo for lo in store.leftovers(lambda n: n == "step_1", time.time() + 10 * 24 * 3600)
                if lo.action == "remove"]


def test_retire_makes_it_stop_being_a_checkpoint(root):
    store = _store(root)
    _stage_one(store, "ck", "e" * 32, {"x.bin": b"abc"}).publish(MANIFEST_STUB)
    store.retire("ck")
    assert store.size(f"ck/{MANIFEST}") is None
    with pytest.raises(FileNotFoundError):
        store.retire("ck")


def _tree(v: float) -> dict:
    return {"w": np.full((48, 16), v, np.float32), "b": np.arange(16, dtype=np.int64) + int(v)}


def test_a_whole_save_restore_and_resave_through_the_store(root):
    uri, fs = root
    path = _child(root, "step_1")
    save_items(path, {"state": _tree(1.0)}, num_shards=2, backend="threads", filesystem=fs)
    save_items(path, {"state": _tree(2.0)}, num_shards=2, backend="threads", filesystem=fs)   # replaces it
    if fs is None:
        out = restore(path)
        assert np.array_equal(out["w"], _tree(2.0)["w"]) and np.array_equal(out["b"], _tree(2.0)["b"])
        report = verify(path)
        assert report.ok, report.problems
    store = _store(root)
    listed = {e.name for e in store.list("step_1")}
    assert MANIFEST in listed


def test_verify_reports_a_damaged_file_alike_on_every_store(root):
    uri, fs = root
    if fs is not None:
        pytest.skip("verify takes a path or URI; the pyarrow case is covered through its store above")
    path = _child(root, "ck")
    save_items(path, {"state": _tree(3.0)}, num_shards=1, backend="threads")
    store, name = open_store(uri), "ck"
    from shardckpt import open_checkpoint
    shard = sorted(open_checkpoint(path).manifest.files)[0]
    data = bytearray(store.read_bytes(f"{name}/{shard}", 1 << 30))
    data[len(data) // 2] ^= 0xFF
    _overwrite(store, f"{name}/{shard}", bytes(data))
    report = verify(path)
    assert not report.ok
    assert any(shard in p and ("CRC-32" in p or "xxh3" in p) for p in report.problems), report.problems
    with pytest.raises(CheckpointError):
        restore(path)


def _overwrite(store, name: str, data: bytes) -> None:
    """Damage a stored file in place, as a failing disk or a stranger would."""
    if hasattr(store, "put"):
        store.put(name, data)
    else:
        p = store.path(name)
        p.chmod(0o644)
        p.write_bytes(data)
