"""Object-store faults and races against the real loopback S3 server: a server that answers
some requests with 503 SlowDown or drops connections (retried, the save succeeds), and loads
racing re-saves and retention (never CorruptCheckpointError, never a mix of versions)."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from shardckpt import CheckpointManager, CheckpointNotFoundError, CorruptCheckpointError, open_checkpoint
from shardckpt.store import s3 as s3obj
from shardckpt.testing import save_items
from tests.scenarios.reliability import STRESS
from tests.scenarios.s3server import FaultyProxy


def _tree(version: int) -> dict:
    rng = np.random.default_rng(version)
    return {"w": rng.standard_normal((300, 200)).astype(np.float32), "v": np.full(7, version, np.int64)}


@pytest.mark.parametrize("drop", [False, True], ids=["503-slowdown", "connection-dropped"])
def test_flaky_server_requests_are_retried_and_the_save_succeeds(s3_server, drop, monkeypatch):
    monkeypatch.setattr(s3obj, "PART_BYTES", 5 << 20)          # several multipart parts per file
    with FaultyProxy(s3_server.endpoint, every=5, drop=drop) as proxy:
        uri = f"s3://ckpts/flaky-{uuid.uuid4().hex[:6]}/step_1?endpoint_url={proxy.endpoint}"
        tree = {"big": np.random.default_rng(0).standard_normal((3 << 20) // 4 * 4).astype(np.float32),
                **_tree(1)}
        before = s3obj.STATS["retries"]
        save_items(uri, {"state": tree}, backend="threads", num_shards=2)
        out = open_checkpoint(uri).read_arrays("state")
        assert proxy.failed >= 3, "the proxy failed requests"
        assert s3obj.STATS["retries"] - before >= proxy.failed - 1
    for k in tree:
        assert np.array_equal(out[k], tree[k])


def test_loads_racing_resaves_and_retention_never_see_damage(s3_server):
    """A writer re-saves one step and a manager (max_to_keep=1) keeps saving new steps while
    loaders read: every load returns one whole version or CheckpointNotFoundError."""
    root = f"s3://ckpts/race-{uuid.uuid4().hex[:6]}"
    q = f"?endpoint_url={s3_server.endpoint}"
    fixed = f"{root}/fixed{q}"
    save_items(fixed, {"state": _tree(0)}, backend="threads")
    mgr = CheckpointManager(root + q, max_to_keep=1, backend="threads")
    save_items(mgr.step_path(0), {"state": _tree(0)}, step=0, backend="threads")
    stop = threading.Event()
    errors: list[BaseException] = []
    loads = {"ok": 0, "not_found": 0}
    target = 500 if STRESS else 200

    def writer():
        v = 1
        while not stop.is_set():
            try:
                save_items(fixed, {"state": _tree(v)}, backend="threads")
                save_items(mgr.step_path(v), {"state": _tree(v)}, step=v, backend="threads")
                mgr.apply_retention()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            v += 1

    def reader(i):
        while not stop.is_set() and sum(loads.values()) < target:
            try:
                path = fixed if i % 2 else mgr.step_path(mgr.latest_step)
                from shardckpt.loading.checkpoint import read_consistently
                out = read_consistently(lambda: open_checkpoint(path).read_arrays("state"))
                version = int(out["v"][0])
                assert np.array_equal(out["w"], _tree(version)["w"]), "a mix of two versions"
                loads["ok"] += 1
            except CheckpointNotFoundError:
                loads["not_found"] += 1
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                stop.set()

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads[1:]:
        t.start()
    threads[0].start()
    for t in threads[1:]:
        t.join(600)
    stop.set()
    threads[0].join(120)
    assert not [e for e in errors if isinstance(e, CorruptCheckpointError)], errors[:3]
    assert not errors, errors[:3]
    assert sum(loads.values()) >= target and loads["ok"] >= target // 2, loads
