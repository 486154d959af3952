"""A local listing never drops an entry that exists (#17.10).

``LocalStore.list`` reads the directory, then ``lstat``s each entry. A save that publishes
step N+1 after the read and retention retiring step N before the ``lstat`` used to leave a
listing with neither, and ``latest_step`` read ``None`` (a resuming trainer starts from
scratch). The races are made deterministic here: ``os.lstat`` is wrapped so that, on the
name of one entry, a real save and a real retire run before the real ``lstat``."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shardckpt import CheckpointManager
from shardckpt.store import local as local_store
from shardckpt.store.local import LocalStore
from shardckpt.testing import save_items


def _save(root, step: int) -> None:
    save_items(root / f"step_{step}", {"state": {"w": np.full(4, step, np.int32)}}, step=step, backend="threads")


class RaceOnLstat:
    """Wraps ``os.lstat``: the first ``times`` lstats of a path named ``step_<n>`` (the
    newest step at that moment) publish step n+1 and retire step n before answering."""

    def __init__(self, root, times: int = 1):
        self.root, self.times, self.fired = root, times, 0
        self.real = os.lstat
        self.busy = False

    def __call__(self, path, *a, **kw):
        name = os.path.basename(os.fspath(path))
        if (not self.busy and self.fired < self.times and os.path.dirname(os.fspath(path)) == str(self.root)
                and name.startswith("step_")):
            self.busy = True
            try:
                n = int(name.split("_")[1])
                if os.path.isdir(self.root / f"step_{n}") and not os.path.exists(self.root / f"step_{n + 1}"):
                    _save(self.root, n + 1)
                    LocalStore(self.root).retire(f"step_{n}")
                    self.fired += 1
            finally:
                self.busy = False
        return self.real(path, *a, **kw)


@pytest.mark.parametrize("races", [1, 3, local_store.LIST_ATTEMPTS + 2],
                         ids=["one-race", "three-races-in-a-row", "more-races-than-relists"])
def test_latest_step_never_reads_none_while_a_checkpoint_exists(tmp_path, monkeypatch, races):
    _save(tmp_path, 1)
    mgr = CheckpointManager(tmp_path, max_to_keep=1, backend="threads")
    hook = RaceOnLstat(tmp_path, times=races)
    monkeypatch.setattr(os, "lstat", hook)
    latest = mgr.latest_step
    monkeypatch.undo()
    assert hook.fired == races, "the race happened"
    assert latest is not None, "a checkpoint existed at every moment"
    assert latest == 1 + races


def test_the_listed_checkpoints_after_the_race_are_the_new_step(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    mgr = CheckpointManager(tmp_path, max_to_keep=1, backend="threads")
    monkeypatch.setattr(os, "lstat", RaceOnLstat(tmp_path))
    infos = mgr.checkpoints
    monkeypatch.undo()
    assert [i.step for i in infos] == [2]


def test_an_entry_whose_lstat_keeps_failing_is_still_listed(tmp_path, monkeypatch):
    """Even when every relist races (an entry that always vanishes under ``lstat``), the
    directory read named it: it is listed (from the directory entry), not dropped."""
    _save(tmp_path, 3)
    real = os.lstat
    calls = {"n": 0}

    def always_gone(path, *a, **kw):
        if os.fspath(path) == str(tmp_path / "step_3"):
            calls["n"] += 1
            raise FileNotFoundError(2, "No such file or directory (injected)", os.fspath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "lstat", always_gone)
    entries = LocalStore(tmp_path).list("")
    steps = CheckpointManager(tmp_path, backend="threads").all_steps()
    monkeypatch.undo()
    assert calls["n"] >= local_store.LIST_ATTEMPTS, "the listing retried"
    assert [(e.name, e.is_dir, e.is_link) for e in entries if e.name == "step_3"] == [("step_3", True, False)]
    assert steps == [3]


def test_an_entry_really_removed_is_not_listed(tmp_path, monkeypatch):
    """A retire with no new publish: the relist does not show the removed entry."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real = os.lstat
    done = []

    def retire_first(path, *a, **kw):
        if not done and os.fspath(path) == str(tmp_path / "step_1"):
            done.append(1)
            LocalStore(tmp_path).retire("step_1")
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "lstat", retire_first)
    names = sorted(e.name for e in LocalStore(tmp_path).list("") if not e.name.startswith("."))
    monkeypatch.undo()
    assert done and names == ["step_2"]


def test_a_symlink_entry_is_listed_as_a_link(tmp_path):
    _save(tmp_path, 1)
    os.symlink(tmp_path / "step_1", tmp_path / "step_9")
    entries = {e.name: e for e in LocalStore(tmp_path).list("")}
    assert entries["step_9"].is_link and not entries["step_9"].is_dir
    assert CheckpointManager(tmp_path, backend="threads").all_steps() == [1]
