"""Remote checkpoints against a real S3-compatible HTTP server on loopback (moto's
standalone server in a subprocess): commit by one manifest PUT, versioned re-saves that
keep the old checkpoint whole until the new one is committed, retention deletes, and
ranged reads that fetch only the chunks a target needs."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3(s3_server):
    """A boto3 client of the loopback server; plain ``s3://ckpts/...`` URIs reach it through
    AWS_ENDPOINT_URL (boto3's own rule) while this module runs."""
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint
    yield s3_server.client()
    if saved is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = saved


def _keys(client, prefix=""):
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="ckpts", Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((256, 64)).astype(np.float32),
            "b": rng.standard_normal((64,)).astype(np.float16),
            "n": {"i": np.arange(7, dtype=np.int64)}}


def test_model_and_optimizer_round_trip_bit_exactly(s3):
    from shardckpt import load_model, load_optimizer, save_model, save_optimizer
    from shardckpt.lm.training import make_tx, new_run, state_digest
    model, optimizer = new_run()
    uri = "s3://ckpts/api/m"
    assert save_model(uri, model, num_shards=2) == uri
    save_optimizer(uri, optimizer)
    m2, cfg = load_model(uri)
    o2 = load_optimizer(uri, m2, make_tx())
    assert state_digest(m2, o2) == state_digest(model, optimizer)
    assert cfg["hidden_size"] == model.config.hidden_size
    keys = _keys(s3, "api/m/")
    assert "api/m/manifest.json" in keys
    assert all(k == "api/m/manifest.json" or k.split("/")[2].startswith("v") for k in keys)


def test_resave_switches_versions_and_only_then_drops_the_old_objects(s3):
    from shardckpt import open_checkpoint
    from shardckpt.testing import save_items
    uri = "s3://ckpts/resave/step_1"
    save_items(uri, {"state": _tree(0)}, num_shards=2)
    first = open_checkpoint(uri)
    old_files = set(first.manifest.files)
    save_items(uri, {"state": _tree(1)}, num_shards=2)
    now = open_checkpoint(uri)
    assert not (set(now.manifest.files) & old_files), "the new version never overwrote the old objects"
    out = now.read_arrays("state")
    assert np.array_equal(out["w"], _tree(1)["w"])
    keys = _keys(s3, "resave/step_1/")
    assert not any(f"resave/step_1/{f}" in keys for f in old_files), "old version dropped after the commit"


def test_failed_upload_leaves_the_committed_checkpoint_whole(s3):
    from shardckpt import CheckpointError, open_checkpoint
    from shardckpt.testing import save_items
    uri = "s3://ckpts/fail/step_1"
    save_items(uri, {"state": _tree(0)})
    before = _keys(s3, "fail/")
    with pytest.raises(CheckpointError):
        save_items(uri, {"state": {"bad": object()}})   # fails while preparing
    assert _keys(s3, "fail/") == before
    assert np.array_equal(open_checkpoint(uri).read_arrays("state")["w"], _tree(0)["w"])


def test_uncommitted_upload_is_not_a_checkpoint(s3):
    from shardckpt import CheckpointManager, CheckpointNotFoundError, open_checkpoint
    s3.put_object(Bucket="ckpts", Key="partial/step_5/v0000abcd/model-00000-of-00001.npz", Body=b"xx")
    with pytest.raises(CheckpointNotFoundError):
        open_checkpoint("s3://ckpts/partial/step_5")
    assert CheckpointManager("s3://ckpts/partial").all_steps() == []


def test_manager_retention_and_resume_on_s3(s3):
    from shardckpt import CheckpointManager
    from shardckpt.lm.training import make_tx, new_run, state_digest
    model, optimizer = new_run()
    manager = CheckpointManager("s3://ckpts/run", max_to_keep=2, best_metric="loss", best_to_keep=1)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
        manager.save(step, model, optimizer, metrics={"loss": loss})
    assert manager.all_steps() == [2, 3, 4]          # latest 2 + best 1
    assert manager.best_step == 2 and manager.latest_step == 4
    assert {k.split("/")[1] for k in _keys(s3, "run/")} == {"step_2", "step_3", "step_4"}
    state = CheckpointManager("s3://ckpts/run").load_latest(tx=make_tx())
    assert state.step == 4 and state_digest(state.model, state.optimizer) == state_digest(model, optimizer)


def test_partial_restore_fetches_only_the_needed_byte_ranges(s3):
    from shardckpt import open_checkpoint
    from shardckpt.testing import save_items
    uri = "s3://ckpts/ranges/step_1"
    tree = _tree(3)
    save_items(uri, {"state": tree}, num_shards=1)
    ck = open_checkpoint(uri)
    ranges = []
    ck.store.client.meta.events.register("provide-client-params.s3.GetObject",
                                         lambda params, **kw: ranges.append(params.get("Range")))
    target = {"w": np.zeros_like(tree["w"]), "b": np.zeros_like(tree["b"]), "n": {"i": np.zeros(7, np.int64)}}
    out, report = ck.restore("state", target, select=lambda k: k == "b")
    assert np.array_equal(out["b"], tree["b"]) and not out["w"].any()
    assert report.bytes_read == tree["b"].nbytes
    shard_gets = [r for r in ranges if r is not None]
    assert shard_gets == [f"bytes={ck.index()['state']['b'][0][1].data_offset}-"
                          f"{ck.index()['state']['b'][0][1].data_offset + tree['b'].nbytes - 1}"]
