"""The ``shardckpt`` command (ls, inspect, verify, diff, gc) and ``shardckpt.verify``.

A dozen tests run the installed entry point in a subprocess (each pays a jax import); the
many cases behind them (every kind of damage, retention plans, leftovers, diffs) call the
Python functions or ``cli.main`` in-process. Threads backend only; checkpoints "written by
Ray" are made with an executor that reports a Ray writer identity (the format is the same).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import dead_pid, this_host
from flax import nnx

import shardckpt
from shardckpt import CheckpointManager, LMModel, ModelConfig, VerifyReport
from shardckpt.executors.threads import ThreadExecutor
from shardckpt.format.manifest import seal_manifest
from shardckpt.format.shard import write_shard, writer_identity
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items
from shardckpt.tools import cli
from shardckpt.tools.inspect import describe, diff, gc_plan, leftovers, list_dir
from shardckpt.workers import run_all

LOSSES = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0}      # best (min) is step 2, latest step 4


# --------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    exe = shutil.which("shardckpt")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "shardckpt.tools.cli", *args]
    env = dict(os.environ, COLUMNS="200", JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def main_json(capsys, *args: str) -> tuple[int, object]:
    capsys.readouterr()
    rc = cli.main([*args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def small_tree(scale: float = 1.0) -> dict:
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4) * scale,
            "b": (np.arange(5) * scale).astype(ml_dtypes.bfloat16),
            "n": np.int32(7), "flag": np.array([True, False]),
            "k": np.arange(6, dtype=np.int64),
            "count": 3, "name": "hi"}


def save_small(path: Path, *, compress: bool = False, executor=None, tree=None, **kw) -> Path:
    tree = small_tree() if tree is None else tree
    return save_items(path, {"model": tree, "extra": {"x": np.linspace(0, 1, 8).reshape(2, 4)}},
                           step=5, json_files={"config.json": {"model_config": {"hidden": 4}, "step": 5}},
                           metrics={"loss": 0.5}, num_shards=2, compress=compress, executor=executor, **kw)


class RayLikeExecutor(ThreadExecutor):
    """Writes like the thread executor but reports writers the way Ray actors do."""

    def write_shards(self, staging, plans, *, compress, progress=None, deadline=None, writer=None):
        def write(i_plan):
            i, plan = i_plan
            ident = writer_identity(writer=f"writer-{i}@0123abcd", node_id="0123abcd" * 7, backend="ray")
            return write_shard(staging, plan.file, plan.members, compress=compress,
                               progress=progress, writer=ident)
        return run_all(write, list(enumerate(plans)), self.num_workers)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Pristine checkpoints, copied by the tests that damage them."""
    root = tmp_path_factory.mktemp("cli")
    save_small(root / "small")
    save_small(root / "packed", compress=True)
    save_small(root / "raylike", executor=RayLikeExecutor(2))
    mgr = CheckpointManager(root / "run", max_to_keep=None, backend="threads")
    model = LMModel(ModelConfig(), rngs=nnx.Rngs(0))
    for step, loss in LOSSES.items():
        mgr.save(step, model, metrics={"loss": loss, "acc": 1.0 / step})
    return root


def copy_of(store: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(store / name, dst, symlinks=True)
    return dst


def shard(path: Path, item: str = "model", n: int = -1) -> str:
    return sorted(f for f, r in Checkpoint(path).manifest.files.items() if r.item == item)[n]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def chunk_offset(path: Path, fname: str) -> int:
    rows = [c for by_key in Checkpoint(path).index().values() for rs in by_key.values()
            for f, c in rs if f == fname and c.nbytes]
    if rows[0].data_offset is None:      # compressed: somewhere in the first member's stream
        return 80
    return rows[0].data_offset + rows[0].nbytes // 2


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip()[1:-1].split("│")] for line in text.splitlines()
            if line.startswith("│")]


# --------------------------------------------------------------------------------------
# through the installed entry point
# --------------------------------------------------------------------------------------
def test_ls_marks_best_and_latest(store):
    run = store / "run"
    p = run_cli("ls", str(run), "--best-metric", "loss", "--best-mode", "min")
    assert p.returncode == 0, p.stderr
    rows = {int(r[0]): r for r in table_rows(p.stdout)}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[2][-1] == "best" and rows[4][-1] == "latest"
    assert rows[1][-1] == rows[3][-1] == ""
    assert "loss=1" in " ".join(rows[2]) and "KiB" in " ".join(rows[2])

    p = run_cli("ls", str(run), "--json", "--best-metric", "acc", "--best-mode", "max")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    marks = {c["step"]: (c["latest"], c["best"]) for c in data["checkpoints"]}
    assert marks == {1: (False, True), 2: (False, False), 3: (False, False), 4: (True, False)}
    assert all(c["bytes"] > 0 and c["created"] and c["metrics"]["loss"] == LOSSES[c["step"]]
               for c in data["checkpoints"])
    assert data["leftovers"] == [] and data["invalid"] == []


def test_inspect_shows_dtypes_and_writers(store):
    p = run_cli("inspect", str(store / "small"))
    assert p.returncode == 0, p.stderr
    arrays = {r[0]: r for r in table_rows(p.stdout) if len(r) == 5}
    assert arrays["b"][1:3] == ["bfloat16", "(5,)"]
    assert arrays["w"][1:3] == ["float32", "(3, 4)"]
    assert arrays["x"][1] == "float64"
    shards = [r for r in table_rows(p.stdout) if len(r) == 8]
    assert {r[3] for r in shards} == {"threads"} and {r[4] for r in shards} >= {"thread-0"}
    assert all(r[6].isdigit() and r[7] for r in shards)
    assert "'hi'" in p.stdout and "config.json" in p.stdout and "loss=0.5" in p.stdout

    p = run_cli("inspect", str(store / "raylike"), "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert {a["key"]: a["dtype"] for a in data["items"]["model"]["arrays"]}["b"] == "bfloat16"
    assert data["items"]["model"]["scalars"] == {"count": 3, "name": "hi"}
    writers = {(w["backend"], w["writer"], w["node_id"]) for w in data["writers"]}
    assert ("ray", "writer-0@0123abcd", "0123abcd" * 7) in writers
    assert all(f["writer"]["pid"] and f["writer"]["host"] for f in data["files"])
    assert data["config"]["model_config"] == {"hidden": 4} and data["metrics"] == {"loss": 0.5}


def test_verify_good_checkpoints_exit_0(store):
    p = run_cli("verify", str(store / "small"), str(store / "packed"), str(store / "raylike"),
                str(store / "run" / "step_4"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") >= 4 and "FAILED" not in p.stdout


def test_verify_flipped_byte_exit_1_names_file(store, tmp_path):
    ck = copy_of(store, "small", tmp_path)
    fname = shard(ck)
    flip_byte(ck / fname, chunk_offset(ck, fname))
    p = run_cli("verify", str(ck))
    assert p.returncode == 1
    assert "FAILED" in p.stdout and fname in p.stdout and "CRC-32" in p.stdout


def test_verify_truncated_missing_and_stray_json(store, tmp_path):
    truncated, missing, stray = (copy_of(store, "small", tmp_path / n) for n in ("t", "m", "s"))
    t_file, m_file = shard(truncated), shard(missing, "extra", 0)
    os.truncate(truncated / t_file, (truncated / t_file).stat().st_size - 10)
    os.remove(missing / m_file)
    (stray / "notes.txt").write_text("not ours")
    p = run_cli("verify", "--json", str(truncated), str(missing), str(stray), str(store / "small"))
    assert p.returncode == 1
    reports = json.loads(p.stdout)
    assert [r["ok"] for r in reports] == [False, False, False, True]
    assert any(t_file in x and "bytes" in x for x in reports[0]["problems"])
    assert any(m_file in x and "missing" in x for x in reports[1]["problems"])
    assert reports[2]["problems"] == [f"{stray}: stray file notes.txt is not listed in the manifest"]


def test_diff_identical_and_modified(store, tmp_path):
    p = run_cli("diff", str(store / "small"), str(store / "raylike"))   # same data, other writers
    assert p.returncode == 0, p.stdout + p.stderr
    assert "identical" in p.stdout

    tree = small_tree()
    tree["w"][1, 2] += 0.25
    other = save_small(tmp_path / "other", tree=tree)
    p = run_cli("diff", str(store / "small"), str(other))
    assert p.returncode == 1
    rows = {r[0]: r for r in table_rows(p.stdout)}
    assert list(rows) == ["w"]
    assert rows["w"][1:] == ["differs", "float32", "(3, 4)", "1", "0.25"]
    assert "different" in p.stdout


def _gc_dir(store: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = copy_of(store, "run", tmp_path)
    stale = run / f".step_9.tmp-{this_host()}-{dead_pid()}-0123456789ab"
    stale.mkdir()
    (stale / "model-00000-of-00001.npz").write_bytes(b"half written")
    return run, stale


def test_gc_dry_run_changes_nothing(store, tmp_path):
    run, stale = _gc_dir(store, tmp_path)
    before = sorted(os.listdir(run))
    p = run_cli("gc", str(run), "--max-to-keep", "1", "--best-metric", "loss", "--best-to-keep", "1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(run)) == before
    assert f"would remove leftover {stale.name}" in p.stdout
    assert "would delete step_1" in p.stdout and "would delete step_3" in p.stdout
    assert "step_2" not in p.stdout.replace("kept steps", "") and "would delete step_4" not in p.stdout


def test_gc_deletes_retired_steps_and_stale_tmp(store, tmp_path):
    run, stale = _gc_dir(store, tmp_path)
    p = run_cli("gc", str(run), "--max-to-keep", "1", "--best-metric", "loss", "--best-to-keep", "1", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["deleted_steps"] == [1, 3] and data["kept_steps"] == [2, 4]
    assert [lo["name"] for lo in data["leftovers"]] == [stale.name]
    assert sorted(os.listdir(run)) == ["step_2", "step_4"]
    assert CheckpointManager(run, max_to_keep=None).all_steps() == [2, 4]


def test_usage_error_exit_2(tmp_path):
    p = run_cli("inspect", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "no such" in p.stderr


# --------------------------------------------------------------------------------------
# shardckpt.verify (Python API)
# --------------------------------------------------------------------------------------
def test_verify_report_of_a_good_checkpoint(store):
    r = shardckpt.verify(store / "small")
    assert isinstance(r, VerifyReport) and r.ok and r.problems == []
    m = Checkpoint(store / "small").manifest
    assert r.files_checked == len(m.files) + len(m.meta_files) + 1
    assert r.bytes_checked == sum(x.size for x in [*m.files.values(), *m.meta_files.values()])
    assert r.arrays == 6
    json.dumps(r.to_json())
    for name in ("packed", "raylike", "run/step_1"):
        assert shardckpt.verify(store / name, progress=True).ok, name
    quick = shardckpt.verify(store / "small", checksums=False)
    assert quick.ok and quick.bytes_checked == 0 and not quick.checksums


def _damage(kind: str, ck: Path) -> str:
    """Damage ``ck`` in one way; return the file name a problem must mention."""
    m = Checkpoint(ck).manifest
    s = shard(ck)
    if kind == "flip-shard-data":
        flip_byte(ck / s, chunk_offset(ck, s))
    elif kind == "flip-shard-zip-header":          # not inside any chunk: only xxh3 sees it
        flip_byte(ck / s, 2)
    elif kind == "truncate-shard":
        os.truncate(ck / s, 40)
    elif kind == "extend-shard":
        with open(ck / s, "ab") as f:
            f.write(b"\0")
    elif kind == "empty-shard":
        os.truncate(ck / s, 0)
    elif kind == "missing-shard":
        os.remove(ck / s)
    elif kind == "symlinked-shard":
        (ck.parent / "elsewhere.npz").write_bytes((ck / s).read_bytes())
        os.remove(ck / s)
        os.symlink(ck.parent / "elsewhere.npz", ck / s)
    elif kind == "shard-is-directory":
        os.remove(ck / s)
        os.mkdir(ck / s)
    elif kind == "swapped-shards":
        a, b = sorted(f for f, r in m.files.items() if r.item == "extra")
        (ck / a).rename(ck / "tmp")
        (ck / b).rename(ck / a)
        (ck / "tmp").rename(ck / b)
        return a
    elif kind == "flip-config":
        flip_byte(ck / "config.json", 5)
        return "config.json"
    elif kind == "missing-structure":
        os.remove(ck / "structure.json")
        return "structure.json"
    elif kind == "flip-index":
        flip_byte(ck / "index.msgpack", 20)
        return "index.msgpack"
    elif kind == "stray-file":
        (ck / "model-00009-of-00009.npz").write_bytes(b"PK")
        return "model-00009-of-00009.npz"
    elif kind == "stray-dir":
        os.mkdir(ck / "subdir")
        return "subdir"
    elif kind == "stray-symlink":
        os.symlink("/etc/passwd", ck / "passwd")
        return "passwd"
    elif kind == "manifest-size-tampered":
        d = json.loads((ck / "manifest.json").read_text())
        d["files"][s]["size"] += 8
        (ck / "manifest.json").write_text(json.dumps(seal_manifest(d)))
    elif kind == "manifest-checksum-tampered":
        d = json.loads((ck / "manifest.json").read_text())
        d["files"][s]["xxh3_64"] = "0" * 16
        (ck / "manifest.json").write_text(json.dumps(seal_manifest(d)))
    elif kind == "manifest-garbage":
        (ck / "manifest.json").write_bytes(b"{\"format\": \"shardckpt\", \"ver")
        return "manifest"
    elif kind == "manifest-escaping-path":
        d = json.loads((ck / "manifest.json").read_text())
        d["files"]["../outside.npz"] = d["files"].pop(s)
        (ck / "manifest.json").write_text(json.dumps(seal_manifest(d)))
        return "outside.npz"
    elif kind == "manifest-missing":
        os.remove(ck / "manifest.json")
        return "manifest.json"
    else:
        raise AssertionError(kind)
    return s


DAMAGE = ["flip-shard-data", "flip-shard-zip-header", "truncate-shard", "extend-shard", "empty-shard",
          "missing-shard", "symlinked-shard", "shard-is-directory", "swapped-shards", "flip-config",
          "missing-structure", "flip-index", "stray-file", "stray-dir", "stray-symlink",
          "manifest-size-tampered", "manifest-checksum-tampered", "manifest-garbage",
          "manifest-escaping-path", "manifest-missing"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_reports_damage_naming_the_file(store, tmp_path, kind):
    ck = copy_of(store, "small", tmp_path)
    name = _damage(kind, ck)
    r = shardckpt.verify(ck)
    assert not r.ok and r.problems, kind
    assert any(name in p for p in r.problems), (kind, name, r.problems)


@pytest.mark.parametrize("kind", ["flip-shard-data", "truncate-shard"])
def test_verify_compressed_checkpoint(store, tmp_path, kind):
    ck = copy_of(store, "packed", tmp_path)
    name = _damage(kind, ck)
    r = shardckpt.verify(ck)
    assert not r.ok and any(name in p for p in r.problems), r.problems


def test_verify_flip_inside_chunk_names_the_key(store, tmp_path):
    ck = copy_of(store, "small", tmp_path)
    s = shard(ck)
    flip_byte(ck / s, chunk_offset(ck, s))
    problems = shardckpt.verify(ck).problems
    assert any("xxh3" in p and s in p for p in problems)
    assert any("CRC-32" in p and s in p and "'" in p for p in problems)


def test_verify_reads_chunks_across_block_boundaries(store, tmp_path, monkeypatch):
    import shardckpt.tools.verify as verification
    monkeypatch.setattr(verification, "READ_BLOCK", 7)     # every chunk spans many reads
    assert shardckpt.verify(store / "small").ok and shardckpt.verify(store / "run" / "step_2").ok
    ck = copy_of(store, "small", tmp_path)
    s = shard(ck)
    rows = {c.key: c for by_key in Checkpoint(ck).index().values() for rs in by_key.values()
            for f, c in rs if f == s}
    c = next(c for _, c in sorted(rows.items()) if c.nbytes > 1)
    flip_byte(ck / s, c.data_offset + c.nbytes - 1)          # the last byte of one chunk
    problems = shardckpt.verify(ck).problems
    assert [p for p in problems if "CRC-32" in p] == [
        f"{ck}: {s}: CRC-32 mismatch in the chunk of {c.key!r} (member {c.member!r}, offset {list(c.offset)})"]


def test_verify_without_checksums_checks_structure_only(store, tmp_path):
    ck = copy_of(store, "small", tmp_path)
    s = shard(ck)
    flip_byte(ck / s, chunk_offset(ck, s))
    assert shardckpt.verify(ck, checksums=False).ok           # same size: not seen
    os.truncate(ck / s, 10)
    r = shardckpt.verify(ck, checksums=False)
    assert not r.ok and any(s in p for p in r.problems)


@pytest.mark.parametrize("what", ["nowhere", "a-file", "empty-dir", "user-files"])
def test_verify_of_something_that_is_not_a_checkpoint(tmp_path, what):
    p = tmp_path / what
    if what == "a-file":
        p.write_text("x")
    elif what == "empty-dir":
        p.mkdir()
    elif what == "user-files":
        p.mkdir()
        (p / "notes.txt").write_text("mine")
    r = shardckpt.verify(p)
    assert not r.ok and len(r.problems) == 1 and str(p) in r.problems[0]
    assert r.layout == ""


def _legacy_dir(path: Path, marker: Path | None = None) -> Path:
    path.mkdir(parents=True)
    np.savez_compressed(path / "model.npz", **{"embed.embedding": np.arange(6, dtype=np.float32).reshape(2, 3),
                                               "head.bias": np.zeros(3, np.float32)})
    np.savez(path / "optimizer.npz", **{"opt_0": np.int32(4)})   # the original (compress=False): opt_<i> by position
    (path / "config.json").write_text(json.dumps({"model_config": {"hidden_size": 3}, "step": 4}))
    (path / "metrics.json").write_text(json.dumps({"loss": 2.5}))
    if marker is not None:
        class Boom:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        (path / "optimizer_meta.pkl").write_bytes(pickle.dumps(Boom()))
    return path


def test_legacy_layout_verify_and_inspect(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    old = _legacy_dir(tmp_path / "old", marker)
    r = shardckpt.verify(old)
    assert r.ok and r.layout == "legacy" and r.arrays == 3 and r.notes
    rc, data = main_json(capsys, "inspect", str(old))
    assert rc == 0 and data["layout"] == "legacy" and data["step"] == 4
    assert {a["key"]: (a["dtype"], a["shape"]) for a in data["items"]["model"]["arrays"]} == {
        "embed.embedding": ("float32", [2, 3]), "head.bias": ("float32", [3])}
    assert "optimizer" in data["items"] and data["metrics"] == {"loss": 2.5}
    assert cli.main(["inspect", str(old)]) == 0
    assert "embed.embedding" in capsys.readouterr().out
    assert not marker.exists()                                  # the pickle was never opened
    # A damaged member is caught by the zip CRCs.
    raw = bytearray((old / "optimizer.npz").read_bytes())
    pos = raw.index(b"\x04\x00\x00\x00", 60)                    # the int32 4 in the member data
    raw[pos] = 5
    (old / "optimizer.npz").write_bytes(bytes(raw))
    r = shardckpt.verify(old)
    assert not r.ok and any("optimizer.npz" in p for p in r.problems)


# --------------------------------------------------------------------------------------
# inspect / ls / diff / gc in-process
# --------------------------------------------------------------------------------------
def test_describe_lists_chunks_and_files(store):
    d = describe(store / "small")
    arrays = {a["key"]: a for a in d["items"]["model"]["arrays"]}
    assert arrays["w"]["nbytes"] == 48 and arrays["w"]["chunks"] >= 1 and arrays["w"]["files"]
    assert arrays["b"]["nbytes"] == 10 and arrays["n"]["shape"] == []
    assert d["total_bytes"] == sum(f["size"] for f in d["files"]) + sum(f["size"] for f in d["meta_files"])
    assert d["versions"]["shardckpt"] == shardckpt.__version__ and d["warnings"] == []
    json.dumps(d)


def test_inspect_of_a_corrupt_manifest_exits_1(store, tmp_path, capsys):
    ck = copy_of(store, "small", tmp_path)
    (ck / "manifest.json").write_text("[]")
    assert cli.main(["inspect", str(ck)]) == 1
    assert "manifest" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 2         # a directory, not a checkpoint
    other = copy_of(store, "small", tmp_path / "x")
    flip_byte(other / "index.msgpack", 20)                      # still inspectable, with a warning
    d = describe(other)
    assert any("index.msgpack" in w for w in d["warnings"])
    assert all(a["chunks"] is None for a in d["items"]["model"]["arrays"])
    # inspect verifies what it shows: the damage is reported and the exit code says so
    assert cli.main(["inspect", str(other)]) == 1
    out = capsys.readouterr().out
    assert "warning" in out and "DAMAGED" in out
    assert cli.main(["inspect", "--no-verify", str(other)]) == 0 and "warning" in capsys.readouterr().out


def test_ls_lists_invalid_dirs_and_leftovers(store, tmp_path, capsys):
    run = copy_of(store, "run", tmp_path)
    (run / "step_7").mkdir()                                       # no manifest: not committed
    shutil.copytree(run / "step_1", run / "step_8")
    (run / "step_8" / "manifest.json").write_text("{}")
    tmp = run / f".step_9.tmp-{this_host()}-{os.getpid()}-0123456789ab"
    tmp.mkdir()
    (run / "notes").mkdir()                                        # not ours: ignored
    rc, data = main_json(capsys, "ls", str(run))
    assert rc == 0
    assert [c["step"] for c in data["checkpoints"]] == [1, 2, 3, 4]
    assert not any(c["best"] for c in data["checkpoints"])         # no --best-metric
    assert {i["name"] for i in data["invalid"]} == {"step_7", "step_8"}
    assert [(lo["name"], lo["action"]) for lo in data["leftovers"]] == [(tmp.name, "keep")]
    assert cli.main(["ls", str(run), "--best-metric", "nope"]) == 0
    out = capsys.readouterr().out
    assert "none marked best" in out and "step_7" in out and tmp.name in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["ls", str(empty)]) == 0 and "no committed checkpoints" in capsys.readouterr().out


def test_leftover_actions_match_the_manager(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    save_small(d / "step_1")
    host, dead = this_host(), dead_pid()
    names = {
        "dead-tmp": f".step_3.tmp-{host}-{dead}-aa",
        "dead-del": f".step_2.del-{host}-{dead}-bb",
        "live-tmp": f".step_4.tmp-{host}-{os.getpid()}-cc",
        "young-foreign": f".step_5.tmp-otherhost-{dead}-dd",
        "old-foreign": f".step_6.tmp-otherhost-{dead}-ee",
        "old-restore": f".step_7.old-{host}-{dead}-ff",
        "old-obsolete": f".step_1.old-{host}-{dead}-12",
        "other-prefix": f".ckpt_1.tmp-{host}-{dead}-34",
    }
    for n in names.values():
        (d / n).mkdir()
    shutil.copytree(d / "step_1", d / names["old-restore"], dirs_exist_ok=True)
    os.utime(d / names["old-foreign"], (1, 1))
    plan = {lo["name"]: lo["action"] for lo in leftovers(d)}
    assert plan == {names["dead-tmp"]: "remove", names["dead-del"]: "remove", names["live-tmp"]: "keep",
                    names["young-foreign"]: "keep", names["old-foreign"]: "remove",
                    names["old-restore"]: "restore", names["old-obsolete"]: "remove"}
    CheckpointManager(d, max_to_keep=None)                          # the real cleanup
    left = set(os.listdir(d))
    for n, action in plan.items():
        assert (n in left) == (action == "keep"), n
    assert "step_7" in left and names["other-prefix"] in left


RETENTION = [  # (max_to_keep, best_metric, best_mode, best_to_keep, {step: metric or None})
    (2, None, "min", 3, {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}),
    (None, "loss", "min", 1, {1: 3.0, 2: 1.0, 3: 2.0}),
    (1, "loss", "min", 2, {1: 5.0, 2: 1.0, 3: 3.0, 4: 2.0, 5: 9.0}),
    (1, "loss", "max", 2, {1: 5.0, 2: 1.0, 3: 3.0, 4: 2.0, 5: 9.0}),
    (1, "loss", "min", 2, {1: 1.0, 2: None, 3: float("nan"), 4: 1.0, 5: None}),
    (2, "loss", "min", 0, {10: 0.0, 20: 5.0, 30: 6.0}),
]


@pytest.mark.parametrize("case", range(len(RETENTION)))
def test_gc_plan_matches_manager_retention(tmp_path, case):
    max_to_keep, metric, mode, best_k, steps = RETENTION[case]
    for step, value in steps.items():
        save_items(tmp_path / f"step_{step}", {"model": {"a": np.full(2, step)}}, step=step,
                        metrics=None if value is None else {"loss": value})
    plan = gc_plan(tmp_path, "step", max_to_keep, metric, mode, best_k)
    mgr = CheckpointManager(tmp_path, max_to_keep=max_to_keep, best_metric=metric, best_mode=mode,
                            best_to_keep=best_k)
    mkept, mdeleted = mgr.retention_plan()
    assert plan["kept_steps"] == [i.step for i in mkept]
    assert plan["deleted_steps"] == [i.step for i in mdeleted]
    marked = [c["step"] for c in list_dir(tmp_path, best_metric=metric or "loss", best_mode=mode)["checkpoints"]
              if c["best"]]
    mgr.best_metric = metric or "loss"
    assert marked == [mgr.best_step] or (not marked and mgr.best_step == max(steps))


def test_gc_keeps_everything_without_retention_options(store, tmp_path, capsys):
    run, stale = _gc_dir(store, tmp_path)
    assert cli.main(["gc", str(run)]) == 0
    assert "removed leftover" in capsys.readouterr().out
    assert sorted(os.listdir(run)) == ["step_1", "step_2", "step_3", "step_4"]
    rc, data = main_json(capsys, "gc", str(run), "--dry-run", "--max-to-keep", "3")
    assert rc == 0 and data["deleted_steps"] == [1] and data["leftovers"] == []
    assert sorted(os.listdir(run)) == ["step_1", "step_2", "step_3", "step_4"]


def test_diff_statuses(store, tmp_path, capsys):
    tree = small_tree()
    tree["w"] = tree["w"] + np.float32(1e-3)
    tree["k"] = tree["k"].reshape(2, 3)
    tree["n"] = np.float32(7)
    tree["count"] = 4
    del tree["flag"]
    tree["new"] = np.zeros(1)
    other = save_items(tmp_path / "o", {"model": tree}, step=1)
    d = diff(store / "small", other)
    assert not d["identical"]
    rows = {r["key"]: r for r in d["items"]["model"]["keys"]}
    assert rows["b"]["status"] == "equal" and rows["name"]["status"] == "equal"
    assert rows["w"]["status"] == "differs" and rows["w"]["differing"] == 12
    assert rows["w"]["max_abs_diff"] == pytest.approx(1e-3, rel=0.1)
    assert rows["k"]["status"] == "shape" and rows["k"]["b"] == [2, 3]
    assert rows["n"]["status"] == "dtype" and (rows["n"]["a"], rows["n"]["b"]) == ("int32", "float32")
    assert rows["count"]["status"] == "differs" and (rows["count"]["a"], rows["count"]["b"]) == (3, 4)
    assert d["items"]["model"]["only_in_a"] == ["flag"] and d["items"]["model"]["only_in_b"] == ["new"]
    assert d["only_in_a_items"] == ["extra"] and d["only_in_b_items"] == []
    rc, data = main_json(capsys, "diff", str(store / "small"), str(other), "--atol", "0.01")
    assert rc == 1 and {r["key"]: r["status"] for r in data["items"]["model"]["keys"]}["w"] == "close"
    assert cli.main(["diff", str(store / "small"), str(other), "--all"]) == 1
    out = capsys.readouterr().out
    assert "shape differs" in out and "dtype differs" in out and "only in B: new" in out

    close = small_tree()
    close["w"] = close["w"] + np.float32(1e-3)
    near = save_small(tmp_path / "near", tree=close)
    assert diff(store / "small", near, atol=1e-2)["identical"]
    assert not diff(store / "small", near, atol=1e-4)["identical"]
    assert cli.main(["diff", str(store / "small"), str(near), "--atol", "0.01"]) == 0


def test_diff_across_manager_steps_and_nan(store, tmp_path):
    same = diff(store / "run" / "step_1", store / "run" / "step_4")
    assert same["identical"]                                        # one model saved four times
    a = save_items(tmp_path / "a", {"m": {"v": np.array([1.0, np.nan, 3.0])}})
    b = save_items(tmp_path / "b", {"m": {"v": np.array([1.0, np.nan, -0.0])}})
    row = diff(a, b)["items"]["m"]["keys"][0]
    assert row["status"] == "differs" and row["differing"] == 1 and row["max_abs_diff"] == 3.0
    c = save_items(tmp_path / "c", {"m": {"v": np.array([1.0, 2.0, 3.0])}})
    assert diff(a, c)["items"]["m"]["keys"][0]["max_abs_diff"] == float("inf")
    s1 = save_items(tmp_path / "s1", {"m": {"v": np.zeros(2), "t": 1.5}})
    s2 = save_items(tmp_path / "s2", {"m": {"v": 2, "t": np.float64(1.5)}})
    d = diff(s1, s2)
    assert not d["identical"] and d["items"]["m"]["only_in_a"] == d["items"]["m"]["only_in_b"] == []
    assert {r["key"]: (r["status"], r["a"], r["b"]) for r in d["items"]["m"]["keys"]} == {
        "v": ("dtype", "float64", "scalar int"), "t": ("dtype", "scalar float", "float64")}


def test_diff_of_a_corrupt_checkpoint_exits_1(store, tmp_path, capsys):
    ck = copy_of(store, "small", tmp_path)
    s = shard(ck)
    flip_byte(ck / s, chunk_offset(ck, s))
    assert cli.main(["diff", str(store / "small"), str(ck)]) == 1
    assert s in capsys.readouterr().err


def test_usage_errors_in_process(store, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["verify"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["ls", str(store / "run"), "--best-mode", "median"])
    assert e.value.code == 2
    assert cli.main(["gc", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()                      # gc did not create it
    assert cli.main(["gc", str(store / "run"), "--max-to-keep", "0"]) == 2
    assert cli.main(["ls", str(store / "small" / "manifest.json")]) == 2
    assert cli.main(["ls", str(store / "run"), "--prefix", "../x"]) == 2
    assert cli.main(["diff", str(store / "small"), str(tmp_path / "nowhere")]) == 2
    assert cli.main(["diff", str(store / "small"), str(store / "small"), "--atol", "-1"]) == 2
    args = cli.build_parser().parse_args(["demo", "--backend", "threads", "--steps", "3"])
    assert (args.command, args.backend, args.steps, args.save_every, args.kill_after) == ("demo", "threads", 3, 3, 7)
