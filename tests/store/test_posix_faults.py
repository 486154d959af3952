"""I/O faults during a save: ENOSPC, EIO, EFBIG and failed fsyncs in a shard write, in the
metadata and manifest commit, in the publishing renames, and in retention deletes.

Faults come from three places, never from mocking the code under test:

- the storage seam ``shardckpt.storage.FaultPlan`` (real files, real fsyncs; a named
  operation on a named file raises the ``OSError`` a failing disk raises);
- ``RLIMIT_FSIZE`` in a worker process: the kernel refuses writes past the limit (EFBIG);
- a real, small filesystem (an ext4 image on a loop device, else a tmpfs) filled with a
  ballast file so that the disk really runs full at every point of a save (root only;
  skipped where mounting is not allowed).

Expected every time: a ``CheckpointError`` (``SaveAbortedError`` for the save itself) whose
message names what failed, every earlier checkpoint byte for byte intact, nothing left
behind, and the next save (disk healthy again) succeeds.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from shardckpt import CheckpointError, CheckpointManager, SaveAbortedError
from shardckpt.testing import Fault, FaultPlan, save_items
from tests.scenarios import probes
from tests.scenarios.reliability import Tiny, count, digest, forkserver, hidden_entries, read_model_arrays, record_figures, tree_for, verify_files

FIGURES = {"faults_injected": 0, "cases": 0}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def held(tmp_path):
    """A manager directory holding steps 1 and 2 (max_to_keep=3)."""
    directory = tmp_path / "ckpts"
    mgr = CheckpointManager(directory, max_to_keep=3, backend="threads", num_shards=3)
    for step in (1, 2):
        mgr.save(step, Tiny(tree_for(step)))
    return mgr


def _assert_intact(mgr: CheckpointManager, before: dict[str, bytes], steps=(1, 2)) -> None:
    assert _files(mgr.directory) == before, "an earlier checkpoint changed"
    assert hidden_entries(mgr.directory) == [], hidden_entries(mgr.directory)
    assert mgr.all_steps() == list(steps)
    for step in steps:
        assert digest(read_model_arrays(mgr.step_path(step))) == digest(tree_for(step))


# Points of a save, in the order a save reaches them. ``match`` is the file (or directory)
# name the fault hits; "{tmp}" is the save's hidden directory, "{dir}" the manager's.
SAVE_FAULTS = [
    ("write", "model-*.npz", errno.ENOSPC, "model-"),
    ("write", "model-*00001-of-*.npz", errno.EIO, "-00001-of-"),   # tagged with the save when incremental
    ("fsync", "model-*.npz", errno.EIO, "model-"),
    ("write", "config.json", errno.ENOSPC, "config.json"),
    ("write", "metrics.json", errno.EIO, "metrics.json"),
    ("fsync", "structure.json", errno.EIO, "structure.json"),
    ("write", "index.msgpack", errno.ENOSPC, "index.msgpack"),
    ("fsync", "index.msgpack", errno.EIO, "index.msgpack"),
    ("write", "manifest.json", errno.ENOSPC, "manifest.json"),
    ("fsync", "manifest.json", errno.EIO, "manifest.json"),
    ("fsync", ".step_*.tmp-*", errno.EIO, ".tmp-"),            # the directory, before the rename
    ("rename", "step_*", errno.EIO, "step_"),                   # the publishing rename
    ("exchange", "step_*", errno.EIO, "step_"),                 # the replacing exchange
    ("fsync", "ckpts", errno.EIO, "ckpts"),                     # the parent, after the rename
]


# (the exchange runs only when replacing; a replacement exchanges instead of renaming)
SAVE_CASES = [(kind, *fault) for fault in SAVE_FAULTS
              for kind in ("new", "replace", "replace-fallback", "compressed")
              if not (fault[0] == "exchange" and kind != "replace") and not (fault[0] == "rename" and kind == "replace")]


@pytest.mark.parametrize("kind, point, match, code, named", SAVE_CASES,
                         ids=[f"{k}-{p}-{m}-{errno.errorcode[c]}" for k, p, m, c, _ in SAVE_CASES])
def test_fault_during_save(held, point, match, code, named, kind):
    mgr = held
    before = _files(mgr.directory)
    step = 3 if kind in ("new", "compressed") else 2
    mgr.compress = kind == "compressed"
    faults = [Fault(point, match, code)]
    if kind == "replace-fallback":   # a filesystem without renameat2(RENAME_EXCHANGE)
        faults.append(Fault("exchange", "*", errno.EINVAL, times=10**6))
    with FaultPlan(*faults) as plan:
        with pytest.raises(SaveAbortedError) as e:
            mgr.save(step, Tiny(tree_for(step, 1)), metrics={"loss": 1.0})
    fired = [f for f in plan.fired if f[0] == point]
    assert fired, f"the fault never fired: {plan.calls}"
    FIGURES["faults_injected"] += len(plan.fired)
    FIGURES["cases"] += 1
    msg = str(e.value)
    assert named in msg and os.strerror(code) in msg, msg
    assert "nothing was committed" in msg
    _assert_intact(mgr, before)
    # The disk is healthy again: the same save goes through.
    mgr.save(step, Tiny(tree_for(step, 1)))
    assert digest(read_model_arrays(mgr.step_path(step))) == digest(tree_for(step, 1))
    verify_files(mgr.step_path(step))
    assert hidden_entries(mgr.directory) == []


@pytest.mark.parametrize("seed", range(count(6, 60)))
def test_fault_at_a_random_write(held, seed):
    """ENOSPC/EIO at the n-th write or fsync of a save, n random: the same outcome."""
    rng = random.Random(seed)
    mgr = held
    mgr.num_shards = rng.choice([1, 2, 5])
    mgr.compress = rng.random() < 0.3
    before = _files(mgr.directory)
    with FaultPlan() as probe:       # count the operations of this save first
        mgr.save(3, Tiny(tree_for(3, seed)))
    ops = [c for c in probe.calls if c[0] in ("write", "fsync")]
    shutil.rmtree(mgr.step_path(3))
    point = rng.choice(ops)[0]
    n = sum(1 for c in ops if c[0] == point)
    code = rng.choice([errno.ENOSPC, errno.EIO])
    with FaultPlan(Fault(point, "*", code, after=rng.randrange(n))) as plan:
        with pytest.raises(SaveAbortedError, match=os.strerror(code)):
            mgr.save(3, Tiny(tree_for(3, seed)))
    assert plan.fired
    FIGURES["faults_injected"] += len(plan.fired)
    FIGURES["cases"] += 1
    _assert_intact(mgr, before)


def test_direct_io_refused_mid_file_falls_back_to_buffered(tmp_path):
    """O_DIRECT accepted at open, refused (EINVAL) at the first write: the shard is written
    again buffered, byte-identical to an undisturbed save."""
    from shardckpt.store.local import FileSink
    probe = FileSink(str(tmp_path / "probe"))
    direct = probe.direct
    probe.abort()
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT at open")
    tree = {"a": np.arange(3 << 20, dtype=np.uint8).reshape(3, -1), "b": np.ones(5)}
    ref = save_items(tmp_path / "ref", {"s": tree}, num_shards=1)
    with FaultPlan(Fault("write", "s-*.npz", errno.EINVAL)) as plan:
        out = save_items(tmp_path / "out", {"s": tree}, num_shards=1)
    assert plan.fired
    FIGURES["faults_injected"] += len(plan.fired)
    name = "s-00000-of-00001.npz"
    assert (out / name).read_bytes() == (ref / name).read_bytes()
    verify_files(out)


# --- retention deletes ------------------------------------------------------------------------

def test_retention_rename_fails(tmp_path):
    """The rename that hides a doomed checkpoint fails: the save itself is committed, the
    error says which delete failed, and the old checkpoint stays whole and listed."""
    mgr = CheckpointManager(tmp_path / "ckpts", max_to_keep=2, backend="threads")
    for step in (1, 2):
        mgr.save(step, Tiny(tree_for(step)))
    step1 = _files(mgr.step_path(1))
    with FaultPlan(Fault("rename", "step_1", errno.EIO)) as plan:
        with pytest.raises(CheckpointError, match="step_1") as e:
            mgr.save(3, Tiny(tree_for(3)))
    assert plan.fired and not isinstance(e.value, SaveAbortedError)
    FIGURES["faults_injected"] += len(plan.fired)
    assert os.strerror(errno.EIO) in str(e.value)
    assert mgr.all_steps() == [1, 2, 3]
    assert _files(mgr.step_path(1)) == step1
    assert digest(read_model_arrays(mgr.step_path(3))) == digest(tree_for(3))
    assert hidden_entries(mgr.directory) == []
    mgr.save(4, Tiny(tree_for(4)))                      # the next save's retention catches up
    assert mgr.all_steps() == [3, 4] and hidden_entries(mgr.directory) == []


@pytest.mark.parametrize("point, match", [("fsync", "ckpts"), ("remove", ".step_1.del-*")])
def test_retention_delete_fails_after_hiding(tmp_path, point, match):
    """The doomed checkpoint is already hidden when the fsync or the removal fails: it is
    not listed any more, the error names it, and its hidden remains are removed by the
    next manager (or the next retention) of this process."""
    mgr = CheckpointManager(tmp_path / "ckpts", max_to_keep=2, backend="threads")
    for step in (1, 2):
        mgr.save(step, Tiny(tree_for(step)))
    # the save's own fsync of the parent comes first; the delete's is the second
    after = 1 if point == "fsync" else 0
    with FaultPlan(Fault(point, match, errno.EIO, after=after)) as plan:
        with pytest.raises(CheckpointError, match="step_1") as e:
            mgr.save(3, Tiny(tree_for(3)))
    assert plan.fired and not isinstance(e.value, SaveAbortedError)
    FIGURES["faults_injected"] += len(plan.fired)
    assert mgr.all_steps() == [2, 3]
    for step in (2, 3):
        assert digest(read_model_arrays(mgr.step_path(step))) == digest(tree_for(step))
    CheckpointManager(tmp_path / "ckpts", max_to_keep=2)
    assert hidden_entries(mgr.directory) == []


def test_old_copy_removal_fails_after_replacement(held):
    """Replacing a step: after the exchange the old copy cannot be removed (EIO). The new
    checkpoint is committed (the save returns), the old copy is hidden and removed by the
    next manager."""
    mgr = held
    with FaultPlan(Fault("remove", ".step_2.tmp-*", errno.EIO)) as plan:
        mgr.save(2, Tiny(tree_for(2, 7)))
    assert plan.fired
    FIGURES["faults_injected"] += len(plan.fired)
    assert digest(read_model_arrays(mgr.step_path(2))) == digest(tree_for(2, 7))
    assert mgr.all_steps() == [1, 2]
    CheckpointManager(mgr.directory)
    assert hidden_entries(mgr.directory) == []


# --- RLIMIT_FSIZE: the kernel's own EFBIG -------------------------------------------------------

@pytest.mark.parametrize("limit", [64 << 10, 200 << 10])
def test_file_size_limit(held, tmp_path, limit):
    mgr = held
    before = _files(mgr.directory)
    out = tmp_path / f"result-{uuid.uuid4().hex}"
    proc = forkserver().Process(target=probes.save_under_fsize_limit, args=(str(mgr.directory), limit, 3, str(out)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    result = out.read_text()
    assert result.startswith("shardckpt.errors.SaveAbortedError"), result
    assert os.strerror(errno.EFBIG) in result and "model-" in result, result
    FIGURES["faults_injected"] += 1
    _assert_intact(mgr, before)


# --- a disk that really runs full ---------------------------------------------------------------

def _mount_small_fs(where: Path, kind: str, size_mb: int = 8) -> None:
    where.mkdir()
    if kind == "ext4":
        image = where.with_suffix(".img")
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        cmds = [["mkfs.ext4", "-q", "-F", str(image)], ["mount", "-o", "loop", str(image), str(where)]]
    else:
        cmds = [["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)]]
    for cmd in cmds:
        if shutil.which(cmd[0]) is None:
            pytest.skip(f"{cmd[0]} is not installed")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot make a small {kind} here: {res.stderr.strip()[:200]}")


@pytest.fixture(params=["ext4", "tmpfs"])
def small_fs(request, tmp_path):
    where = tmp_path / "small"
    _mount_small_fs(where, request.param)
    yield where, request.param
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_until_full(ballast: Path) -> int:
    """Grow ``ballast`` until the filesystem is full; returns its size."""
    size = 0
    with open(ballast, "wb") as f:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 1 << 10):
            while True:
                try:
                    os.posix_fallocate(f.fileno(), size, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                size += chunk
    return size


@pytest.mark.stress
def test_disk_full_at_every_point_of_a_save(small_fs):
    """A ballast file leaves 0, 4 KiB, 8 KiB, ... free: the save runs out of space at every
    point (creating the directory, a shard, the index, the manifest), then succeeds."""
    small_fs, kind = small_fs
    directory = small_fs / "ckpts"
    mgr = CheckpointManager(directory, max_to_keep=None, backend="threads", num_shards=3)
    mgr.save(1, Tiny(tree_for(1)))
    before = _files(directory)
    ballast = small_fs / "ballast"
    filled = fill_until_full(ballast)
    step_bytes = 1024 if os.environ.get("SHARDCKPT_STRESS") else 4096
    failures, where_failed, successes = 0, {}, 0
    reserve = 0
    while True:
        os.truncate(ballast, max(0, filled - reserve))     # leaves about `reserve` bytes free
        try:
            mgr.save(2, Tiny(tree_for(2)), metrics={"x": 1})
        except SaveAbortedError as e:
            failures += 1
            msg = str(e)
            assert os.strerror(errno.ENOSPC) in msg, msg
            key = next((n for n in ("manifest.json", "index.msgpack", "structure.json", "metrics.json",
                                    "config.json", "model-", ".tmp-") if n in msg), "?")
            where_failed[key] = where_failed.get(key, 0) + 1
            assert _files(directory) == before
            assert hidden_entries(directory) == [] and mgr.all_steps() == [1]
        else:
            successes += 1
            os.unlink(ballast)
            assert digest(read_model_arrays(mgr.step_path(2))) == digest(tree_for(2))
            verify_files(mgr.step_path(2))
            break
        reserve += step_bytes
        assert reserve < (4 << 20), "the save never fit"
    assert failures >= 3
    FIGURES["faults_injected"] += failures
    record_figures(f"disk_full_{kind}", real_enospc_failures=failures,
                   failed_at=where_failed, then_saved=successes)


def test_zz_record_figures():
    record_figures("io_faults", **FIGURES)
