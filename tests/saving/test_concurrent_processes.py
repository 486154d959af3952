"""Several processes on one checkpoint directory (threads backend), all real processes
(forked from the test forkserver), no locks shared between them:

- two processes saving different steps, with and without retention;
- two processes saving the *same* step again and again (last one to publish wins);
- loads racing those re-saves of the step they load: every load returns one whole saved
  version (never a mix of two, also with ``verify=False``), or ``CheckpointNotFoundError``
  before the first save;
- loads racing retention deletes in another process: a complete checkpoint or a
  ``CheckpointError``, never wrong data.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from shardckpt import CheckpointManager
from tests.scenarios import concurrent_worker
from tests.scenarios.reliability import count, digest, forkserver, hidden_entries, read_model_arrays, record_figures, tree_for, verify_files

FIGURES: dict[str, int] = {}


def _bump(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


def _start(target, *args):
    p = forkserver().Process(target=target, args=args)
    p.start()
    return p


def _join(*procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1, deadline - time.time()))
        assert not p.is_alive(), "a worker hung"
        assert p.exitcode == 0, f"a worker failed ({p.exitcode})"


def _lines(log: Path) -> list[list[str]]:
    return [l.split(" ", 3) for l in log.read_text().splitlines()] if log.exists() else []


def _versions(*logs: Path, kind: str = "BEGIN") -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for log in logs:
        for parts in _lines(log):
            if parts[0] == kind:
                out.setdefault(int(parts[1]), set()).add(int(parts[2]))
    return out


def _no_failures(*logs: Path) -> None:
    bad = [" ".join(p) for log in logs for p in _lines(log) if p[0] in ("FAILED", "CRASH")]
    assert not bad, bad[:5]


@pytest.mark.parametrize("max_to_keep", [None, 3])
def test_two_processes_save_different_steps(tmp_path, max_to_keep):
    directory, go = tmp_path / "ckpts", tmp_path / "go"
    n = count(12, 60)
    logs = [tmp_path / f"saver-{i}.log" for i in range(2)]
    procs = [_start(concurrent_worker.saver, str(directory), str(logs[i]), list(range(i, 2 * n, 2)), i,
                    max_to_keep, str(go)) for i in range(2)]
    time.sleep(0.3)
    go.touch()
    _join(*procs)
    _no_failures(*logs)
    committed = _versions(*logs, kind="COMMITTED")
    assert sorted(committed) == list(range(2 * n))
    mgr = CheckpointManager(directory, max_to_keep=max_to_keep)
    expected = list(range(2 * n)) if max_to_keep is None else list(range(2 * n - max_to_keep, 2 * n))
    assert mgr.all_steps() == expected
    for step in expected:
        (version,) = committed[step]
        assert digest(read_model_arrays(mgr.step_path(step))) == digest(tree_for(step, version))
        verify_files(mgr.step_path(step))
    assert hidden_entries(directory) == []
    _bump("concurrent_saves", 2 * n)


def test_two_processes_save_the_same_step_while_others_load_it(tmp_path):
    """Two savers re-save step 7 (different versions each time) while two readers load it
    in a loop, one with checksums and one without. Every save succeeds; every load is one
    whole version that was saved; before the first commit, CheckpointNotFoundError."""
    directory, go, stop = tmp_path / "ckpts", tmp_path / "go", tmp_path / "stop"
    directory.mkdir()
    n = count(25, 150)
    saver_logs = [tmp_path / f"saver-{i}.log" for i in range(2)]
    reader_logs = [tmp_path / f"reader-{v}.log" for v in ("verify", "noverify")]
    readers = [_start(concurrent_worker.reader, str(directory), str(reader_logs[i]), 7, str(stop), i, verify)
               for i, verify in enumerate((True, False))]
    savers = [_start(concurrent_worker.saver, str(directory), str(saver_logs[i]), [7] * n, 10 + i, None, str(go))
              for i in range(2)]
    time.sleep(0.5)          # the readers find nothing yet
    go.touch()
    _join(*savers)
    time.sleep(0.3)
    stop.touch()
    _join(*readers)
    _no_failures(*saver_logs, *reader_logs)
    begun = _versions(*saver_logs)[7]
    committed = _versions(*saver_logs, kind="COMMITTED")[7]
    assert len(committed) == 2 * n
    allowed = {digest(tree_for(7, v)): v for v in begun}
    outcomes = Counter()
    first_ok = None
    for log in reader_logs:
        for i, parts in enumerate(_lines(log)):
            if parts[0] == "OK":
                assert parts[2] in allowed, f"{log.name} line {i}: loaded a version nobody saved (a mix)"
                outcomes["whole version"] += 1
            else:
                assert parts[0] == "ERR" and parts[2] == "CheckpointNotFoundError", parts
                outcomes["not found yet" if first_ok is None else "not found"] += 1
            if parts[0] == "OK" and first_ok is None:
                first_ok = i
        first_ok = None
    assert outcomes["not found"] == 0, outcomes
    assert outcomes["whole version"] > 0
    final = CheckpointManager(directory)
    assert final.all_steps() == [7] and hidden_entries(directory) == []
    assert digest(read_model_arrays(final.step_path(7))) in {digest(tree_for(7, v)) for v in committed}
    for k, v in outcomes.items():
        _bump(f"same_step_loads_{k.replace(' ', '_')}", v)
    _bump("same_step_saves", 2 * n)


def test_loads_race_retention_in_another_process(tmp_path):
    """One process saves steps with max_to_keep=2 (deleting as it goes) while two others
    load random listed steps: each load returns that step's data exactly, or raises a
    CheckpointError (the step was deleted under it); never other data, never a crash."""
    directory, go, stop = tmp_path / "ckpts", tmp_path / "go", tmp_path / "stop"
    directory.mkdir()
    n = count(40, 300)
    saver_log = tmp_path / "saver.log"
    reader_logs = [tmp_path / f"reader-{v}.log" for v in ("verify", "noverify")]
    readers = [_start(concurrent_worker.reader, str(directory), str(reader_logs[i]), None, str(stop), 20 + i, verify)
               for i, verify in enumerate((True, False))]
    saver = _start(concurrent_worker.saver, str(directory), str(saver_log), list(range(n)), 3, 2, str(go))
    go.touch()
    _join(saver)
    stop.touch()
    _join(*readers)
    _no_failures(saver_log, *reader_logs)
    committed = _versions(saver_log, kind="COMMITTED")
    outcomes = Counter()
    for log in reader_logs:
        for parts in _lines(log):
            step = int(parts[1])
            if parts[0] == "OK":
                (version,) = committed[step]
                assert parts[2] == digest(tree_for(step, version)), f"step {step}: wrong data"
                outcomes["exact"] += 1
            else:
                outcomes[parts[2]] += 1
    assert outcomes["exact"] > 0
    assert CheckpointManager(directory, max_to_keep=2).all_steps() == [n - 2, n - 1]
    assert hidden_entries(directory) == []
    for k, v in outcomes.items():
        _bump(f"retention_race_loads_{k}", v)


def test_zz_record_figures():
    record_figures("concurrency", **FIGURES)
