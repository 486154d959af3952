"""Metrics (issue #11.8): checked on save before anything is written, read defensively.

A metric the manifest cannot hold or readers cannot rank (10**400, a set, a non-string key,
nesting 700 deep) is refused by ``save_checkpoint`` / ``CheckpointManager.save`` with a
``CheckpointError`` naming it, before any file is written; NaN and infinities are accepted
(a diverged loss must not fail a save). A hand-edited manifest holding such metrics breaks
nothing that reads it: ``best_step``, ``load_best``, retention, ``ls`` and ``inspect``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardckpt import CheckpointManager, LMModel, ModelConfig
from shardckpt.errors import CheckpointError
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.saving.metrics import MAX_METRIC_DEPTH, check_metrics
from shardckpt.testing import save_items
from shardckpt.tools import cli


def nested(depth: int, leaf=1.0, kind=list):
    x = leaf
    for _ in range(depth):
        x = [x] if kind is list else {"k": x}
    return x


def tree() -> dict:
    return {"w": np.arange(6, dtype=np.float32)}


BAD = {
    "huge int": ({"loss": 10**400}, "loss"),
    "huge negative int": ({"loss": -(10**400)}, "loss"),
    "huge int in a list": ({"hist": [1.0, 10**400]}, "hist[1]"),
    "huge int in a dict": ({"eval": {"ppl": 10**309}}, "eval.ppl"),
    "nested 33 lists": ({"deep": nested(MAX_METRIC_DEPTH)}, "deep"),
    "nested 700 dicts": ({"deep": nested(700, kind=dict)}, "deep"),
    "int key": ({1: 0.5}, "1"),
    "tuple key inside": ({"eval": {(1, 2): 0.5}}, "eval"),
    "set": ({"tags": {1, 2}}, "tags"),
    "bytes": ({"blob": b"\x00\x01"}, "blob"),
    "object": ({"obj": object()}, "obj"),
    "complex": ({"z": 1 + 2j}, "z"),
    "complex array": ({"z": np.array([1 + 2j])}, "z"),
    "typed PRNG key": ({"key": "__key__"}, "key"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metric_refused_before_anything_is_written(tmp_path, case):
    metrics, name = BAD[case]
    if case == "typed PRNG key":
        import jax
        metrics = {"key": jax.random.key(0)}
    with pytest.raises(CheckpointError) as e:
        save_items(tmp_path / "run" / "step_1", {"model": tree()}, step=1, metrics=metrics)
    assert name in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()                   # nothing written, not even the directory


def test_metrics_not_a_dict_refused(tmp_path):
    for metrics in ([1.0], "loss", 3.0):
        with pytest.raises(CheckpointError, match="dict"):
            save_items(tmp_path / "c", {"model": tree()}, metrics=metrics)
    assert not (tmp_path / "c").exists()


GOOD = {
    "nan": (float("nan"), "nan"),
    "inf": (float("inf"), "inf"),
    "-inf": (-math.inf, "-inf"),
    "big finite int": (10**300, 10**300),
    "numpy float32": (np.float32(1.5), 1.5),
    "numpy int": (np.int64(7), 7),
    "jax scalar": (jnp.float32(2.5), 2.5),
    "numpy array": (np.array([1.0, np.nan]), [1.0, "nan"]),
    "32 deep": (nested(MAX_METRIC_DEPTH - 1), nested(MAX_METRIC_DEPTH - 1)),
    "strings and None": ({"name": "run-1", "note": None, "ok": True}, {"name": "run-1", "note": None, "ok": True}),
    "string array": (np.array(["a", "b"]), ["a", "b"]),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_metric_saved_as_strict_json(tmp_path, case):
    value, stored = GOOD[case]
    path = save_items(tmp_path / "c", {"model": tree()}, step=3, metrics={"m": value})
    raw = json.loads((Path(path) / "manifest.json").read_text())   # strict JSON: no NaN tokens
    assert raw["metrics"]["m"] == stored
    assert Checkpoint(path).metrics["m"] == stored


def model() -> LMModel:
    return LMModel(ModelConfig(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_refuses_a_bad_metric_synchronously_and_retention_still_runs(tmp_path, async_save):
    m = model()
    mgr = CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", best_to_keep=1, backend="threads",
                            async_save=async_save)
    for step in (1, 2):
        mgr.save(step, m, metrics={"loss": float(step)})
    mgr.wait_until_finished()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="'loss'"):
        mgr.save(3, m, metrics={"loss": 10**400})
    mgr.wait_until_finished()                                 # no background failure pending either
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    mgr.save(3, m, metrics={"loss": float("nan")})             # a diverged loss is saved ...
    mgr.save(4, m, metrics={"loss": 5.0})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 3, 4]                       # ... and retention ran: best (1) + latest 2
    assert mgr.best_step == 1
    mgr.close()


def _edit_metrics(path: Path, **metrics) -> None:
    """Hand-edit a committed manifest as a hostile writer would: bypassing our writer and
    resealing the manifest's own checksum."""
    from shardckpt.format.manifest import seal_manifest
    f = Path(path) / "manifest.json"
    m = json.loads(f.read_text())
    m["metrics"].update(metrics)
    f.write_text(json.dumps(seal_manifest(m)))


HOSTILE = {
    "huge int": 10**400,
    "nested 700": nested(700),
    "dict": {"a": 1},
    "string": "0.1",
    "escape": "\x1b[2J\x1b]0;pwned\x07",
    "bool": True,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metrics_in_a_manifest_break_no_reader(tmp_path, case, capsys):
    m = model()
    mgr = CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", backend="threads")
    mgr.save(1, m, metrics={"loss": 2.0})
    mgr.save(2, m, metrics={"loss": 1.0})
    _edit_metrics(tmp_path / "step_2", loss=HOSTILE[case])
    mgr = CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", backend="threads")
    assert mgr.best_step == 1                                  # the hostile metric is not a number
    assert mgr.load_best().step == 1
    mgr.save(3, m, metrics={"loss": 3.0})                       # retention ranks without raising
    assert mgr.all_steps() == [1, 2, 3] or mgr.all_steps() == [1, 3]
    refused = case == "nested 700"           # deeper than the loader's 64 levels: not a checkpoint
    for argv in (["ls", str(tmp_path), "--best-metric", "loss"], ["inspect", "--no-verify", str(tmp_path / "step_2")]):
        if refused and argv[0] == "inspect":
            assert cli.main(argv) == 1 and "deeper than" in capsys.readouterr().err
            continue
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "step" in out
        assert cli.main([*argv, "--json"]) == 0
        json.loads(capsys.readouterr().out)


def test_keep_other_items_carries_a_hostile_metric_over_safely(tmp_path):
    p = save_items(tmp_path / "c", {"model": tree()}, step=1, metrics={"loss": 1.0}, keep_other_items=True)
    _edit_metrics(p, loss=10**400, deep=nested(40))
    p = save_items(tmp_path / "c", {"optimizer": tree()}, keep_other_items=True)   # metrics=None: carried
    ck = Checkpoint(p)
    assert set(ck.items) == {"model", "optimizer"}
    assert isinstance(ck.metrics["loss"], str) and isinstance(ck.metrics["deep"], str)
    json.loads((Path(p) / "manifest.json").read_text())


def test_check_metrics_names_the_path_inside(tmp_path):
    with pytest.raises(CheckpointError, match=r"'eval\.hist\[2\]'"):
        check_metrics({"eval": {"hist": [1, 2, 10**400]}})
    check_metrics(None)
    check_metrics({})
