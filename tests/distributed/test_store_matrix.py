"""One save transaction for every store and every process group (#10).

The matrix {local directory, S3 on moto's standalone server on 127.0.0.1} x {one process;
the Ray coordinator with 2 writer actors; 2 Ray-actor participants}: bit-exact restore, one
manifest, and every shard written by the process that held it (the pid and node each
writer reports are kept in the manifest). ``jax.distributed`` participants are in
tests/distributed/test_multihost.py (local store) and below for S3 (the same shared-storage protocol).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import ray

from shardckpt import Checkpoint
from shardckpt.testing import save_items

STORES = ["local", "s3"]


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((512, 256)).astype(np.float32),      # dense, like Adam moments
            "b": rng.standard_normal((256,)).astype(np.float16),
            "i": np.arange(1000, dtype=np.int64), "n": {"s": 3}}


def _uri(kind: str, tmp_path, s3_server, name: str = "step_1") -> str:
    if kind == "local":
        return str(tmp_path / name)
    return f"s3://ckpts/matrix-{uuid.uuid4().hex[:8]}/{name}?endpoint_url={s3_server.endpoint}"


def _check(uri: str, tree: dict) -> Checkpoint:
    ck = Checkpoint(uri)
    out = ck.read_arrays("state")
    for k in ("w", "b", "i"):
        assert out[k].dtype == tree[k].dtype and np.array_equal(out[k], tree[k]), k
    restored, report = ck.restore("state", tree)
    assert report.complete and restored["n"]["s"] == 3
    return ck


@pytest.mark.parametrize("store", STORES)
def test_one_process(store, tmp_path, s3_server):
    uri = _uri(store, tmp_path, s3_server)
    tree = _tree()
    save_items(uri, {"state": tree}, backend="threads", num_shards=3)
    ck = _check(uri, tree)
    assert {f.writer["pid"] for f in ck.manifest.files.values()} == {os.getpid()}
    assert len(ck.manifest.files) == 3


@pytest.mark.parametrize("store", STORES)
def test_ray_coordinator_with_two_writer_actors(store, tmp_path, s3_server):
    from shardckpt.executors.ray import RayExecutor
    uri = _uri(store, tmp_path, s3_server)
    tree = _tree(1)
    save_items(uri, {"state": tree}, backend="ray", num_writers=2, num_shards=4)
    ck = _check(uri, tree)
    writers = {f.writer["writer"] for f in ck.manifest.files.values()}
    pids = {f.writer["pid"] for f in ck.manifest.files.values()}
    assert len(writers) == 2 and os.getpid() not in pids, "the writer actors wrote, not the driver"
    assert all(f.writer["backend"] == "ray" for f in ck.manifest.files.values())
    actor_pids = {d["pid"] for d in ray.get([h.identity.remote() for h, _, _ in RayExecutor.get(2).actors()])}
    assert pids <= actor_pids
    # restore through the reader actors too
    out = Checkpoint(uri).restore("state", tree, executor=RayExecutor.get(2))[0]
    assert np.array_equal(out["w"], tree["w"])


@ray.remote(num_cpus=0)
class Holder:
    """A participant (as a Ray Train rank is): holds the state and saves its share."""

    def save(self, uri: str, rank: int, count: int, tree: dict) -> tuple[str, int]:
        from shardckpt.testing import save_items as save
        return str(save(uri, {"state": tree}, backend="ray", process_index=rank, process_count=count,
                        save_timeout=120)), os.getpid()


@pytest.mark.parametrize("store", STORES)
def test_two_ray_actor_participants(store, tmp_path, s3_server):
    uri = _uri(store, tmp_path, s3_server)
    holders = [Holder.remote() for _ in range(2)]
    results = ray.get([h.save.remote(uri, i, 2, _tree(2)) for i, h in enumerate(holders)], timeout=300)
    assert len({r[0] for r in results}) == 1
    ck = _check(uri, _tree(2))
    assert ck.manifest.transaction
    by_pid = {f.writer["pid"] for f in ck.manifest.files.values()}
    assert by_pid == {pid for _, pid in results}, "each participant wrote its own share, straight to the store"
