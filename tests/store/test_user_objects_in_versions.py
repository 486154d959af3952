"""Object stores delete only the objects that are shardckpt's (#17.12b).

A user object inside a checkpoint's version prefix (``step_1/v<txn>/user-notes.txt``) used
to be deleted by retention (the whole ``step_1/`` prefix went) and by ``gc`` (a whole
unreferenced version prefix went). Now the catalog reports such objects as the user's
(the checkpoint is protected: retention and ``gc`` leave it), retire deletes only what the
manifest lists and what a save stages, and leftover cleanup only what a save stages. On
every object-store layout: the real S3 server, a pyarrow filesystem and the in-memory
store."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from shardckpt import Checkpoint, CheckpointError, CheckpointManager
from shardckpt.catalog import Catalog
from shardckpt.store.registry import open_store
from shardckpt.store.versioned import STALE_VERSION_SECONDS
from shardckpt.testing import save_items

USER = b"the user's own notes"


def _memory(request, tmp_path):
    return f"memory://userobj-{re.sub(r'[^A-Za-z0-9]+', '-', request.node.name)}-{time.monotonic_ns()}", None


def _s3(request, tmp_path):
    server = request.getfixturevalue("s3_server")
    return f"s3://ckpts/userobj/{time.monotonic_ns()}?endpoint_url={server.endpoint}", None


def _arrow(request, tmp_path):
    pafs = pytest.importorskip("pyarrow.fs")
    (tmp_path / "arrow").mkdir()
    return "arrow://bucket/root", pafs.SubTreeFileSystem(str(tmp_path / "arrow"), pafs.LocalFileSystem())


@pytest.fixture(params=["arrow", "memory", "s3"])
def root(request, tmp_path):
    return {"arrow": _arrow, "memory": _memory, "s3": _s3}[request.param](request, tmp_path)


def _path(root, name: str) -> str:
    uri, _ = root
    base, _, query = uri.partition("?")
    return f"{base}/{name}" + (f"?{query}" if query else "")


def _save(root, step: int, **kw) -> None:
    save_items(_path(root, f"step_{step}"), {"state": {"w": np.full(5, step, np.float32)}}, step=step,
               backend="threads", filesystem=root[1], **kw)


def _store(root):
    return open_store(root[0], root[1])


def _version(store, step: int) -> str:
    man = json.loads(store.read_bytes(f"step_{step}/manifest.json", 1 << 20))
    (v,) = {n.split("/")[0] for n in man["files"]}
    return v


def _all_names(store, prefix: str) -> set[str]:
    out = set()
    for e in store.list(prefix):
        name = f"{prefix}/{e.name}"
        out |= _all_names(store, name) if e.is_dir else {name}
    return out


def test_user_objects_in_a_version_prefix_are_reported_and_protect_the_checkpoint(root):
    store = _store(root)
    for s in (1, 2, 3):
        _save(root, s)
    v = _version(store, 1)
    store.put(f"step_1/{v}/user-notes.txt", USER)
    store.put(f"step_1/{v}/plots/loss.png", USER)
    infos = {i.step: i for i in Catalog(store).checkpoints()}
    assert infos[1].foreign == (f"{v}/plots", f"{v}/user-notes.txt") and infos[1].protected
    assert infos[2].foreign == () and not infos[2].protected
    kept, deleted = Catalog.retention_plan(list(infos.values()), max_to_keep=1, best_metric=None)
    assert [i.step for i in deleted] == [2] and 1 in [i.step for i in kept]
    with pytest.raises(CheckpointError, match="user-notes.txt"):
        Catalog(store).delete(infos[1])


def test_retire_deletes_only_what_the_manifest_lists_and_a_save_stages(root):
    store = _store(root)
    _save(root, 1)
    v = _version(store, 1)
    user = {f"step_1/{v}/user-notes.txt", f"step_1/{v}/plots/loss.png", f"step_1/{v}/notes",
            "step_1/README", "step_1/mine/x.bin"}
    for n in user:
        store.put(n, USER)
    ours = _all_names(store, "step_1") - user
    assert ours and all(not n.startswith("step_1/mine") for n in ours)
    store.retire("step_1")
    assert _all_names(store, "step_1") == user
    assert all(store.read_bytes(n, 1 << 20) == USER for n in user)
    assert Catalog(store).checkpoints() == []


def test_gc_of_an_unreferenced_version_prefix_keeps_user_objects(root):
    """An aborted save's version prefix holding a user object: cleanup deletes the staged
    shard, metadata and marker, never the user's; afterwards it is no leftover any more."""
    store = _store(root)
    _save(root, 1)
    dead = "v" + "ab" * 8
    for n in ("state-00000-of-00001.npz", "structure.json", "index.msgpack", "part-00001.msgpack", "_ABORTED"):
        store.put(f"step_1/{dead}/{n}", b"staged by a save that died")
    store.put(f"step_1/{dead}/user-notes.txt", USER)
    store.put(f"step_1/{dead}/plots/a.png", USER)
    cat = Catalog(store)
    (lo,) = [lo for lo in cat.leftovers() if lo.name == f"step_1/{dead}"]
    assert lo.action == "remove"
    cat.carry_out([lo])
    assert _all_names(store, f"step_1/{dead}") == {f"step_1/{dead}/user-notes.txt", f"step_1/{dead}/plots/a.png"}
    assert [x for x in cat.leftovers() if x.name == f"step_1/{dead}"] == []
    out = Checkpoint(_path(root, "step_1"), filesystem=root[1]).read_arrays("state")
    assert np.array_equal(out["w"], np.full(5, 1, np.float32)), "the committed checkpoint is whole"


def test_a_stale_unreferenced_prefix_is_cleaned_alike(root):
    store = _store(root)
    _save(root, 1)
    stale = "v" + "cd" * 8
    store.put(f"step_1/{stale}/state-00000-of-00001.npz", b"x")
    store.put(f"step_1/{stale}/keep-me.txt", USER)
    later = time.time() + STALE_VERSION_SECONDS + 60
    Catalog(store).cleanup_leftovers(now=later)
    assert _all_names(store, f"step_1/{stale}") == {f"step_1/{stale}/keep-me.txt"}


def test_a_resave_keeps_user_objects_of_the_replaced_version(root):
    store = _store(root)
    _save(root, 1)
    old = _version(store, 1)
    store.put(f"step_1/{old}/user-notes.txt", USER)
    _save(root, 1)
    new = _version(store, 1)
    assert new != old
    assert _all_names(store, f"step_1/{old}") == {f"step_1/{old}/user-notes.txt"}, "the old version's files went"
    (info,) = Catalog(store).checkpoints()
    assert info.foreign == (f"{old}/user-notes.txt",) and info.protected


def test_a_failed_save_discards_only_what_it_staged(root):
    """A staging area discarded (an abort) removes its staged files; a user object put
    under that very prefix meanwhile stays."""
    store = _store(root)
    staging = store.stage("step_9", "f" * 32)
    staging.write_bytes("state-00000-of-00001.npz", b"partial")
    store.put(f"step_9/{staging.version}/user-notes.txt", USER)
    staging.discard()
    assert _all_names(store, "step_9") == {f"step_9/{staging.version}/user-notes.txt"}


def test_s3_manager_retention_keeps_a_checkpoint_with_user_objects(s3_server, model):
    root = f"s3://ckpts/userobj-mgr-{time.monotonic_ns()}?endpoint_url={s3_server.endpoint}"
    mgr = CheckpointManager(root, max_to_keep=1, backend="threads")
    mgr.save(1, model)
    store = mgr.store
    v = _version(store, 1)
    store.put(f"step_1/{v}/user-notes.txt", USER)
    mgr.save(2, model)
    mgr.save(3, model)
    assert mgr.all_steps() == [1, 3]
    assert store.read_bytes(f"step_1/{v}/user-notes.txt", 1 << 20) == USER
