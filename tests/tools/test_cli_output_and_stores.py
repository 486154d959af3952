"""CLI and demo polish (issue #12 item 5) and ``ls``/``gc`` on object stores.

Tables piped at 80 columns never cut a number; ``--help`` shows defaults; a missing path
exits 2 in every subcommand; ``verify DIR`` verifies every committed step of a manager
directory; ``diff`` and ``inspect`` verify the checksums of what they read; loading
bfloat16 into float32 targets warns once; the demo keeps its checkpoints; ``ls`` and ``gc``
take ``s3://`` URIs.
"""

from __future__ import annotations

import json
import uuid
import warnings
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items
from shardckpt.tools import cli


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def tree(scale: float = 1.0) -> dict:
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4) * scale, "b": np.ones(5, np.int64)}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    for step in (1000001, 1000002, 1000003):
        save_items(run / f"step_{step}", {"model": tree(step), "optimizer": tree(2)}, step=step,
                        metrics={"loss": 1.0 / step, "accuracy_on_the_validation_set": 0.123456789,
                                 "perplexity_of_a_long_named_metric": 12345.678, "tokens": 10**15},
                        num_shards=3)
    return run


# --- tables at 80 columns --------------------------------------------------------------------

@pytest.mark.parametrize("command", ["ls", "inspect", "diff"])
def test_piped_tables_at_80_columns_keep_names_and_numbers_whole(run_dir, capsys, monkeypatch, command):
    """Piped (not a terminal) with COLUMNS=80, as in CI logs: no cell is wrapped or cut, so
    every file name, key and number stands whole on its line (greppable)."""
    monkeypatch.setenv("COLUMNS", "80")
    step = run_dir / "step_1000003"
    argv = {"ls": ["ls", str(run_dir)], "inspect": ["inspect", str(step)],
            "diff": ["diff", str(run_dir / "step_1000001"), str(step)]}[command]
    rc, out, err = run_main(capsys, argv)
    assert rc in (0, 1), err
    assert "…" not in out                                    # nothing cut with an ellipsis
    lines = out.splitlines()
    if command == "inspect":
        for name in Checkpoint(step).manifest.files:
            assert any(name in line for line in lines), f"{name} is wrapped"
    flat = out.replace("│", " ")
    if command == "ls":
        for s in ("1000001", "1000002", "1000003"):
            assert s in flat                                   # step numbers whole
        assert all(len(line.split()) > 0 for line in out.splitlines())
        rows = [line for line in out.splitlines() if "1000003" in line]
        assert rows and "KiB" in "".join(out.splitlines())
    if command == "inspect":
        ck = Checkpoint(step)
        for rec in ck.manifest.files.values():
            assert str(rec.size) in flat.replace(" B ", " ") or "B" in flat


def test_ls_piped_without_columns_is_wide(run_dir, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    rc, out, _ = run_main(capsys, ["ls", str(run_dir)])
    assert rc == 0 and "…" not in out
    assert "loss=" in out and "tokens=1.00000e+15" in out.replace("\n", "").replace("│", "").replace(" ", "") \
        or "tokens=1000000000000000" in out


# --- --help shows defaults ---------------------------------------------------------------------

@pytest.mark.parametrize("command,expected", [
    ("gc", ["default: 3", "default: min", "default: step"]),
    ("ls", ["default: step", "default: min"]),
    ("diff", ["default: 0.0"]),
    ("demo", ["default: 12", "default: 3", "default: 7", "default: ray"]),
    ("export", ["default: model"]),
])
def test_help_shows_defaults(capsys, command, expected):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in expected:
        assert text in out, (text, out)
    assert "default: None" not in out and "default: False" not in out


# --- a missing path exits 2 everywhere -----------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["ls", "{m}"], ["inspect", "{m}"], ["verify", "{m}"], ["verify", "{good}", "{m}"], ["diff", "{good}", "{m}"],
    ["diff", "{m}", "{good}"], ["gc", "{m}"], ["gc", "{m}", "--dry-run"], ["convert", "{m}", "{new}"],
    ["export", "--safetensors", "{m}", "{new}.safetensors"], ["inspect", "{m}", "--json"], ["verify", "{m}", "--json"],
])
def test_missing_path_exits_2(run_dir, tmp_path, capsys, argv):
    subst = {"m": str(tmp_path / "missing"), "good": str(run_dir / "step_1000001"), "new": str(tmp_path / "new")}
    rc, out, err = run_main(capsys, [a.format(**subst) for a in argv])
    assert rc == 2, (argv, out, err)
    assert "missing" in err and "no such" in err


# --- verify DIR --------------------------------------------------------------------------

def test_verify_manager_directory_checks_every_step(run_dir, capsys):
    rc, out, _ = run_main(capsys, ["verify", str(run_dir)])
    assert rc == 0 and out.count("OK ") == 3 and "3 of 3 checkpoints OK" in out
    ck = Checkpoint(run_dir / "step_1000002")
    shard = min(ck.manifest.files)
    with open(run_dir / "step_1000002" / shard, "r+b") as f:
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    (run_dir / "step_1000009").mkdir()                           # not committed
    rc, out, _ = run_main(capsys, ["verify", str(run_dir)])
    assert rc == 1
    assert "FAILED  " + str(run_dir / "step_1000002") in out and shard in out
    assert str(run_dir / "step_1000009") in out
    assert "2 of 4 checkpoints OK" in out
    rc, out, _ = run_main(capsys, ["verify", str(run_dir), "--json"])
    assert rc == 1 and len(json.loads(out)) == 4


# --- diff / inspect verify what they read ----------------------------------------------------

def _damage_unread_bytes(ck_path: Path) -> str:
    """Flip a byte of a stored shard's zip central directory: no chunk CRC covers it, so a
    load (which never reads it) succeeds, but the file fails its xxh3-64."""
    ck = Checkpoint(ck_path)
    name = min(f for f, r in ck.manifest.files.items() if r.item == "model")
    p = ck_path / name
    with zipfile.ZipFile(p) as zf:
        assert zf.infolist()
    data = bytearray(p.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 40] ^= 0x01                                        # inside the central directory entry
    p.write_bytes(bytes(data))
    return name


def test_diff_and_inspect_report_a_file_that_fails_its_checksum(run_dir, tmp_path, capsys):
    a = run_dir / "step_1000001"
    b = tmp_path / "copy"
    save_items(b, {"model": tree(1000001), "optimizer": tree(2)}, step=1000001, num_shards=3)
    name = _damage_unread_bytes(b)
    assert Checkpoint(b).read_arrays("model")                    # a load does not notice
    rc, out, err = run_main(capsys, ["diff", str(a), str(b)])
    assert rc == 1 and "identical" not in out
    assert name in err and "damaged" in err
    rc, out, _ = run_main(capsys, ["diff", str(a), str(b), "--json"])
    data = json.loads(out)
    assert rc == 1 and data["damage"]["b"] and not data["damage"]["a"] and data["identical"] is False
    rc, out, _ = run_main(capsys, ["diff", str(a), str(b), "--no-verify"])
    assert rc == 0 and "identical" in out                        # what --no-verify compares is equal
    rc, out, _ = run_main(capsys, ["inspect", str(b)])
    assert rc == 1 and "DAMAGED" in out and name in out
    rc, out, _ = run_main(capsys, ["inspect", str(a)])
    assert rc == 0 and "checksums: OK" in out


# --- bfloat16 into float32 targets -----------------------------------------------------------

def test_bfloat16_casts_follow_the_one_cast_rule(tmp_path):
    """bfloat16 -> float32 keeps every value: silent (#18.7); float32 -> bfloat16 loses
    bits: one warning for the dtype pair, naming its keys, however many arrays it covers."""
    bf = {f"w{i}": np.arange(6).astype(ml_dtypes.bfloat16) for i in range(5)}
    path = save_items(tmp_path / "c", {"model": bf})
    target = {k: np.zeros(6, np.float32) for k in bf}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        restored, _ = Checkpoint(path).restore("model", target)
    assert not [w for w in caught if "bfloat16" in str(w.message)], [str(w.message) for w in caught]
    assert all(np.asarray(v).dtype == np.float32 for v in restored.values())
    f32 = save_items(tmp_path / "f", {"model": {k: np.full(6, 1 / 3, np.float32) for k in bf}})
    same = {k: np.zeros(6, ml_dtypes.bfloat16) for k in bf}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        restored, _ = Checkpoint(f32).restore("model", same)
    mine = [w for w in caught if "bfloat16" in str(w.message)]
    assert len(mine) == 1 and "float32" in str(mine[0].message) and "w4" in str(mine[0].message)
    assert all(np.asarray(v).dtype == ml_dtypes.bfloat16 for v in restored.values())


# --- demo ----------------------------------------------------------------------------------

def test_demo_events_are_text():
    from shardckpt.tools.demo import describe_event
    assert describe_event({"event": "step", "step": 3, "loss": 2.5}) == "step 3: loss 2.5000"
    assert "saved" in describe_event({"event": "saved", "step": 5, "loss": 1.0})
    assert describe_event({"event": "resumed", "step": 5}).startswith("resumed from")
    assert "{" not in describe_event({"event": "done", "digest": "abc"})


def test_demo_refuses_a_non_empty_dir(tmp_path, capsys):
    (tmp_path / "precious").write_text("x")
    rc, _, err = run_main(capsys, ["demo", "--dir", str(tmp_path), "--backend", "threads"])
    assert rc == 2 and "not an empty directory" in err
    assert (tmp_path / "precious").read_text() == "x"


@pytest.mark.parametrize("cleanup", [False, pytest.param(True, marks=pytest.mark.stress)])
def test_demo_keeps_its_checkpoints_in_dir(tmp_path, capsys, cleanup):
    d = tmp_path / "demo"
    argv = ["demo", "--dir", str(d), "--backend", "threads", "--steps", "4", "--save-every", "2", "--kill-after", "1"]
    rc, out, err = run_main(capsys, argv + (["--cleanup"] if cleanup else []))
    assert rc == 0, out + err
    assert "child: step 0: loss" in out and "{'event'" not in out
    if cleanup:
        assert not d.exists() and "Removed" in out
    else:
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["step_1", "step_3"]
        assert f"shardckpt ls {d}" in out and f"shardckpt verify {d}" in out
        assert run_main(capsys, ["verify", str(d)])[0] == 0


# --- object stores -----------------------------------------------------------------------

def test_ls_and_gc_on_s3(s3_server, capsys):
    root = f"s3://ckpts/cli-{uuid.uuid4().hex[:6]}"
    q = f"?endpoint_url={s3_server.endpoint}"
    for step in (1, 2, 3):
        save_items(f"{root}/step_{step}{q}", {"model": tree(step)}, step=step, metrics={"loss": float(step)})
    rc, out, err = run_main(capsys, ["ls", root + q])
    assert rc == 0, err
    assert "3 checkpoints" in out and "loss=1" in out
    rc, out, _ = run_main(capsys, ["ls", root + q, "--json"])
    assert [c["step"] for c in json.loads(out)["checkpoints"]] == [1, 2, 3]
    rc, out, _ = run_main(capsys, ["gc", root + q, "--max-to-keep", "1", "--best-metric", "loss",
                                   "--best-to-keep", "1", "--dry-run"])
    assert rc == 0 and "would delete step_2" in out
    rc, out, _ = run_main(capsys, ["gc", root + q, "--max-to-keep", "1", "--best-to-keep", "0", "--json"])
    assert rc == 0 and json.loads(out)["deleted_steps"] == [1, 2]
    rc, out, _ = run_main(capsys, ["ls", root + q, "--json"])
    assert [c["step"] for c in json.loads(out)["checkpoints"]] == [3]
    rc, out, _ = run_main(capsys, ["ls", f"s3://ckpts/nothing-here{q}"])
    assert rc == 0 and "no committed checkpoints" in out


def test_item_save_carries_over_again_when_the_checkpoint_changed_on_s3(s3_server, monkeypatch):
    """Object stores have no lock: the committer re-reads the manifest right before its PUT
    and carries over again if another save published meanwhile (compare-and-retry). Here
    a save of "optimizer" lands between the carry-over of a save of "model" and its
    publish; the model save notices, carries over again, and both items survive."""
    import shardckpt.saving.commit as txn
    uri = f"s3://ckpts/retry-{uuid.uuid4().hex[:6]}/ck?endpoint_url={s3_server.endpoint}"
    save_items(uri, {"model": tree(0), "optimizer": tree(0)}, keep_other_items=True)
    real, calls = txn.carry_over, []

    def carry_over_then_race(previous, staging, items, *a, **kw):
        out = real(previous, staging, items, *a, **kw)
        calls.append(sorted(items))
        if items == {"model"} and len(calls) == 1:
            save_items(uri, {"optimizer": tree(7)}, keep_other_items=True)   # the racing save
        return out
    monkeypatch.setattr(txn, "carry_over", carry_over_then_race)
    save_items(uri, {"model": tree(5)}, keep_other_items=True)
    assert calls == [["model"], ["optimizer"], ["model"]]          # the model save carried over twice
    ck = Checkpoint(uri)
    np.testing.assert_array_equal(ck.read_arrays("model")["w"], tree(5)["w"])
    np.testing.assert_array_equal(ck.read_arrays("optimizer")["w"], tree(7)["w"])   # not reverted


# --- #18.8 polish ----------------------------------------------------------------------------------

def test_version_and_a_help_that_imports_no_jax():
    import subprocess
    import sys
    import time

    from shardckpt import __version__
    r = subprocess.run([sys.executable, "-m", "shardckpt.tools.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"shardckpt {__version__}"
    code = ("import sys, time; t = time.perf_counter(); from shardckpt.tools.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX', 'jax' in sys.modules, 'RAY', 'ray' in sys.modules, file=sys.stderr)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    took = time.perf_counter() - t
    assert "JAX False RAY False" in r.stderr, r.stderr
    assert "usage: shardckpt" in r.stdout
    print(f"\n--help in a fresh interpreter: {took:.2f} s")


def test_verify_lists_steps_in_numeric_order(tmp_path, capsys):
    for step in (11, 5, 8, 100):
        save_items(tmp_path / "run" / f"step_{step}", {"model": tree(step)}, step=step)
    rc, out, _ = run_main(capsys, ["verify", str(tmp_path / "run")])
    assert rc == 0
    shown = [int(line.split("step_")[1].split()[0]) for line in out.splitlines() if "step_" in line]
    assert shown == [5, 8, 11, 100]


def test_inspect_and_diff_of_a_manager_directory_name_the_right_command(run_dir, capsys):
    rc, _, err = run_main(capsys, ["inspect", str(run_dir)])
    assert rc == 2 and f"shardckpt ls {run_dir}" in err and "damaged" not in err.lower()
    rc, _, err = run_main(capsys, ["diff", str(run_dir), str(run_dir / "step_1000001")])
    assert rc == 2 and "directory of checkpoints" in err and "shardckpt diff" in err


def test_ls_of_one_checkpoint_directory_shows_it(run_dir, capsys):
    rc, out, _ = run_main(capsys, ["ls", str(run_dir / "step_1000002")])
    assert rc == 0 and "1000002" in out and "1 checkpoints" in out
    rc, out, _ = run_main(capsys, ["ls", str(run_dir / "step_1000002"), "--json"])
    assert [c["step"] for c in json.loads(out)["checkpoints"]] == [1000002]


def test_gc_says_what_it_could_not_remove(run_dir, capsys):
    """A leftover gc cannot remove (a read-only mount, another user's files): gc names it and
    exits 1 instead of reporting success (it exited 0 and never mentioned it)."""
    import errno
    import os

    from shardckpt.testing import Fault, FaultPlan
    from tests.conftest import dead_pid, this_host
    leftover = run_dir / f".step_1000004.tmp-{this_host()}-{dead_pid()}-0000deadbeef"
    leftover.mkdir()
    (leftover / "x.npz").write_bytes(b"x")
    with FaultPlan(Fault("remove", ".step_1000004.tmp-*", errno.EROFS, times=1 << 30)):
        rc, out, _ = run_main(capsys, ["gc", str(run_dir)])
    assert rc == 1 and "could not remove" in out and leftover.name in out and "Read-only" in out
    assert leftover.exists()
    with FaultPlan(Fault("remove", ".step_1000004.tmp-*", errno.EROFS, times=1 << 30)):
        rc, out, _ = run_main(capsys, ["gc", str(run_dir), "--json"])
    assert rc == 1 and json.loads(out)["failed"][0]["name"] == leftover.name
    rc, out, _ = run_main(capsys, ["gc", str(run_dir)])
    assert rc == 0 and not os.path.exists(leftover)


def test_a_save_and_a_load_leave_one_summary_line(tmp_path, caplog):
    """After its (transient) progress bar, a save or load leaves one line with the bytes, the
    seconds and the rate, in binary units: on stderr where the bar was drawn, and in the
    ``shardckpt`` logger."""
    import logging

    from shardckpt import restore, save
    caplog.set_level(logging.INFO, logger="shardckpt")
    save(tmp_path / "c", {"w": np.zeros((256, 256), np.float32)}, progress=True)
    restore(tmp_path / "c", progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "shardckpt"]
    assert any(line.startswith("saved c: 256.") and "KiB in" in line and "/s" in line for line in lines), lines
    assert any(line.startswith("loaded c: 256.") for line in lines), lines
