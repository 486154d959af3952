"""Every CheckpointManager option is checked when the manager is made (#18.6), not at the
first save hours later; a directory a manager cannot keep checkpoints in (a file, one
checkpoint, an Orbax run) is refused there too (#18.4), saying what to do; and a best metric
that cannot rank checkpoints is said at the save that shows it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from shardckpt import CheckpointError, CheckpointManager, OrbaxCheckpointError, save
from shardckpt.tools.cli import main

BAD_OPTIONS = [
    ({"backend": "thread"}, "backend"), ({"backend": "Ray"}, "backend"), ({"backend": 3}, "backend"),
    ({"num_writers": 0}, "num_writers"), ({"num_writers": 2.5}, "num_writers"), ({"num_writers": True}, "num_writers"),
    ({"save_timeout": -1}, "save_timeout"), ({"save_timeout": "20"}, "save_timeout"),
    ({"save_timeout": math.inf}, "save_timeout"), ({"join_timeout": 0}, "join_timeout"),
    ({"num_shards": "4"}, "num_shards"), ({"num_shards": 0}, "num_shards"),
    ({"compress": "yes"}, "compress"), ({"progress": "no"}, "progress"),
    ({"max_to_keep": 0}, "max_to_keep"), ({"max_to_keep": True}, "max_to_keep"), ({"max_to_keep": 1.5}, "max_to_keep"),
    ({"best_to_keep": -1}, "best_to_keep"), ({"best_metric": 5}, "best_metric"), ({"best_metric": ""}, "best_metric"),
    ({"best_mode": "lowest"}, "best_mode"), ({"prefix": "step/x"}, "prefix"), ({"prefix": ""}, "prefix"),
    ({"verify": "no"}, "verify"), ({"async_save": 1}, "async_save"),
]


@pytest.mark.parametrize("options,name", BAD_OPTIONS, ids=[f"{n}={list(o.values())[0]!r}" for o, n in BAD_OPTIONS])
def test_bad_options_fail_at_construction_naming_the_option(tmp_path, options, name):
    with pytest.raises(CheckpointError, match=name):
        CheckpointManager(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_file_or_a_single_checkpoint_is_no_manager_directory(tmp_path):
    save(tmp_path / "run" / "step_10", {"w": np.ones(3)})
    with pytest.raises(CheckpointError, match="is a file"):
        CheckpointManager(tmp_path / "run" / "step_10" / "manifest.json")
    with pytest.raises(CheckpointError, match="one checkpoint, not a directory"):
        CheckpointManager(tmp_path / "run" / "step_10")
    assert CheckpointManager(tmp_path / "run").all_steps() == [10]


def _orbax_run(root, steps=(29, 34)):
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.CheckpointManager(root.absolute()) as m:
        for s in steps:
            m.save(s, args=ocp.args.StandardSave({"w": np.full(4, s, np.float32)}))
        m.wait_until_finished()


def test_an_orbax_run_directory_is_refused_with_the_conversion_to_run(tmp_path, capsys):
    _orbax_run(tmp_path / "orbax_run")
    with pytest.raises(OrbaxCheckpointError, match=r"Orbax checkpoint \(manager\).*shardckpt convert"):
        CheckpointManager(tmp_path / "orbax_run")
    assert sorted(p.name for p in (tmp_path / "orbax_run").iterdir()) == ["29", "34"]   # nothing written beside
    assert main(["ls", str(tmp_path / "orbax_run")]) == 2          # refused, with the conversion to run
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Orbax" in out and "shardckpt convert" in out
    assert main(["verify", str(tmp_path / "orbax_run")]) == 1
    assert "shardckpt convert" in capsys.readouterr().out


def test_a_best_metric_never_saved_is_said_once(tmp_path):
    mgr = CheckpointManager(tmp_path, best_metric="val_loss", backend="threads")
    with pytest.warns(UserWarning, match=r"best_metric='val_loss' is not among this save's metrics \(loss\)"):
        mgr.save(1, {"w": np.ones(2)}, metrics={"loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr.save(2, {"w": np.ones(2)}, metrics={"loss": 0.5})
    assert mgr.all_steps() == [1, 2]


@pytest.mark.parametrize("value", ["low", [1.0], {"a": 1}, None, True])
def test_a_best_metric_that_is_no_number_is_refused_at_save(tmp_path, value):
    mgr = CheckpointManager(tmp_path, best_metric="loss", backend="threads")
    with pytest.raises(CheckpointError, match="must be a number"):
        mgr.save(1, {"w": np.ones(2)}, metrics={"loss": value})
    assert mgr.all_steps() == []
    mgr.save(2, {"w": np.ones(2)}, metrics={"loss": float("nan")})   # a diverged loss is still saved
    assert mgr.all_steps() == [2]
