"""The Catalog: one listing rule for the manager, ``ls`` and ``gc``; gc --dry-run prints
exactly what gc then does; what the library did not write survives retention and gc;
crashed-run cleanup is best effort and never blocks a reader."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import stat

import numpy as np
import pytest
from conftest import dead_pid, this_host

from shardckpt import CheckpointManager, open_checkpoint
from shardckpt.catalog import Catalog, metric_number
from shardckpt.store.local import LocalStore
from shardckpt.testing import save_items
from shardckpt.tools import cli


def _save(path, value, *, step=None, metrics=None):
    save_items(path, {"model": {"a": np.full(3, value, np.float32)}}, step=step, metrics=metrics)


def _gc(directory, *args, dry=False, capsys=None) -> dict:
    argv = ["gc", str(directory), "--json", *args] + (["--dry-run"] if dry else [])
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("layout", [
    {"step_1": 6, "step_5": 1, "step_6": 5},         # manifest steps unrelated to the names
    {"step_2": None, "step_10": 3, "step_3": 99},
    {"step_7": 7, "step_8": 0, "step_9": None, "step_11": 2},
])
def test_gc_dry_run_is_exactly_what_gc_does(tmp_path, capsys, layout):
    for name, manifest_step in layout.items():
        _save(tmp_path / name, int(name.split("_")[1]), step=manifest_step)
    dry = _gc(tmp_path, "--max-to-keep", "1", dry=True, capsys=capsys)
    real = _gc(tmp_path, "--max-to-keep", "1", capsys=capsys)
    assert dry["deleted_steps"] == real["deleted_steps"]
    newest = max(int(n.split("_")[1]) for n in layout)
    assert sorted(os.listdir(tmp_path)) == [f"step_{newest}"]
    assert real["deleted_steps"] == sorted(int(n.split("_")[1]) for n in layout if int(n.split("_")[1]) != newest)
    # the manager lists by the same rule
    assert CheckpointManager(tmp_path).all_steps() == [newest]


def test_step_rule_ignores_non_canonical_names(tmp_path):
    for name in ("step_3", "step_03", "step_+4", "step_4x", "Step_5", "step_"):
        (tmp_path / name).mkdir()
    _save(tmp_path / "step_3", 3)
    _save(tmp_path / "step_07", 7)   # save_checkpoint takes any name; the catalog lists canonical ones
    assert Catalog(LocalStore(tmp_path)).step_of("step_07") is None
    assert [i.step for i in Catalog(LocalStore(tmp_path)).checkpoints()] == [3]


def _legacy(path):
    path.mkdir()
    np.savez_compressed(path / "model.npz", **{"w": np.ones(3, np.float32)})
    (path / "config.json").write_text(json.dumps({"model_config": {"hidden_size": 4}}))


def test_retention_and_gc_leave_legacy_and_foreign_dirs_alone(tmp_path, capsys):
    _legacy(tmp_path / "step_1")
    (tmp_path / "step_1" / "notes.txt").write_text("mine")
    _save(tmp_path / "step_2", 2)
    (tmp_path / "step_2" / "notes.txt").write_text("also mine")     # a user's file in our checkpoint
    _save(tmp_path / "step_3", 3)
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    assert mgr.all_steps() == [1, 2, 3]
    infos = {i.step: i for i in mgr.checkpoints}
    assert infos[1].legacy and infos[2].foreign == ("notes.txt",) and not infos[3].protected
    _save(mgr.step_path(4), 4)
    mgr.apply_retention()
    assert (tmp_path / "step_1" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "step_2" / "notes.txt").read_text() == "also mine"
    assert mgr.all_steps() == [1, 2, 4]
    out = _gc(tmp_path, "--max-to-keep", "1", capsys=capsys)
    assert out["deleted_steps"] == [] and {p["name"] for p in out["protected"]} == {"step_1", "step_2"}
    assert sorted(os.listdir(tmp_path)) == ["step_1", "step_2", "step_4"]
    assert open_checkpoint(tmp_path / "step_2").read_arrays("model")["a"][0] == 2   # still loadable


def test_manager_save_never_deletes_a_legacy_step_with_user_files(tmp_path, model):
    _legacy(tmp_path / "step_1")
    (tmp_path / "step_1" / "notes.txt").write_text("keep me")
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(2, model)
    mgr.save(3, model)
    assert (tmp_path / "step_1" / "notes.txt").read_text() == "keep me"
    assert mgr.all_steps() == [1, 3]


@pytest.mark.parametrize("value", [10 ** 400, -(10 ** 400), float("nan"), float("inf"), "1.0", [1.0], {"a": 1},
                                   None, True])
def test_metric_number_never_raises(value):
    assert metric_number(value) is None


def _leftovers(tmp_path, n=4):
    names = []
    for i in range(n):
        for kind in ("tmp", "del"):
            d = tmp_path / f".step_{i}.{kind}-{this_host()}-{dead_pid()}-{i:012x}"
            d.mkdir()
            (d / "x").write_bytes(b"x" * 100)
            names.append(d.name)
    return names


def _construct(directory, q):
    try:
        CheckpointManager(directory, max_to_keep=2)
        q.put("ok")
    except BaseException as e:  # noqa: BLE001
        q.put(f"{type(e).__name__}: {e}")


def test_nine_managers_racing_over_dead_leftovers(tmp_path):
    _save(tmp_path / "step_9", 9)
    _leftovers(tmp_path, 6)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_construct, args=(str(tmp_path), q)) for _ in range(9)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 9, results
    assert sorted(os.listdir(tmp_path)) == ["step_9"]


def test_read_only_directory_with_leftovers_still_loads(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the read-only mount case is below")
    _save(tmp_path / "step_1", 1)
    _leftovers(tmp_path, 1)
    os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR)
    try:
        mgr = CheckpointManager(tmp_path)
        assert mgr.all_steps() == [1]
    finally:
        os.chmod(tmp_path, stat.S_IRWXU)


def test_unremovable_leftovers_and_stray_entries_never_block_loading(tmp_path, monkeypatch):
    """Cleanup fails (a read-only mount, another user's files) or meets a file or symlink
    carrying a leftover's name: the manager still lists and loads."""
    _save(tmp_path / "step_1", 1)
    names = _leftovers(tmp_path, 2)
    (tmp_path / f".step_5.tmp-{this_host()}-{dead_pid()}-00000000beef").write_text("a stray file")
    os.symlink("/etc", tmp_path / f".step_6.del-{this_host()}-{dead_pid()}-00000000cafe")
    from shardckpt.testing import Fault, FaultPlan
    with FaultPlan(Fault("remove", "*", errno.EACCES, times=1 << 30)):     # a read-only mount
        mgr = CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1]
    assert open_checkpoint(mgr.step_path(1)).read_arrays("model")["a"][0] == 1
    assert all((tmp_path / n).exists() for n in names)          # left for a later cleanup
    assert os.path.islink(tmp_path / f".step_6.del-{this_host()}-{dead_pid()}-00000000cafe")
    assert os.path.isdir("/etc") and os.listdir("/etc")          # the link was never followed
    plan = {lo.name: lo.action for lo in mgr.catalog.leftovers()}
    assert plan[f".step_5.tmp-{this_host()}-{dead_pid()}-00000000beef"] == "keep"   # not a directory: not ours


def test_load_latest_races_retention(tmp_path, model):
    """A concurrent saver with max_to_keep=1 deletes the step load_latest picked: it picks
    the new latest instead of raising."""
    import threading

    from shardckpt.lm.training import make_tx
    saver = CheckpointManager(tmp_path, max_to_keep=1, backend="threads")
    saver.save(0, model)
    stop = threading.Event()
    errors = []

    def save_loop():
        step = 1
        while not stop.is_set():
            try:
                saver.save(step, model)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            step += 1

    t = threading.Thread(target=save_loop)
    t.start()
    reader = CheckpointManager(tmp_path, max_to_keep=1, backend="threads")
    try:
        for _ in range(30):
            state = reader.load_latest(model=model, tx=make_tx(), should_load_optimizer=False)
            assert state is not None
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
