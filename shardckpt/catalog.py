"""The Catalog: a side-effect-free view of a directory of step checkpoints, on any Store.

One place decides, for the manager, ``shardckpt ls`` and ``shardckpt gc`` alike:

* which step directories exist and their step numbers. **The rule**: a checkpoint of step N
  is the directory named ``{prefix}_{N}`` (N in canonical decimal: no sign, no leading
  zeros) holding a valid ``manifest.json``, or a directory in the guide's original
  single-file layout (listed and loadable, read-only). The number in the name is the step,
  whatever the manifest's ``step`` field says: it is what ``load_step`` and retention
  address;
* the retention plan (latest N or best K; the newest is never deleted; directories the
  library did not write — legacy layouts, checkpoints holding the user's files, beside the
  manifest or inside a version prefix (``format/ownership.py``) — are listed but never
  deleted);
* the leftovers plan: what crashed or aborted saves left (hidden tmp/del/old directories on
  a local disk, unreferenced version prefixes on object stores) and what cleanup would do.

Planning never changes anything; ``cleanup_leftovers`` and ``Catalog.delete`` act, best
effort and safe when several processes race (a leftover removed by someone else is fine).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from shardckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, OrbaxCheckpointError
from shardckpt.format.manifest import MANIFEST
from shardckpt.format.names import is_version_dir, step_pattern
from shardckpt.format.ownership import foreign_entries
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.legacy import LegacyCheckpoint
from shardckpt.loading.open import layout_of, orbax_hint
from shardckpt.saving.commit import remembered_version
from shardckpt.store.base import Leftover, Store

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
        self.pattern = step_pattern(prefix)
        self._cache: dict[str, tuple[tuple, CheckpointInfo]] = {}

    def name_of(self, step: int) -> str:
        return f"{self.prefix}_{int(step)}"

    def step_of(self, name: str) -> int | None:
        m = self.pattern.fullmatch(name)
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
        if not result[0]:
            self.refuse_orbax()
        return result

    def refuse_orbax(self) -> None:
        """Raise ``OrbaxCheckpointError`` when this directory is an Orbax checkpoint (a
        ``CheckpointManager`` root such as ``run/29/``, ``run/34/``, a step, or a
        checkpointer directory): to the manager, ``ls`` and ``gc`` it would otherwise look
        empty, and a resuming script would start from scratch and write ``step_*`` beside
        Orbax's steps. Asked only when no checkpoint of ours is listed (one more listing)."""
        layout = layout_of(self.store, "")
        if layout.kind == "orbax":
            where = self.store.where()
            more = (f"; NEW_DIR is then a directory of {self.prefix}_<step> checkpoints for "
                    "CheckpointManager(NEW_DIR)") if layout.orbax == "manager" else ""
            raise OrbaxCheckpointError(orbax_hint(where, layout.orbax or "") + more)

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
            info, problem = self.info(entry.name, step)
            if info is not None:
                infos.append(info)
            elif problem:
                invalid.append(Invalid(entry.name, self.store.location(entry.name), problem))
            else:
                vanished = True
        return (sorted(infos, key=lambda i: i.step), sorted(invalid, key=lambda i: i.name)), vanished

    def checkpoints(self) -> list[CheckpointInfo]:
        return self.scan()[0]

    def info(self, name: str, step: int) -> tuple[CheckpointInfo | None, str]:
        """(what the listing shows of checkpoint ``name`` as step ``step``, or None and why
        it is not one; "" when it vanished meanwhile)."""
        try:
            children = self.store.list(name)
        except (OSError, CheckpointError):
            return None, ""
        if not children:
            if self.store.is_dir(name):
                return None, f"empty directory, no {MANIFEST} (not committed; ignored)"
            return None, ""          # gone meanwhile
        layout = layout_of(self.store, name, children)
        if layout.kind == "legacy":
            return self._legacy_info(name, step), ""
        if layout.kind == "orbax":   # Orbax's CheckpointManager(step_prefix="step") writes step_<n>/
            return None, orbax_hint(self.store.where(name), layout.orbax or "")
        if layout.kind != "checkpoint":
            return None, f"no {MANIFEST} (not committed; ignored)"
        mf = next(c for c in children if c.name == MANIFEST)
        try:   # what lies inside version directories decides ownership too (format/ownership.py)
            versions = {c.name: tuple(sorted((e.name, e.is_dir) for e in self.store.list(f"{name}/{c.name}")))
                        for c in children if c.is_dir and not c.is_link and is_version_dir(c.name)}
        except (OSError, CheckpointError):
            return None, ""
        ident = (mf.size, mf.mtime, tuple(sorted((c.name, c.is_dir) for c in children)), versions)
        cached = self._cache.get(name)
        if cached and cached[0] == ident:
            return cached[1], ""
        known = remembered_version(self.store, name)     # just committed by this process: not parsed again
        try:
            man = known.manifest if known is not None else Checkpoint.at(self.store, name).manifest
        except CheckpointNotFoundError:
            return None, ""          # retired meanwhile
        except CorruptCheckpointError as e:
            return None, str(e)
        foreign = foreign_entries(man, [(c.name, c.is_dir and not c.is_link) for c in children],
                                  lambda v: versions.get(v, ()))
        nbytes = sum(r.size for r in man.files.values()) + sum(r.size for r in man.meta_files.values()) + mf.size
        info = CheckpointInfo(step, self.store.location(name), dict(man.metrics), man.created, name,
                              foreign=foreign, nbytes=nbytes, files=len(man.files), items=tuple(man.items))
        self._cache[name] = (ident, info)
        return info, ""

    def _legacy_info(self, name: str, step: int) -> CheckpointInfo:
        try:
            metrics = dict(LegacyCheckpoint.at(self.store, name).metrics)
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
        """What dead saves left in this directory and what cleanup would do with each (the
        store knows its own kinds of leftovers: ``Store.leftovers``)."""
        now = time.time() if now is None else now
        return self.store.leftovers(lambda name: self.step_of(name) is not None, now)

    def cleanup_leftovers(self, now: float | None = None) -> list[Leftover]:
        """Carry out the leftovers plan, best effort: a leftover that another process removes
        or restores meanwhile, or that cannot be removed (read-only, someone else's), is
        skipped. Never raises; returns what was done."""
        try:
            plan = self.leftovers(now)
        except Exception:  # noqa: BLE001 - cleanup is never required
            return []
        return self.carry_out(plan)

    def carry_out(self, plan: list[Leftover], failed: list[tuple[Leftover, str]] | None = None) -> list[Leftover]:
        """Remove or restore the planned leftovers (``keep`` ones stay); one that another
        process handled meanwhile is fine, one that cannot be touched (a read-only mount,
        another user's files) is skipped and, with ``failed``, listed there with why.
        Returns what was done."""
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
            except FileNotFoundError:
                continue            # handled by another process meanwhile
            except (OSError, CheckpointError) as e:
                if failed is not None:
                    failed.append((lo, f"{type(e).__name__}: {e}"))
        return done
