"""The Catalog: a side-effect-free view of a directory of step checkpoints, on any Store.

One place decides, for the manager, ``shardckpt ls`` and ``shardckpt gc`` alike:

* which step directories exist and their step numbers. **The rule**: a checkpoint of step N
  is the directory named ``{prefix}_{N}`` (N in canonical decimal: no sign, no leading
  zeros) holding a valid ``manifest.json``, or a directory in the guide's original
  single-file layout (listed and loadable, read-only). The number in the name is the step,
  whatever the manifest's ``step`` field says: it is what ``load_step`` and retention
  address;
* the retention plan (latest N or best K; the newest is never deleted; directories the
  library did not write — legacy layouts, checkpoints holding files the manifest does not
  list — are listed but never deleted);
* the leftovers plan: what crashed or aborted saves left (hidden tmp/del/old directories on
  a local disk, unreferenced version prefixes on object stores) and what cleanup would do.

Planning never changes anything; ``cleanup_leftovers`` and ``Catalog.delete`` act, best
effort and safe when several processes race (a leftover removed by someone else is fine).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format import MANIFEST
from .store import Store
from .store.base import VERSION_DIR
from .store.local import this_host

STALE_FOREIGN_SECONDS = 24 * 3600   # a local tmp dir of another host untouched this long is dead
STALE_VERSION_SECONDS = 3600         # an unreferenced object-store version this old is dead
SCAN_ATTEMPTS = 5


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as listed: ``path`` is a Path on a local disk, a URI elsewhere."""

    step: int
    path: Any
    metrics: dict = field(default_factory=dict)
    created: str = ""
    name: str = ""
    legacy: bool = False                                    # the guide's original layout
    foreign: tuple = ()                                     # entries the manifest does not list
    nbytes: int = 0
    files: int = 0
    items: tuple = ()

    @property
    def protected(self) -> bool:
        """Not entirely ours: retention and gc leave it alone."""
        return self.legacy or bool(self.foreign)


@dataclass(frozen=True)
class Leftover:
    """Something a save or delete left behind, and what cleanup does with it."""

    name: str                 # root-relative
    kind: str                 # tmp | del | old | version
    checkpoint: str           # the step directory it belongs to
    action: str               # remove | restore | keep
    reason: str
    host: str = ""
    pid: int = 0
    owner_alive: bool = False
    age_s: float = 0.0


@dataclass(frozen=True)
class Invalid:
    name: str
    path: Any
    problem: str


def metric_number(value: Any) -> float | None:
    """A metric as retention ranks it: a finite number in float range, else None (never
    raises, whatever a hostile manifest holds: 10**400, nested lists, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Catalog:
    def __init__(self, store: Store, prefix: str = "step"):
        self.store, self.prefix = store, prefix
        self.pattern = re.compile(rf"^{re.escape(prefix)}_(0|[1-9][0-9]{{0,17}})$")
        self._cache: dict[str, tuple[tuple, CheckpointInfo]] = {}

    def name_of(self, step: int) -> str:
        return f"{self.prefix}_{int(step)}"

    def step_of(self, name: str) -> int | None:
        m = self.pattern.match(name)
        return int(m.group(1)) if m else None

    # --- listing -----------------------------------------------------------------------------
    def scan(self) -> tuple[list[CheckpointInfo], list[Invalid]]:
        """(committed checkpoints oldest first, step directories that are not checkpoints).
        A step directory that vanishes while it is looked at (retention in another process,
        which publishes the newer step first) makes the scan start again, so a directory
        that always holds a checkpoint never lists empty."""
        for _ in range(SCAN_ATTEMPTS):
            result, vanished = self._scan_once()
            if not vanished:
                break
        return result

    def _scan_once(self) -> tuple[tuple[list[CheckpointInfo], list[Invalid]], bool]:
        infos, invalid, vanished = [], [], False
        try:
            entries = self.store.list("")
        except (OSError, CheckpointError) as e:
            raise CheckpointError(f"{self.store.where()}: cannot list the directory: {e}") from e
        for entry in entries:
            step = self.step_of(entry.name)
            if step is None or not entry.is_dir or entry.is_link:
                continue
            info, problem = self._info(entry.name, step)
            if info is not None:
                infos.append(info)
            elif problem:
                invalid.append(Invalid(entry.name, self.store.location(entry.name), problem))
            else:
                vanished = True
        return (sorted(infos, key=lambda i: i.step), sorted(invalid, key=lambda i: i.name)), vanished

    def checkpoints(self) -> list[CheckpointInfo]:
        return self.scan()[0]

    def _info(self, name: str, step: int) -> tuple[CheckpointInfo | None, str]:
        from .reader import Checkpoint
        try:
            children = self.store.list(name)
        except (OSError, CheckpointError):
            return None, ""
        if not children:
            local = self.store.local_path(name)
            if local is not None and local.is_dir():
                return None, f"empty directory, no {MANIFEST} (not committed; ignored)"
            return None, ""          # gone meanwhile
        if not any(c.name == MANIFEST and not c.is_dir for c in children):
            local = self.store.local_path(name)
            if local is not None:
                from .legacy import is_legacy_dir
                if is_legacy_dir(local):
                    return self._legacy_info(name, step), ""
            return None, f"no {MANIFEST} (not committed; ignored)"
        mf = next(c for c in children if c.name == MANIFEST)
        ident = (mf.size, mf.mtime, tuple(sorted((c.name, c.is_dir) for c in children)))
        cached = self._cache.get(name)
        if cached and cached[0] == ident:
            return cached[1], ""
        try:
            ck = Checkpoint.at(self.store, name)
        except CheckpointNotFoundError:
            return None, ""          # retired meanwhile
        except CorruptCheckpointError as e:
            return None, str(e)
        man = ck.manifest
        listed = {n.split("/", 1)[0] for n in list(man.files) + list(man.meta_files)} | {MANIFEST}
        foreign = tuple(sorted(c.name for c in children if c.name not in listed
                               and not (c.is_dir and VERSION_DIR.match(c.name))))
        nbytes = sum(r.size for r in man.files.values()) + sum(r.size for r in man.meta_files.values()) + mf.size
        info = CheckpointInfo(step, self.store.location(name), dict(man.metrics), man.created, name,
                              foreign=foreign, nbytes=nbytes, files=len(man.files), items=tuple(man.items))
        self._cache[name] = (ident, info)
        return info, ""

    def _legacy_info(self, name: str, step: int) -> CheckpointInfo:
        from .legacy import LegacyCheckpoint
        try:
            metrics = dict(LegacyCheckpoint(self.store.local_path(name)).metrics)
        except (CheckpointError, OSError, ValueError):
            metrics = {}
        return CheckpointInfo(step, self.store.location(name), metrics, "", name, legacy=True)

    # --- retention -----------------------------------------------------------------------------
    @staticmethod
    def ranked_best(infos: list[CheckpointInfo], metric: str | None, mode: str) -> list[CheckpointInfo]:
        """Best first by ``metric`` (ties: newer first); checkpoints without it are left out."""
        scored = [(metric_number(i.metrics.get(metric)) if metric and isinstance(i.metrics, dict) else None, i)
                  for i in infos]
        sign = 1 if mode == "min" else -1
        return [i for v, i in sorted(((v, i) for v, i in scored if v is not None),
                                     key=lambda vi: (sign * vi[0], -vi[1].step))]

    @classmethod
    def retention_plan(cls, infos: list[CheckpointInfo], max_to_keep: int | None, best_metric: str | None,
                       best_mode: str = "min", best_to_keep: int = 3) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
        """(kept, deleted): kept if among the ``max_to_keep`` newest, or the ``best_to_keep``
        best, or the newest, or not entirely ours (``protected``)."""
        if not infos:
            return [], []
        keep = {infos[-1].step}
        keep.update(i.step for i in (infos if max_to_keep is None else infos[-max_to_keep:]))
        if best_metric:
            keep.update(i.step for i in cls.ranked_best(infos, best_metric, best_mode)[:best_to_keep])
        keep.update(i.step for i in infos if i.protected)
        return [i for i in infos if i.step in keep], [i for i in infos if i.step not in keep]

    def delete(self, info: CheckpointInfo) -> bool:
        """Retire one checkpoint (crash-safe); False when another process did it first.
        Refuses what the library did not write."""
        if info.protected:
            raise CheckpointError(f"{info.path} holds files shardckpt did not write "
                                  f"({', '.join(info.foreign) or 'the original layout'}); not deleting it")
        try:
            self.store.retire(info.name)
            return True
        except FileNotFoundError:
            return False

    # --- leftovers -------------------------------------------------------------------------------
    def leftovers(self, now: float | None = None) -> list[Leftover]:
        """What dead saves left in this directory and what cleanup would do with each."""
        now = time.time() if now is None else now
        return self._hidden_leftovers(now) + self._version_leftovers(now)

    def _hidden_leftovers(self, now: float) -> list[Leftover]:
        """Hidden ``.{name}.{tmp,del,old}-host-pid-rand`` directories (local stores)."""
        from .storage import owner_alive, parse_hidden
        out = []
        host = this_host()
        for entry in sorted(self.store.list(""), key=lambda e: e.name):
            info = parse_hidden(entry.name)
            if not info or not self.pattern.match(info["name"]):
                continue
            if entry.is_link or not entry.is_dir:
                out.append(Leftover(entry.name, info["kind"], info["name"], "keep",
                                    "not a directory (not written by shardckpt): left alone"))
                continue
            alive = owner_alive(info)
            age = now - entry.mtime
            if alive and info["host"] != host:
                alive = age < STALE_FOREIGN_SECONDS
            if info["kind"] == "old":
                action = "keep" if alive else ("restore" if self.store.size(info["name"]) is None
                                               and not self.store.list(info["name"]) else "remove")
            else:
                action = "keep" if alive else "remove"
            reason = "its save is still running" if alive else "its process is gone"
            out.append(Leftover(entry.name, info["kind"], info["name"], action, reason, info["host"],
                                int(info["pid"]), alive, round(age, 1)))
        return out

    def _version_leftovers(self, now: float) -> list[Leftover]:
        from .reader import Checkpoint
        from .store.object import ABORT_MARKER
        out = []
        for entry in sorted(self.store.list(""), key=lambda e: e.name):
            if not entry.is_dir or self.step_of(entry.name) is None:
                continue
            children = self.store.list(entry.name)
            versions = [c.name for c in children if c.is_dir and VERSION_DIR.match(c.name)]
            if not versions:
                continue
            referenced: set[str] = set()
            if any(c.name == MANIFEST for c in children):
                try:
                    man = Checkpoint.at(self.store, entry.name).manifest
                    referenced = {n.split("/", 1)[0] for n in list(man.files) + list(man.meta_files) if "/" in n}
                except CheckpointError:
                    continue   # damaged: leave it for a person to look at
            for v in versions:
                if v in referenced:
                    continue
                objs = self.store.list(f"{entry.name}/{v}")
                newest = max((o.mtime for o in objs), default=0.0)
                age = now - newest if newest else float("inf")
                if any(o.name == ABORT_MARKER for o in objs):
                    action, reason = "remove", "an aborted save"
                elif age > STALE_VERSION_SECONDS:
                    action, reason = "remove", f"unreferenced for {age:.0f} s (a save that never committed)"
                else:
                    action, reason = "keep", "may belong to a save still running"
                out.append(Leftover(f"{entry.name}/{v}", "version", entry.name, action, reason,
                                    age_s=round(age, 1) if math.isfinite(age) else -1))
        return out

    def cleanup_leftovers(self, now: float | None = None) -> list[Leftover]:
        """Carry out the leftovers plan, best effort: a leftover that another process removes
        or restores meanwhile, or that cannot be removed (read-only, someone else's), is
        skipped. Never raises; returns what was done."""
        try:
            plan = self.leftovers(now)
        except Exception:  # noqa: BLE001 - cleanup is never required
            return []
        return self.carry_out(plan)

    def carry_out(self, plan: list[Leftover]) -> list[Leftover]:
        """Remove or restore the planned leftovers (``keep`` ones stay); one that another
        process handled meanwhile, or that cannot be touched, is skipped. Returns what was
        done."""
        done = []
        for lo in plan:
            if lo.action == "keep":
                continue
            try:
                if lo.action == "restore":
                    self.store.restore_leftover(lo.name, lo.checkpoint)
                else:
                    self.store.remove_leftover(lo.name)
                done.append(lo)
            except (OSError, CheckpointError):
                continue
        return done
