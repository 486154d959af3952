"""An Orbax directory is recognised wherever a directory is opened (#18.4).

A resume script pointed at an Orbax ``CheckpointManager`` root used to see an empty run
(``latest_step is None``) and start from scratch; ``shardckpt ls`` showed no checkpoints
and ``gc`` nothing to do. Each entry point now raises ``OrbaxCheckpointError`` (exported
from ``shardckpt``), whose message gives the ``shardckpt convert`` command. Directories
written by Orbax itself: a manager root (plain step names and ``step_prefix="step"``), one
of its steps, a ``StandardCheckpointer`` directory. A fresh directory, or one holding only
the user's own files, is still an empty run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import shardckpt
import shardckpt.convert
from shardckpt import CheckpointManager, OrbaxCheckpointError, load_model, restore
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import save_items
from shardckpt.tools.cli import main

ocp = pytest.importorskip("orbax.checkpoint")
W = np.arange(4, dtype=np.float32)


def _manager(root: Path, step_prefix: str | None = None) -> Path:
    options = ocp.CheckpointManagerOptions(step_prefix=step_prefix) if step_prefix else None
    with ocp.CheckpointManager(root.absolute(), options=options) as mngr:
        for n in (29, 34):
            mngr.save(n, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": W + n})))
        mngr.wait_until_finished()
    return root


@pytest.fixture(scope="module")
def orbax_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("orbax")
    run = _manager(base / "run")
    prefixed = _manager(base / "prefixed", "step")
    with ocp.StandardCheckpointer() as ck:
        ck.save((base / "standard").absolute(), {"w": W})
    return {"manager": run, "step_prefix": prefixed, "step": run / "29", "standard": base / "standard"}


def _files(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def test_orbax_checkpoint_error_is_exported():
    assert shardckpt.OrbaxCheckpointError is OrbaxCheckpointError is shardckpt.convert.OrbaxCheckpointError
    assert issubclass(OrbaxCheckpointError, shardckpt.CheckpointNotFoundError)


@pytest.mark.parametrize("which", ["manager", "step_prefix", "step", "standard"])
def test_the_manager_refuses_an_orbax_directory(orbax_dirs, which):
    """Refused when the manager is made (#18.6: at construction, not at the first call)."""
    path = orbax_dirs[which]
    with pytest.raises(OrbaxCheckpointError, match=f"Orbax checkpoint.*shardckpt convert {path}") as e:
        CheckpointManager(path)
    if which in ("manager", "step_prefix"):
        assert "CheckpointManager(NEW_DIR)" in str(e.value)


@pytest.mark.parametrize("which", ["manager", "step_prefix", "step", "standard"])
def test_loads_refuse_an_orbax_directory(orbax_dirs, which):
    path = orbax_dirs[which]
    for call in (lambda: open_checkpoint(path), lambda: load_model(path), lambda: restore(path)):
        with pytest.raises(OrbaxCheckpointError, match="shardckpt convert"):
            call()


@pytest.mark.parametrize("which", ["manager", "step_prefix", "step", "standard"])
def test_the_commands_say_it_is_orbax_and_change_nothing(orbax_dirs, which, capsys):
    path = orbax_dirs[which]
    before = _files(path)
    for argv, rc in ((["ls", str(path)], 2), (["gc", str(path)], 2), (["gc", str(path), "--max-to-keep", "1"], 2),
                     (["inspect", str(path)], 2), (["verify", str(path)], 1)):
        assert main(argv) == rc, argv
        out, err = capsys.readouterr()
        assert "Orbax checkpoint" in out + err and "shardckpt convert" in out + err, (argv, out, err)
    assert _files(path) == before


def test_own_and_empty_directories_are_not_orbax(tmp_path):
    """No false alarm: a new directory, an empty one, one with the user's notes and plots,
    and a run that holds shardckpt checkpoints beside an Orbax step."""
    (tmp_path / "empty").mkdir()
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "notes.txt").write_text("lr sweep")
    (mine / "plots" / "loss.png").write_bytes(b"\x89PNG")
    for d in ("new", "empty", "mine"):
        assert CheckpointManager(tmp_path / d).latest_step is None, d
        assert main(["ls", str(tmp_path / d)]) == 0
    mixed = _manager(tmp_path / "mixed")
    save_items(mixed / "step_40", {"model": {"w": W}}, step=40)
    assert CheckpointManager(mixed).all_steps() == [40]
    assert sorted(os.listdir(mixed)) == ["29", "34", "step_40"]
