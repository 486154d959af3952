"""S3 failures a user meets get retried or become our errors (#17.12c/d, #18.5), against
the real loopback S3 server: a connection dropped mid-body (a real proxy in front of the
server sends half a body and shuts the connection) is retried; an endpoint nobody listens
on (a closed port) is retried within ``save_timeout`` and then named in a CheckpointError;
a missing bucket is named, on ``save`` and on ``CheckpointManager`` construction. Never a
raw botocore / urllib3 exception."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from shardckpt import CheckpointError, CheckpointManager, open_checkpoint, restore, save
from shardckpt.store import s3 as s3obj
from shardckpt.testing import save_items
from tests.scenarios.s3server import FaultyProxy, free_port


def _tree() -> dict:
    rng = np.random.default_rng(7)
    return {"w": rng.standard_normal((256, 64)).astype(np.float32), "b": np.arange(33, dtype=np.int64)}


def _assert_ours(e: BaseException) -> None:
    """Our type, and nothing foreign in the chain's head."""
    assert isinstance(e, CheckpointError), type(e)
    assert not type(e).__module__.startswith(("botocore", "urllib3", "boto3"))


@pytest.fixture
def saved(s3_server):
    """A checkpoint saved straight to the server: (root path without query, its tree)."""
    root = f"s3://ckpts/errors-{uuid.uuid4().hex[:8]}"
    save_items(f"{root}/step_1?endpoint_url={s3_server.endpoint}", {"state": _tree()}, backend="threads",
               num_shards=2, json_files={"config.json": {"width": 64}})
    return root, _tree()


class FirstN:
    """A ``truncate`` predicate: the first ``n`` GETs whose path contains ``part``."""

    def __init__(self, part: str, n: int):
        self.part, self.n, self.lock = part, n, threading.Lock()

    def __call__(self, method: str, path: str) -> bool:
        with self.lock:
            if method == "GET" and self.part in path and self.n > 0:
                self.n -= 1
                return True
        return False


@pytest.mark.parametrize("part", [".npz", "manifest.json", "index.msgpack", "config.json"])
def test_a_connection_dropped_mid_body_is_retried(s3_server, saved, part):
    root, tree = saved
    with FaultyProxy(s3_server.endpoint, every=0, truncate=FirstN(part, 2)) as proxy:
        before = s3obj.STATS["retries"]
        ck = open_checkpoint(f"{root}/step_1?endpoint_url={proxy.endpoint}")
        out = ck.read_arrays("state")
        config = ck.read_config()
        assert proxy.truncated == 2, "two answers were cut mid-body"
        assert s3obj.STATS["retries"] - before >= 2
    assert config == {"width": 64}
    for k in tree:
        assert np.array_equal(out[k], tree[k])


def test_a_restore_through_a_proxy_cutting_shards_returns_the_data(s3_server, saved):
    root, tree = saved
    with FaultyProxy(s3_server.endpoint, every=0, truncate=FirstN(".npz", 3)) as proxy:
        out = restore(f"{root}/step_1?endpoint_url={proxy.endpoint}", {k: np.zeros_like(v) for k, v in tree.items()})
        assert proxy.truncated == 3
    assert all(np.array_equal(out[k], tree[k]) for k in tree)


def test_a_connection_dropped_on_every_read_becomes_our_error(s3_server, saved, monkeypatch):
    root, _ = saved
    monkeypatch.setattr(s3obj, "RETRY_SECONDS", 1.5)
    with FaultyProxy(s3_server.endpoint, every=0, truncate=lambda m, p: m == "GET" and ".npz" in p) as proxy:
        t0 = time.time()
        with pytest.raises(CheckpointError) as ei:
            open_checkpoint(f"{root}/step_1?endpoint_url={proxy.endpoint}").read_arrays("state")
        took = time.time() - t0
    _assert_ours(ei.value)
    assert proxy.truncated >= 2, "retried before giving up"
    assert took < 30
    assert "retried" in str(ei.value) or "kept failing" in str(ei.value)


def _closed_port_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"     # bound and released: nobody listens there


@pytest.mark.parametrize("save_timeout", [1.0, 3.0])
def test_an_unreachable_endpoint_is_retried_within_save_timeout_then_named(save_timeout):
    endpoint = _closed_port_endpoint()
    t0 = time.time()
    with pytest.raises(CheckpointError) as ei:
        save(f"s3://ckpts/x/step_1?endpoint_url={endpoint}", _tree(), backend="threads", save_timeout=save_timeout)
    took = time.time() - t0
    _assert_ours(ei.value)
    assert endpoint in str(ei.value) and "cannot be reached" in str(ei.value)
    assert save_timeout * 0.9 <= took < save_timeout + 15, f"retried for {took:.1f} s"


def test_an_endpoint_that_comes_back_within_save_timeout_gets_the_save(s3_server):
    """The server is unreachable for the first second of the save, then answers: the
    retries carry the save through."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    box = {}

    def start_later():
        time.sleep(1.0)
        box["proxy"] = FaultyProxy(s3_server.endpoint, every=0, port=port)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        uri = f"s3://ckpts/back-{uuid.uuid4().hex[:6]}/step_1?endpoint_url={endpoint}"
        save(uri, _tree(), backend="threads", save_timeout=30)
        t.join()
        out = restore(uri)
    finally:
        t.join()
        if "proxy" in box:
            box["proxy"].close()
    assert np.array_equal(out["w"], _tree()["w"])


def test_an_unreachable_endpoint_outside_a_save_is_named_too(monkeypatch):
    monkeypatch.setattr(s3obj, "UNREACHABLE_SECONDS", 1.0)
    endpoint = _closed_port_endpoint()
    for call in (lambda: CheckpointManager(f"s3://ckpts/run?endpoint_url={endpoint}", backend="threads"),
                 lambda: open_checkpoint(f"s3://ckpts/run/step_1?endpoint_url={endpoint}"),
                 lambda: s3obj.S3Store(f"s3://ckpts/run?endpoint_url={endpoint}").list("")):
        t0 = time.time()
        with pytest.raises(CheckpointError) as ei:
            call()
        _assert_ours(ei.value)
        assert endpoint in str(ei.value), str(ei.value)
        assert time.time() - t0 < 20


def test_a_missing_bucket_is_named_on_save_and_manager_construction(s3_server):
    q = f"?endpoint_url={s3_server.endpoint}"
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:6]}"
    calls = {
        "save": lambda: save(f"s3://{bucket}/run/step_1{q}", _tree(), backend="threads", save_timeout=20),
        "manager": lambda: CheckpointManager(f"s3://{bucket}/run{q}", backend="threads"),
        "open": lambda: open_checkpoint(f"s3://{bucket}/run/step_1{q}"),
        "restore": lambda: restore(f"s3://{bucket}/run/step_1{q}"),
    }
    for what, call in calls.items():
        t0 = time.time()
        with pytest.raises(CheckpointError) as ei:
            call()
        _assert_ours(ei.value)
        assert bucket in str(ei.value) and "no such bucket" in str(ei.value), (what, str(ei.value))
        assert time.time() - t0 < 10, f"{what}: a missing bucket is not retried"


def test_a_malformed_endpoint_is_our_error():
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint("s3://ckpts/run/step_1?endpoint_url=not-a-url")
    _assert_ours(ei.value)
