"""Relative paths, ``~`` and ``file://`` in the Orbax conversion, both directions, from Python
and from the command (#18.2): Orbax itself refuses relative paths ("Checkpoint path should
be absolute"), so the converter makes every path absolute the way the rest of shardckpt
reads one. The destination may be missing or an empty directory (Orbax's own writer
raises ``FileExistsError`` on one); nothing is ever left beside it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shardckpt import CheckpointManager
from shardckpt import convert as cv
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import save_items
from shardckpt.tools.cli import main

ocp = pytest.importorskip("orbax.checkpoint")
W = np.arange(6, dtype=np.float32)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """cwd = tmp_path/work, HOME = tmp_path/home; an Orbax standard directory, an Orbax
    manager root of two steps and a shardckpt checkpoint, all given by relative names."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    with ocp.StandardCheckpointer() as ck:
        ck.save((work / "orbax_ckpt").absolute(), {"w": W})
    with ocp.CheckpointManager((work / "orbax_run").absolute()) as mngr:
        for n in (1, 2):
            mngr.save(n, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": W + n})))
        mngr.wait_until_finished()
    save_items("ours", {"model": {"w": W}}, step=5)
    return work


def _nothing_hidden(*dirs: Path) -> None:
    for d in dirs:
        assert [n for n in os.listdir(d) if n.startswith(".") or "orbax-checkpoint-tmp" in n] == [], d


def test_python_relative_home_and_file_uri(work):
    home = Path(os.environ["HOME"])
    cv.from_orbax("orbax_ckpt", "a")
    cv.from_orbax("./orbax_run/2", "sub/../b")
    cv.convert("orbax_run", "~/c")
    cv.to_orbax("ours", "d")
    cv.to_orbax("./ours", "~/e", kind="manager")
    cv.convert(f"file://{work}/ours", "f")
    assert np.array_equal(open_checkpoint("a").read_arrays("model")["w"], W)
    assert open_checkpoint("b").step == 2 and not (work / "sub").exists()
    assert CheckpointManager(home / "c").all_steps() == [1, 2]
    for d in (work / "d", work / "f"):
        assert cv.orbax_kind(d) == "standard"
        assert np.array_equal(cv.read_orbax_tree(d)["w"]["value"], W)
    with ocp.CheckpointManager(home / "e") as mngr:
        assert mngr.all_steps() == [5]
    assert not (work / "~").exists()
    _nothing_hidden(work, home)


def test_an_empty_destination_directory_is_fine_both_ways(work):
    """Orbax's writer raises FileExistsError on an existing directory; ours takes an empty one."""
    for name in ("e1", "e2"):
        (work / name).mkdir()
    cv.to_orbax("ours", "e1")
    cv.from_orbax("orbax_ckpt", "e2")
    assert cv.orbax_kind("e1") == "standard" and open_checkpoint("e2").items == ["model"]
    _nothing_hidden(work)


def test_the_command_takes_relative_and_home_paths(work, capfd):
    home = Path(os.environ["HOME"])
    for argv in (["convert", "./orbax_ckpt", "./ckpt"], ["convert", "orbax_run/1", "ckpt_1"],
                 ["convert", "./orbax_run", "~/ckpts"], ["convert", "./ckpt", "./orbax_back"],
                 ["convert", "~/ckpts", "~/orbax_run2"]):
        assert main(argv) == 0, argv
        out, err = capfd.readouterr()
        assert err == "" and "converted" in out, (argv, err)
    assert open_checkpoint(work / "ckpt_1").step == 1
    assert CheckpointManager(home / "ckpts").all_steps() == [1, 2]
    with ocp.CheckpointManager(home / "orbax_run2") as mngr:
        assert mngr.all_steps() == [1, 2]
    assert cv.orbax_kind(work / "orbax_back") == "standard"
    _nothing_hidden(work, home)


def test_the_command_refuses_bad_paths_as_usage_errors(work, capsys):
    (work / "taken").mkdir()
    (work / "taken" / "notes.txt").write_text("mine")
    for argv in (["convert", "nope", "x"], ["convert", "ours", "taken"], ["convert", "ours", "ours"],
                 ["convert", "s3://bucket/run", "x"], ["convert", "ours", "gs://bucket/x"]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.count("error:") == 1
    assert (work / "taken" / "notes.txt").read_text() == "mine"
    assert not (work / "x").exists()
