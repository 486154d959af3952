"""The per-node chunk cache (``executors/node_share.py``) never serves what a direct read
would refuse, never keeps an error, never hangs, and never turns its own failure into a
failed restore (#17.1). Against the session's real Ray: the node's real cache actor, real
checkpoints on disk; a store whose opens fail or block in the cache actor's process only
(``FlakyStore``) stands for a disk or network that fails on that node.

1. Entries are keyed by verification: bytes a ``verify=False`` restore cached are read and
   checked again for a ``verify=True`` restore (one byte XORed: CorruptCheckpointError, as
   without the cache), and verified entries serve both.
2. A missing file or any other error on the cache's read is handed to the requests waiting
   for it and kept nowhere: the next restore reads again.
3. A cache that cannot serve (its read raised an OSError, its actor was killed mid-restore)
   makes the worker read the store directly: the restore returns the right bytes, never a
   raw RayTaskError / ActorDiedError, and no wait outlives the failure."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from shardckpt import Checkpoint, CorruptCheckpointError
from shardckpt.executors.node_share import NAMESPACE, NodeSharedReader
from shardckpt.store.local import LocalStore
from shardckpt.testing import save_items

ROWS, COLS = 64, 48


def _tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((ROWS, COLS)).astype(np.float32),
            "b": np.arange(500, dtype=np.int64) * (seed + 3)}


class FlakyStore(LocalStore):
    """A local store whose shard opens, in any process but the test's own (the node's cache
    actor), block while ``control/block`` exists (touching ``control/entered``) and fail
    while a ``control/fail-<errno>`` file holds a count above zero."""

    def __init__(self, root, control, driver_pid: int):
        super().__init__(root)
        self.control, self.driver_pid = str(control), driver_pid

    def open(self, name: str):
        if os.getpid() != self.driver_pid and name.endswith(".npz"):
            ctl = Path(self.control)
            if (ctl / "block").exists():
                (ctl / "entered").touch()
                t0 = time.time()
                while (ctl / "block").exists() and time.time() - t0 < 60:
                    time.sleep(0.02)
            for f in sorted(ctl.glob("fail-*")):
                left = int(f.read_text() or 0)
                if left > 0:
                    f.write_text(str(left - 1))
                    code = int(f.name.split("-")[1])
                    if code == errno.ENOENT:
                        raise FileNotFoundError(code, "injected: not there yet", name)
                    raise OSError(code, f"injected: {os.strerror(code)}", name)
        return super().open(name)


# The cache actor unpickles FlakyStore: by value, as this module is not importable there.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cache_actor(tmp_path_factory):
    """The node's cache actor, started by a first restore (``_stats`` asks it)."""
    path, _ = _saved(tmp_path_factory.mktemp("warm"), seed=1)
    _restore(Checkpoint(path), verify=True)


def _cache():
    node = ray.get_runtime_context().get_node_id()
    return ray.get_actor(f"shardckpt-chunk-cache-{node[:16]}", namespace=NAMESPACE)


def _stats() -> dict:
    return ray.get(_cache().stats.remote())


def _saved(tmp_path, seed: int, name: str = "step_1") -> tuple[Path, dict]:
    tree = _tree(seed)
    save_items(tmp_path / name, {"state": tree}, backend="threads", num_shards=2)
    return tmp_path / name, tree


def _restore(ck: Checkpoint, verify: bool) -> dict:
    target = {k: np.zeros_like(v) for k, v in _tree(0).items()}
    out, report = ck.restore("state", target, executor=NodeSharedReader(), verify=verify)
    assert report.complete
    return out


def _flip_a_byte(path: Path, values: np.ndarray) -> None:
    """XOR one byte inside ``values``' stored bytes (same size: only a checksum can tell)."""
    raw = values.tobytes()
    for shard in sorted(path.glob("*.npz")):
        data = bytearray(shard.read_bytes())
        at = data.find(raw[:256])
        if at >= 0:
            data[at + 101] ^= 0x40
            shard.write_bytes(bytes(data))
            return
    raise AssertionError("array bytes not found in any shard")


def _wrong(out: dict, tree: dict) -> int:
    return sum(int(np.sum(out[k] != tree[k])) for k in tree)


@pytest.fixture
def flaky(tmp_path):
    """(checkpoint opened through a FlakyStore, its tree, control directory)."""
    control = tmp_path / "control"
    control.mkdir()
    _, tree = _saved(tmp_path, seed=int(time.monotonic_ns() % 1000))
    store = FlakyStore(tmp_path, control, os.getpid())
    return Checkpoint.at(store, "step_1"), tree, control


@pytest.mark.parametrize("key", ["w", "b"])
def test_unverified_bytes_never_reach_a_verifying_restore(tmp_path, key):
    path, tree = _saved(tmp_path, seed=11 if key == "w" else 12)
    _flip_a_byte(path, tree[key])
    ck = Checkpoint(path)
    damaged = _restore(ck, verify=False)           # fills the cache with the damaged bytes
    assert _wrong(damaged, tree) == 1
    with pytest.raises(CorruptCheckpointError):
        _restore(ck, verify=True)
    assert _wrong(_restore(ck, verify=False), tree) == 1   # what an unverified restore asked for
    with pytest.raises(CorruptCheckpointError):
        _restore(Checkpoint(path), verify=True)           # and again: nothing verified was cached


def test_a_verifying_restore_first_then_unverified_ones(tmp_path):
    path, tree = _saved(tmp_path, seed=13)
    _flip_a_byte(path, tree["w"])
    ck = Checkpoint(path)
    with pytest.raises(CorruptCheckpointError):
        _restore(ck, verify=True)
    assert _wrong(_restore(ck, verify=False), tree) == 1
    with pytest.raises(CorruptCheckpointError):
        _restore(ck, verify=True)


def test_verified_entries_serve_both_and_unverified_ones_are_read_again_once(tmp_path):
    path, tree = _saved(tmp_path, seed=14)
    ck = Checkpoint(path)
    nbytes = sum(v.nbytes for v in tree.values())
    reads = []
    for verify in (False, True, True, False):
        before = _stats()["bytes"]
        out = _restore(ck, verify=verify)
        reads.append(_stats()["bytes"] - before)
        assert _wrong(out, tree) == 0
    assert reads[0] >= nbytes, "the unverified restore read the file"
    assert reads[1] >= nbytes, "the verifying restore read it again, to check it"
    assert reads[2:] == [0, 0], "the verified entries served both kinds"


def test_a_missing_file_on_the_caches_read_is_not_cached(flaky):
    ck, tree, control = flaky
    (control / f"fail-{errno.ENOENT}").write_text("1")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        _restore(ck, verify=True)
    assert _wrong(_restore(ck, verify=True), tree) == 0, "the next restore read again"


def test_an_os_error_on_the_caches_read_falls_back_and_never_hangs(flaky):
    ck, tree, control = flaky
    (control / f"fail-{errno.EIO}").write_text("1")
    t0 = time.time()
    assert _wrong(_restore(ck, verify=True), tree) == 0, "read directly, right bytes"
    assert _wrong(_restore(ck, verify=True), tree) == 0, "the next restore is not stuck on a wait"
    assert time.time() - t0 < 60
    before = _stats()["bytes"]
    assert _wrong(_restore(ck, verify=True), tree) == 0
    assert _stats()["bytes"] == before, "once the disk answered, the cache kept the bytes"


def test_a_cache_that_always_fails_still_restores_directly(flaky):
    ck, tree, control = flaky
    (control / f"fail-{errno.EIO}").write_text("1000")
    for _ in range(3):
        assert _wrong(_restore(ck, verify=True), tree) == 0
    assert _stats()["pending"] == 0, "no read left pending"


def _start(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, box


def _wait_for(cond, what: str, seconds: float = 30) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < seconds, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_failed_read_releases_every_request_waiting_for_it(flaky):
    ck, tree, control = flaky
    (control / "block").touch()
    (control / f"fail-{errno.ENOENT}").write_text("1")
    a, box_a = _start(lambda: _restore(ck, verify=True))
    _wait_for(lambda: (control / "entered").exists(), "the first read to start")
    b, box_b = _start(lambda: _restore(ck, verify=True))
    _wait_for(lambda: _stats()["waiting"] >= 1, "the second restore to wait for the first's read")
    t0 = time.time()
    (control / "block").unlink()                    # the first read now fails (ENOENT)
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive(), "a waiter was never released"
    assert time.time() - t0 < 30
    for box in (box_a, box_b):
        assert isinstance(box.get("error"), CorruptCheckpointError), box
    assert _wrong(_restore(ck, verify=True), tree) == 0, "nothing of the failure was kept"


def test_a_cache_actor_dying_mid_restore_falls_back_to_the_store(flaky):
    ck, tree, control = flaky
    (control / "block").touch()
    a, box_a = _start(lambda: _restore(ck, verify=True))
    _wait_for(lambda: (control / "entered").exists(), "the cache's read to start")
    b, box_b = _start(lambda: _restore(ck, verify=False))
    _wait_for(lambda: _stats()["waiting"] >= 1, "a second restore to wait on the cache")
    ray.kill(_cache())
    (control / "block").unlink()
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive()
    for box in (box_a, box_b):
        assert "error" not in box, repr(box.get("error"))
        assert _wrong(box["out"], tree) == 0
    assert _wrong(_restore(ck, verify=True), tree) == 0, "and later restores work (a new cache actor)"


def test_an_unverified_restore_waiting_on_a_failed_verified_read_reads_itself(flaky, tmp_path):
    """A verifying read refusing damaged bytes fails the verifying restore; an unverified
    restore that waited on it gets what it asked for (the bytes, unchecked), not that error."""
    ck, tree, control = flaky
    _flip_a_byte(tmp_path / "step_1", tree["w"])
    (control / "block").touch()
    a, box_a = _start(lambda: _restore(ck, verify=True))
    _wait_for(lambda: (control / "entered").exists(), "the verifying read to start")
    b, box_b = _start(lambda: _restore(ck, verify=False))
    _wait_for(lambda: _stats()["waiting"] >= 1, "the unverified restore to wait for it")
    (control / "block").unlink()
    a.join(60)
    b.join(60)
    assert isinstance(box_a.get("error"), CorruptCheckpointError), box_a
    assert "error" not in box_b, repr(box_b.get("error"))
    assert _wrong(box_b["out"], tree) == 1
