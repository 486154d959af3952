"""Shared pieces of the reliability suites (crash consistency, I/O faults, hostile input,
concurrency): deterministic test trees, a tiny NNX module that holds them, the invariant
checks run after every kill, and a forkserver so that the many worker processes do not
each pay for importing jax.

Counts: small by default; ``SHARDCKPT_STRESS=1`` selects the full counts. Every suite adds
what it did to ``FIGURES`` and, when ``SHARDCKPT_FIGURES`` names a file, appends one JSON
line per test there (how docs/reliability.md got its numbers).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import xxhash
from flax import nnx

STRESS = os.environ.get("SHARDCKPT_STRESS", "") not in ("", "0")
MAX_TO_KEEP = 3


def count(default: int, stress: int) -> int:
    return stress if STRESS else default


def record_figures(test: str, **numbers) -> None:
    """Print and (with ``SHARDCKPT_FIGURES``) append what a suite did, for the docs."""
    line = json.dumps({"test": test, "stress": STRESS, **numbers}, sort_keys=True)
    print("FIGURES", line)
    target = os.environ.get("SHARDCKPT_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")


# --- test trees -------------------------------------------------------------------------

DTYPES = {"w_f32": (np.float32, (96, 64)), "w_bf16": (ml_dtypes.bfloat16, (64, 48)),
          "w_i64": (np.int64, (300,)), "w_u8": (np.uint8, (32, 33)), "w_f16": (np.float16, (7, 5, 3)),
          "w_scalar": (np.float64, ())}


FROZEN = np.random.default_rng(12345).standard_normal(16384).astype(np.float32)   # 64 KiB


def tree_for(step: int, version: int = 0) -> dict[str, np.ndarray]:
    """The arrays a save of (step, version) holds: a pure function of both, so a checker
    can tell every version of every step apart bit for bit. ~45 KB in six dtypes, plus
    64 KiB (``frozen``) that no step changes."""
    rng = np.random.default_rng([int(step), int(version)])
    out = {}
    for key, (dtype, shape) in DTYPES.items():
        bits = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        out[key] = bits.view(dtype).reshape(shape)
    out["frozen"] = FROZEN          # the same in every step: incremental saves carry it
    return out


def digest(arrays: dict) -> str:
    h = xxhash.xxh3_64()
    for key in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[key]))
        h.update(f"{key}|{a.dtype.str}|{a.dtype.name}|{a.shape}|".encode())
        h.update(a.view(np.uint8).tobytes() if a.size else b"")
    return h.hexdigest()


class Tiny(nnx.Module):
    """An NNX module whose parameters are exactly ``tree`` (NumPy values, no jax compute)."""

    def __init__(self, tree: dict[str, np.ndarray]):
        for key, value in tree.items():
            setattr(self, key, nnx.Param(value))


def read_model_arrays(path, *, verify: bool = True) -> dict[str, np.ndarray]:
    from shardckpt.loading.checkpoint import Checkpoint
    return Checkpoint(path).read_arrays("model", verify=verify)


def verify_files(path) -> None:
    """Every file of the checkpoint has its manifest size and xxh3-64 (full-file hash)."""
    import xxhash

    from shardckpt.loading.checkpoint import Checkpoint
    path = Path(path)
    man = Checkpoint(path).manifest
    for name, rec in {**man.files, **man.meta_files}.items():
        assert (path / name).stat().st_size == rec.size, f"{path.name}/{name}: size"
        assert xxhash.xxh3_64((path / name).read_bytes()).hexdigest() == rec.xxh3_64, f"{path.name}/{name}: xxh3"


def hidden_entries(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


# --- worker logs and the crash invariants -------------------------------------------------

@dataclass
class History:
    """What the workers said they did, in order, across all trials on one directory."""

    begun: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    committed: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    aborted: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    events: list[tuple[str, int, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    max_step: int = -1

    def feed(self, text: str) -> None:
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            kind = parts[0]
            if kind in ("BEGIN", "COMMITTED", "ABORTED"):
                step, version = int(parts[1]), int(parts[2])
                self.events.append((kind, step, version))
                {"BEGIN": self.begun, "COMMITTED": self.committed, "ABORTED": self.aborted}[kind][step].append(version)
                self.max_step = max(self.max_step, step)
                if kind == "COMMITTED" and len(parts) > 3:
                    assert parts[3] == digest(tree_for(step, version)), f"worker digest of {step}/{version}"
            elif kind == "FAILED":
                self.failures.append(line)

    def candidates(self, step: int) -> list[int]:
        """Versions step ``step`` may hold: its last committed version and every version
        begun after that one (a save killed anywhere, or aborted, may or may not have
        become visible: atomically, whole or not at all)."""
        seq = [(k, v) for k, s, v in self.events if s == step and k in ("BEGIN", "COMMITTED")]
        last = max((i for i, (k, _) in enumerate(seq) if k == "COMMITTED"), default=None)
        if last is None:
            return [v for k, v in seq if k == "BEGIN"]
        return [seq[last][1]] + [v for k, v in seq[last + 1:] if k == "BEGIN"]


@dataclass
class CheckStats:
    checks: int = 0
    checkpoints_verified: int = 0
    leftovers_removed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    kills_mid_save: int = 0
    kills_mid_delete: int = 0
    # distinct (step, version) seen committed without an acknowledgement: the kill landed
    # between the publishing rename and the COMMITTED line; or save() raised, yet its
    # version is what the step holds (the Ray coordinator died after committing)
    published_unacknowledged: set = field(default_factory=set)
    aborted_but_published: set = field(default_factory=set)
    replaced_steps_checked: int = 0
    acknowledged_kept: int = 0


def check_directory(directory: Path, history: History, stats: CheckStats, *,
                    max_to_keep: int = MAX_TO_KEEP, full_hash: bool = True) -> list[int]:
    """The crash invariants, checked after every kill (the writer is dead):

    - a new manager removes every in-progress leftover (.tmp/.del/.old);
    - every entry of the directory is a committed, listed checkpoint (nothing half written
      is visible) that loads with checksums, bit for bit equal to a version of its step
      that was begun (never a mix, never a torn file), and each file's xxh3-64 matches;
    - every acknowledged save that retention should keep is there, with its acknowledged
      version or one begun after it.
    """
    from shardckpt import CheckpointManager
    assert not history.failures, history.failures
    stats.checks += 1
    before = hidden_entries(directory)
    kinds = [re.match(r"^\..+\.(tmp|del|old)-", n) for n in before]
    assert all(kinds), f"unexpected hidden entries {before}"
    for m in kinds:
        stats.leftovers_removed[m.group(1)] += 1
    stats.kills_mid_save += any(m.group(1) == "tmp" for m in kinds)
    stats.kills_mid_delete += any(m.group(1) == "del" for m in kinds)

    mgr = CheckpointManager(directory, max_to_keep=max_to_keep, backend="threads")
    assert hidden_entries(directory) == [], f"leftovers not removed: {hidden_entries(directory)}"
    listed = mgr.all_steps()
    visible = sorted(os.listdir(directory))
    assert visible == sorted(f"step_{s}" for s in listed), f"visible {visible} but listed {listed}"

    for step in listed:
        path = mgr.step_path(step)
        assert step in history.begun, f"step {step} listed but never saved"
        got = read_model_arrays(path)
        got_digest = digest(got)
        options = history.candidates(step)
        matches = [v for v in options if digest(tree_for(step, v)) == got_digest]
        assert matches, f"step {step}: content matches none of the versions {options}"
        if full_hash:
            verify_files(path)
        stats.checkpoints_verified += 1
        if matches[0] not in history.committed.get(step, []):
            stats.published_unacknowledged.add((step, matches[0]))
            if matches[0] in history.aborted.get(step, []):
                stats.aborted_but_published.add((step, matches[0]))
        if len(history.begun[step]) > 1:
            stats.replaced_steps_checked += 1

    acknowledged = {s for s, vs in history.committed.items() if vs}
    known = acknowledged | set(listed)
    required = sorted(s for s in acknowledged if sum(t > s for t in known) < max_to_keep)
    missing = [s for s in required if s not in listed]
    assert not missing, f"acknowledged saves lost: {missing} (listed {listed})"
    stats.acknowledged_kept += len(required)
    return listed


# --- processes --------------------------------------------------------------------------

_CTX = None


def forkserver():
    """A forkserver context whose server has imported shardckpt, flax and the workers once:
    each worker process then starts in ~0.1 s instead of ~5 s. The workers are real
    processes (forked from the server), killed with real SIGKILLs."""
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tests.scenarios.crash_worker", "tests.scenarios.probes",
                                   "tests.scenarios.concurrent_worker"])
        _CTX = ctx
    return _CTX


def kill_session(sid: int, timeout: float = 60.0, proc=None) -> int:
    """SIGKILL every process of session ``sid`` (a worker started with
    ``start_new_session=True`` and everything it started: Ray's GCS, raylet and actors,
    which put themselves into their own process groups but stay in the session) and wait
    until they are gone, zombies reaped too (a zombie's pid still looks alive to the
    leftover cleanup). ``proc``: the leader's ``Popen``, reaped here. Returns how many
    were killed."""
    killed: set[int] = set()
    deadline = time.time() + timeout
    while True:
        if proc is not None:
            proc.poll()
        procs = session_procs(sid)
        if not procs:
            return len(killed)
        for pid, state in procs:
            if state == "Z":
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise AssertionError(f"processes of session {sid} survive SIGKILL: {procs}")
        time.sleep(0.05)


def session_procs(sid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes of session ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:   # fields[0] is the state, fields[3] the session id
            out.append((int(entry), fields[0]))
    return out


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
