"""Crash consistency: a process that saves checkpoints in a loop is killed with SIGKILL at
random moments, again and again, on one directory. After every kill:

- every save whose ``save()`` returned (and that retention should keep) loads bit for bit;
- nothing partially written is ever listed or loaded: every visible checkpoint is one whole
  version of its step, every file matching its manifest checksum;
- a new ``CheckpointManager`` removes the in-progress leftovers (``.tmp``/``.del``).

Threads backend: worker processes forked from a forkserver that has imported shardckpt
once (~0.1 s per worker instead of ~5 s). Ray backend: a worker script that starts its own
local Ray; the parent kills the Ray processes doing the work (the coordinator actor, a
writer actor) mid-save, and finally the whole process session.

Counts: ``SHARDCKPT_STRESS=1`` runs the full counts (>= 200 kills).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scenarios.reliability import CheckStats, History, check_directory, count, forkserver, kill_session, record_figures, session_procs

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "scenarios" / "crash_worker.py"


def _threads_trials(tmp_path: Path, trials: int, seed: int) -> tuple[History, CheckStats, int]:
    from tests.scenarios import crash_worker
    ctx = forkserver()
    rng = random.Random(seed)
    directory = tmp_path / "ckpts"
    directory.mkdir()
    history, stats = History(), CheckStats()
    kills = 0
    for trial in range(trials):
        log = tmp_path / f"trial-{trial}.log"
        no_exchange = trial % 4 == 2        # every 4th worker: the replacement fallback path
        proc = ctx.Process(target=crash_worker.save_loop,
                           args=(str(directory), str(log), seed * 1000 + trial, history.max_step + 1),
                           kwargs={"no_exchange": no_exchange})
        proc.start()
        # Wait until it saves (the first lines), then kill it at a random moment.
        deadline = time.time() + 60
        while not (log.exists() and b"BEGIN" in log.read_bytes()):
            assert proc.is_alive(), f"worker died: exit code {proc.exitcode}"
            assert time.time() < deadline, "worker never started saving"
            time.sleep(0.01)
        if trial % 2:
            time.sleep(rng.uniform(0.0, 0.6))          # anywhere in the loop
        elif trial % 6 == 4:
            _at_a_delete(directory, log, rng.randint(1, 4))   # while retention deletes a step
        else:
            _after_begins(log, rng.randint(1, 6))      # inside a save (or its retention)
            time.sleep(rng.uniform(0.0, 0.02))
        assert proc.is_alive(), f"worker died on its own: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        kills += 1
        history.feed(log.read_text())
        check_directory(directory, history, stats)
    return history, stats, kills


def _at_a_delete(directory: Path, log: Path, n: int) -> None:
    """Return as soon as a step being deleted (a hidden ``.del`` directory: renamed, not yet
    removed) is seen after ``n`` more saves began, polling the directory without sleeping:
    the kills of random timing alone landed inside a delete too rarely to count on (the
    window is the parent's fsync and the removal)."""
    _after_begins(log, n)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if any(name.startswith(".") and ".del-" in name for name in os.listdir(directory)):
                return
        except FileNotFoundError:
            pass


def _after_begins(log: Path, n: int) -> None:
    """Return as soon as the worker has begun ``n`` more saves (polling its log)."""
    start = log.read_bytes().count(b"BEGIN")
    deadline = time.time() + 30
    while log.read_bytes().count(b"BEGIN") < start + n and time.time() < deadline:
        time.sleep(0.0005)


@pytest.mark.stress
def test_sigkill_during_saves_threads(tmp_path):
    trials = count(24, 240)
    history, stats, kills = _threads_trials(tmp_path, trials, seed=1)
    acked = sum(len(v) for v in history.committed.values())
    record_figures("crash_threads", kills=kills, saves_begun=sum(len(v) for v in history.begun.values()),
                   saves_acknowledged=acked, kills_mid_save=stats.kills_mid_save,
                   kills_mid_delete=stats.kills_mid_delete, leftovers_removed=dict(stats.leftovers_removed),
                   checkpoints_verified=stats.checkpoints_verified,
                   published_unacknowledged=len(stats.published_unacknowledged),
                   no_exchange_workers=sum(1 for t in range(trials) if t % 4 == 2),
                   replaced_steps_checked=stats.replaced_steps_checked,
                   acknowledged_checked_present=stats.acknowledged_kept, lost=0)
    assert kills == trials
    # The kills must have landed inside saves and deletes, not only between them.
    assert stats.kills_mid_save >= trials // 6
    assert stats.kills_mid_delete >= 1
    assert acked >= trials


# --- Ray backend ----------------------------------------------------------------------------

class RayKilledFromOutside(Exception):
    """The worker's Ray went down without us (a ``ray stop`` by someone else on a shared
    machine kills every Ray process of the user): one more crash of everything, checked
    like the others."""


class RayWorker:
    def __init__(self, directory: Path, log: Path, seed: int, start: int):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(directory), str(log), str(seed), str(start), "ray"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=open(log.with_suffix(".err"), "wb"),
            start_new_session=True, cwd=ROOT, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, what: str, after: int = 0, timeout: float = 240) -> int:
        deadline = time.time() + timeout
        while True:
            text = self.text()
            pos = text.find(what, after)
            if pos >= 0:
                return pos
            if self.proc.poll() is not None:
                err = self.log.with_suffix(".err").read_text()[-3000:]
                if "Failed to connect to GCS" in err:
                    raise RayKilledFromOutside(err[-500:])
                raise AssertionError(f"ray worker exited ({self.proc.returncode}): {text[-2000:]}\n{err}")
            assert time.time() < deadline, f"ray worker never said {what!r}: {text[-2000:]}"
            time.sleep(0.05)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def pids(self) -> tuple[int, list[int]]:
        lines = [l for l in self.text().splitlines() if l.startswith("PIDS ")]
        coord, writers = lines[-1].split()[1:]
        return int(coord.split("=")[1]), [int(p) for p in writers.split("=")[1].split(",") if p]


@pytest.mark.stress
def test_sigkill_during_saves_ray(tmp_path):
    """Per Ray start: kill the coordinator or a writer actor mid-save a few times (the
    driver sees the save abort and goes on), checking the directory while the driver is
    paused; then kill the whole session (driver, GCS, raylet, actors) at a random moment."""
    starts = count(1, 3)
    actor_kills = count(3, 6)
    rng = random.Random(7)
    directory = tmp_path / "ckpts"
    directory.mkdir()
    history, stats = History(), CheckStats()
    kills = {"coordinator": 0, "writer": 0, "session": 0, "outside": 0}
    for start in range(starts):
        log = tmp_path / f"ray-{start}.log"
        worker = RayWorker(directory, log, seed=100 + start, start=history.max_step + 1)
        try:
            _actor_kills(worker, directory, history, stats, kills, actor_kills, rng)
            time.sleep(rng.uniform(0.0, 0.5))
            kill_session(worker.proc.pid, proc=worker.proc)
            kills["session"] += 1
            worker.proc.wait()
        except RayKilledFromOutside as e:
            print(f"the worker's Ray was killed from outside: {e}")
            kills["outside"] += 1
        finally:
            kill_session(worker.proc.pid, proc=worker.proc)
        history.feed(worker.text())
        check_directory(directory, history, stats)
    total = sum(kills.values())
    record_figures("crash_ray", kills=total, **{f"kills_{k}": v for k, v in kills.items()},
                   ray_starts=starts, saves_begun=sum(len(v) for v in history.begun.values()),
                   saves_acknowledged=sum(len(v) for v in history.committed.values()),
                   saves_aborted=sum(len(v) for v in history.aborted.values()),
                   leftovers_removed=dict(stats.leftovers_removed),
                   checkpoints_verified=stats.checkpoints_verified,
                   published_unacknowledged=len(stats.published_unacknowledged),
                   aborted_but_published=len(stats.aborted_but_published), lost=0)
    assert kills["session"] + kills["outside"] == starts
    assert sum(len(v) for v in history.committed.values()) >= starts


def _actor_kills(worker: RayWorker, directory: Path, history: History, stats: CheckStats, kills: dict,
                 count_: int, rng: random.Random) -> None:
    worker.wait_for("COMMITTED")
    worker.wait_for("PIDS")
    offset = 0
    for _ in range(count_):
        coord, writers = worker.pids()
        victim = rng.choice(["coordinator", "writer"])
        pid = coord if victim == "coordinator" else rng.choice(writers)
        # land inside a save: right after one begins, plus a random delay
        begun = worker.wait_for("BEGIN", offset)
        time.sleep(rng.uniform(0.0, 0.15))
        # only a process of the worker's own session (a stale pid may have been reused)
        if pid in dict(session_procs(worker.proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
                kills[victim] += 1
                print(f"killed the {victim} (pid {pid}) {time.strftime('%H:%M:%S')}")
            except ProcessLookupError:
                pass
        worker.send("PAUSE")
        paused = worker.wait_for("PAUSED", begun)
        h = History()
        h.feed(worker.text())
        check_directory(directory, _merge(history, h), stats)
        offset = paused + 1
        worker.send("RESUME")
        worker.wait_for("COMMITTED", offset)


def _merge(done: History, current: History) -> History:
    merged = History()
    for kind, step, version in done.events + current.events:
        merged.feed(f"{kind} {step} {version}")
    merged.failures = done.failures + current.failures
    return merged
