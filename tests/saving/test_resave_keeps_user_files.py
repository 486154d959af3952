"""Re-saving a local checkpoint keeps the user's entries in it (#17.2).

A step directory holding the user's ``notes.txt`` and ``plots/`` was protected from
retention and ``gc``, but ``save(p)`` over it, ``manager.save`` of the same step and item
saves swapped in a new directory and removed the old one with the user's files. Now they
are recreated in the new directory before it is published (hard links, directories
recreated, symlinks linked as themselves and never followed), and a re-save that fails at
any point leaves the old checkpoint and every user entry as they were."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest

from shardckpt import CheckpointError, CheckpointManager, restore, save, save_model, save_optimizer
from shardckpt.store.local import LocalStore
from shardckpt.store.posix import Posix
from shardckpt.testing import Fault, FaultPlan, save_items
from tests.conftest import make_optimizer


def _tree(v: int) -> dict:
    return {"w": np.full((4, 3), v, np.float32), "n": np.arange(v + 1)}


def _plant(ck, outside) -> dict:
    """The user's entries in checkpoint ``ck`` (files, nested directories, an empty one,
    symlinks to a file and a directory outside, a dangling one, a FIFO, modes): returns
    what each must look like afterwards."""
    (ck / "notes.txt").write_text("my notes\n")
    os.chmod(ck / "notes.txt", 0o600)
    (ck / "plots" / "sub").mkdir(parents=True)
    (ck / "plots" / "loss.png").write_bytes(b"\x89PNG" + bytes(range(256)) * 10)
    (ck / "plots" / "sub" / "deep.txt").write_text("deep")
    os.chmod(ck / "plots" / "sub", 0o750)
    (ck / "empty").mkdir()
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("outside the checkpoint")
    os.symlink(outside / "secret.txt", ck / "link-to-file")
    os.symlink(outside, ck / "link-to-dir", target_is_directory=True)
    os.symlink("no/such/target", ck / "dangling")
    os.symlink("../notes.txt", ck / "plots" / "rel-link")
    os.mkfifo(ck / "pipe")
    return _snapshot(ck)


def _snapshot(ck) -> dict:
    """Every user entry under ``ck``: kind, mode, content / link target, inode."""
    out = {}
    for name in ("notes.txt", "plots", "plots/loss.png", "plots/sub", "plots/sub/deep.txt", "empty",
                 "link-to-file", "link-to-dir", "dangling", "plots/rel-link", "pipe"):
        p = ck / name
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[name] = ("link", os.readlink(p), st.st_ino)
        elif stat.S_ISDIR(st.st_mode):
            out[name] = ("dir", stat.S_IMODE(st.st_mode), sorted(os.listdir(p)))
        elif stat.S_ISFIFO(st.st_mode):
            out[name] = ("fifo", stat.S_IMODE(st.st_mode), st.st_ino)
        else:
            out[name] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes(), st.st_ino)
    return out


def _entries_of(ck) -> set:
    return {str(p.relative_to(ck)) for p in ck.rglob("*")}


def _assert_loads(path, v: int) -> None:
    out = restore(path, _tree(0) | {"n": np.zeros(v + 1, np.int64)})
    assert np.array_equal(out["w"], _tree(v)["w"]) and np.array_equal(out["n"], _tree(v)["n"])


def test_save_over_a_checkpoint_keeps_every_user_entry(tmp_path):
    ck = tmp_path / "ck"
    save(ck, _tree(1), backend="threads")
    before = _plant(ck, tmp_path / "outside")
    save(ck, _tree(2), backend="threads")
    _assert_loads(ck, 2)
    assert _snapshot(ck) == before, "same entries, modes, contents, link targets and inodes (hard links)"
    assert not any(p.name.startswith(".ck.") for p in tmp_path.iterdir()), "no hidden copy left behind"
    assert sorted(os.listdir(tmp_path / "outside")) == ["secret.txt"], "nothing followed or copied outside"
    assert not (ck / "link-to-dir").resolve().is_relative_to(ck)


def test_resaving_again_and_again_keeps_them(tmp_path):
    ck = tmp_path / "ck"
    save(ck, _tree(1), backend="threads")
    before = _plant(ck, tmp_path / "outside")
    for v in range(2, 6):
        save(ck, _tree(v), backend="threads", num_shards=v % 3 + 1)
    _assert_loads(ck, 5)
    assert _snapshot(ck) == before


def test_manager_save_of_the_same_step_and_item_saves_keep_them(tmp_path, model):
    mgr = CheckpointManager(tmp_path / "run", max_to_keep=1, backend="threads")
    opt = make_optimizer(model)
    mgr.save(3, model, opt)
    step3 = mgr.step_path(3)
    before = _plant(step3, tmp_path / "outside")
    mgr.save(3, model, opt)                           # the same step again
    assert _snapshot(step3) == before
    save_model(step3, model, step=3, backend="threads")          # an item save (others carried over)
    assert _snapshot(step3) == before
    save_optimizer(step3, opt, backend="threads")
    assert _snapshot(step3) == before
    info = next(i for i in mgr.checkpoints if i.step == 3)
    assert info.protected and "notes.txt" in info.foreign and "plots" in info.foreign
    mgr.save(4, model, opt)                           # retention (max_to_keep=1) must not touch step 3
    assert mgr.all_steps() == [3, 4] and _snapshot(step3) == before


def test_an_add_item_save_keeps_them(tmp_path):
    ck = tmp_path / "ck"
    save_items(ck, {"a": _tree(1)}, backend="threads")
    before = _plant(ck, tmp_path / "outside")
    save_items(ck, {"b": _tree(2)}, keep_other_items=True, backend="threads")
    assert _snapshot(ck) == before


@pytest.mark.parametrize("fault", [
    Fault("write", "*.npz"),                       # a shard write fails (before any carry)
    Fault("carry", "deep.txt"),                    # half-way through recreating the user's entries
    Fault("carry", "*", after=3),
    Fault("write", "manifest.json"),               # after the carry, before the publish
    Fault("exchange", errno=errno.EIO),            # the publishing swap itself
    Fault("fsync", "tmp*", after=0, times=100),    # the commit's directory fsync: swapped back
], ids=["shard-write", "carry-deep-file", "carry-4th-entry", "manifest-write", "exchange", "commit-fsync"])
def test_a_resave_failing_midway_leaves_the_checkpoint_and_user_files(tmp_path, fault):
    root = tmp_path / "tmp-root"
    root.mkdir()
    ck = root / "ck"
    save(ck, _tree(1), backend="threads")
    before = _plant(ck, tmp_path / "outside")
    with FaultPlan(fault) as plan, pytest.raises(CheckpointError):
        save(ck, _tree(2), backend="threads")
    assert plan.fired, "the fault was injected"
    _assert_loads(ck, 1)
    assert _snapshot(ck) == before
    assert sorted(os.listdir(root)) == ["ck"], "the failed save left nothing"
    save(ck, _tree(3), backend="threads")           # and the next re-save works, keeping them
    _assert_loads(ck, 3)
    assert _snapshot(ck) == before


def test_a_resave_writing_a_name_the_user_owns_is_refused(tmp_path):
    """The user keeps a ``metrics.json`` the old checkpoint did not have; a save writing
    one would have to replace it: refused, nothing saved, nothing lost."""
    ck = tmp_path / "ck"
    save(ck, _tree(1), backend="threads")
    (ck / "metrics.json").write_text('{"mine": true}')
    with pytest.raises(CheckpointError, match="metrics.json"):
        save(ck, _tree(2), backend="threads", metrics={"loss": 1.0})
    _assert_loads(ck, 1)
    assert json.loads((ck / "metrics.json").read_text()) == {"mine": True}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_user_entries_made_while_the_save_publishes_are_moved_over(tmp_path, monkeypatch):
    """Entries the user adds between the carry and the publishing swap (here: at the swap)
    are moved from the replaced copy before it is removed."""
    ck = tmp_path / "ck"
    save(ck, _tree(1), backend="threads")
    _plant(ck, tmp_path / "outside")

    class LateUser(Posix):
        def check(self, point, path):
            if point in ("exchange", "rename") and os.fspath(path) == str(ck) and not (ck / "late.txt").exists():
                (ck / "late.txt").write_text("written while saving")
                (ck / "plots" / "late.png").write_bytes(b"late")
                (ck / "newdir").mkdir()
                (ck / "newdir" / "x").write_text("x")

    monkeypatch.setattr(LocalStore, "default_posix", LateUser())
    save(ck, _tree(2), backend="threads")
    monkeypatch.undo()
    _assert_loads(ck, 2)
    assert (ck / "late.txt").read_text() == "written while saving"
    assert (ck / "plots" / "late.png").read_bytes() == b"late"
    assert (ck / "newdir" / "x").read_text() == "x"
    assert (ck / "plots" / "sub" / "deep.txt").read_text() == "deep"


def test_a_damaged_manifest_being_replaced_keeps_what_is_not_ours_by_name(tmp_path):
    """With the old manifest unreadable, names decide: the shards and metadata files the
    old save wrote go, the user's entries stay."""
    ck = tmp_path / "ck"
    save(ck, _tree(1), backend="threads", num_shards=3)
    before = _plant(ck, tmp_path / "outside")
    raw = bytearray((ck / "manifest.json").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (ck / "manifest.json").write_bytes(bytes(raw))
    save(ck, _tree(2), backend="threads", num_shards=1)
    _assert_loads(ck, 2)
    assert _snapshot(ck) == before
    assert not [n for n in os.listdir(ck) if n.endswith("-of-00003.npz")], "the old shards are gone"


def test_a_user_directory_that_cannot_be_read_fails_the_save_not_the_files(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every directory")
    ck = tmp_path / "ck"
    save(ck, _tree(1), backend="threads")
    (ck / "private" / "inner").mkdir(parents=True)
    (ck / "private" / "inner" / "f").write_text("f")
    os.chmod(ck / "private", 0o300)   # no read permission: its entries cannot be listed
    try:
        with pytest.raises(CheckpointError, match="private"):
            save(ck, _tree(2), backend="threads")
        _assert_loads(ck, 1)
    finally:
        os.chmod(ck / "private", 0o700)
    assert (ck / "private" / "inner" / "f").read_text() == "f"
