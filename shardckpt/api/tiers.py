"""The manager's tiers: saves go to memory on the Ray cluster first, and reach the persistent
directory in the background (#19).

``CheckpointManager(directory, memory=MemoryTier(replicas=1, keep=2), persist_every=10)``
commits every save to the memory tier (``store/memory.py``: the shard files on the writer's
node and on ``replicas`` peers), so training blocks only for a save into RAM; every
``persist_every``-th step (and the newest at ``close()``) is then copied to ``directory`` by
the holders themselves (``saving/persist.py``), one step at a time, in a background thread.
Retention applies per tier: ``keep`` steps in memory (a step still to be persisted is never
dropped), the manager's ``max_to_keep``/best rules in the directory.

A load takes a step from whichever tier has it whole: from memory when every file has a
surviving intact copy, file by file from the directory where a memory copy is lost but the
step was persisted, and otherwise the newest step that can be read, saying which and why.
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import xxhash

from shardckpt.catalog import Catalog, CheckpointInfo
from shardckpt.errors import CheckpointError
from shardckpt.saving.persist import CopyReport, copy_checkpoint
from shardckpt.store.base import Store
from shardckpt.workers import Background

TIER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]{0,62}")


@dataclass(frozen=True)
class MemoryTier:
    """Keep the newest ``keep`` steps in the Ray cluster's memory, each shard file on
    ``1 + replicas`` nodes (``replicas=0`` on a single machine). ``name`` names the tier in the
    cluster (default: derived from the manager's directory), so a new driver of the same run
    finds the steps a crashed one left."""

    replicas: int = 1
    keep: int = 2
    name: str | None = None

    def __post_init__(self):
        for field_name, value, low in (("replicas", self.replicas, 0), ("keep", self.keep, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 64:
                raise CheckpointError(f"MemoryTier({field_name}={value!r:.40}): expected an integer from {low}")
        if self.replicas > 8:
            raise CheckpointError(f"MemoryTier(replicas={self.replicas}): at most 8 copies beside the first")
        if self.name is not None and (not isinstance(self.name, str) or not TIER_NAME.fullmatch(self.name)):
            raise CheckpointError(f"MemoryTier(name={self.name!r:.80}): letters, digits and '-', at most 63")


@dataclass
class TierRestore:
    """Where a tiered load took its step from: ``tier`` ("memory" or "persistent"), the bytes
    of the files read from each, and why another step or tier was used, if one was."""

    step: int
    tier: str
    bytes_from_memory: int = 0
    bytes_from_persistent: int = 0
    reason: str = ""


def default_tier_name(store: Store) -> str:
    return "run-" + xxhash.xxh3_64_hexdigest(store.where().encode())[:12]


class Tiers:
    """The memory tier of one manager and its background persistence."""

    def __init__(self, tier: MemoryTier, persistent: Store, prefix: str, persist_every: int | None,
                 retain_persistent: Callable[[], Any]):
        from shardckpt.store.memory import RayMemoryStore  # Ray only for managers with a memory tier
        self.tier = tier
        name = tier.name or default_tier_name(persistent)
        self.store = RayMemoryStore(f"mem://{name}?replicas={tier.replicas}", fallback=persistent)
        self.catalog = Catalog(self.store, prefix)
        self.persistent = persistent
        self.persistent_catalog = Catalog(persistent, prefix)
        self.persist_every = persist_every
        self.retain_persistent = retain_persistent
        self.pending: list[tuple[int, Background]] = []
        self.lock = threading.Lock()
        self.last_persist: CopyReport | None = None

    def location(self, step: int) -> Any:
        return self.store.location(self.catalog.name_of(step))

    # --- persistence -------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return bool(self.persist_every) and step % self.persist_every == 0

    def persist_later(self, step: int) -> None:
        """Copy ``step`` to the directory in the background, after the persists before it."""
        with self.lock:
            before = [task for _, task in self.pending]

            def run() -> CopyReport:
                for task in before:
                    task.exception()          # wait; its error is collected on its own
                return self.persist(step)
            self.pending.append((step, Background(run, f"shardckpt-persist-{step}")))

    def persist(self, step: int) -> CopyReport | None:
        """Copy ``step`` from memory to the directory now (None when it is there already, the
        same version), then apply the directory's retention."""
        name = self.catalog.name_of(step)
        have = {i.step: i for i in self.persistent_catalog.checkpoints()}
        mem = {i.step: i for i in self.catalog.checkpoints()}
        if step not in mem:
            raise CheckpointError(f"{self.store.where(name)}: step {step} is not in the memory tier (any more); "
                                  "it cannot be persisted")
        if step in have and have[step].created == mem[step].created:
            return None
        report = copy_checkpoint(self.store, name, self.persistent)
        self.last_persist = report
        self.retain_persistent()
        return report

    def persisting(self) -> set[int]:
        with self.lock:
            return {step for step, task in self.pending if not task.done()}

    def collect(self, wait: bool) -> None:
        """Raise the error of a finished background persist (all of them waited for first
        with ``wait``); finished ones are dropped."""
        with self.lock:
            pending = list(self.pending)
        if wait:
            for _, task in pending:
                task.exception()
        failed = None
        with self.lock:
            keep = []
            for step, task in self.pending:
                if not task.done():
                    keep.append((step, task))
                elif task.exception() is not None and failed is None:
                    failed = (step, task.exception())
            self.pending = keep
        if failed is not None:
            step, error = failed
            raise CheckpointError(f"persisting step {step} from the memory tier to {self.persistent.where()} failed "
                                  f"(it is still in memory): {type(error).__name__}: {error}") from error

    def persist_newest(self) -> None:
        """At ``close()``: the newest step in memory goes to the directory, and every persist
        under way finishes."""
        infos = self.catalog.checkpoints()
        if infos:
            self.persist_later(infos[-1].step)
        self.collect(wait=True)

    def release(self) -> list[int]:
        """Drop every step from memory (``close()``, once the newest is persisted)."""
        infos = self.catalog.checkpoints()
        for info in infos:
            self.catalog.delete(info)
        return [i.step for i in infos]

    # --- retention ---------------------------------------------------------------------------
    def retain(self) -> list[int]:
        """Keep the ``keep`` newest steps in memory, and any a persist still needs."""
        infos = self.catalog.checkpoints()
        busy = self.persisting()
        doomed = [i for i in infos[:-self.tier.keep] if i.step not in busy]
        for info in doomed:
            self.catalog.delete(info)
        return [i.step for i in doomed]

    # --- listing and choosing what to load ------------------------------------------------------
    def merged(self) -> list[CheckpointInfo]:
        """Every step either tier holds, oldest first (the memory tier's record where both do)."""
        by_step = {i.step: i for i in self.persistent_catalog.checkpoints()}
        by_step.update({i.step: i for i in self.catalog.checkpoints()})
        return [by_step[s] for s in sorted(by_step)]

    def choose(self, step: int) -> tuple[str, TierRestore]:
        """("memory" or "persistent", the report) for loading ``step``: memory when every
        file of it can be read from a surviving copy or, per file, from the directory.
        CheckpointError (saying why) when neither tier can give the whole step."""
        name = self.catalog.name_of(step)
        in_memory = step in {i.step for i in self.catalog.checkpoints()}
        persisted = step in {i.step for i in self.persistent_catalog.checkpoints()}
        why = ""
        if in_memory:
            plan = self.store.sources(name)
            if not plan.lost:
                return "memory", TierRestore(step, "memory", plan.memory_bytes, plan.fallback_bytes,
                                               f"{len(plan.fallback)} files lost in memory, read from "
                                               f"{self.persistent.where()}" if plan.fallback else "")
            why = (f"step {step} in the memory tier lost {len(plan.lost)} of its files with no copy left "
                   f"(e.g. {plan.lost[0]}: held on nodes that are gone)")
        if persisted:
            return "persistent", TierRestore(step, "persistent", 0, 0, why)
        raise CheckpointError(why + (" and was never persisted" if why else f"step {step} is in neither tier"))

    def pick_newest(self, candidates: list[int]) -> tuple[int, str, TierRestore] | None:
        """The newest of ``candidates`` one of the tiers can give whole; a newer one passed
        over is said (a warning, and the report's reason). None only without candidates;
        candidates of which none can be read raise CheckpointError saying why for each."""
        passed = []
        for step in sorted(candidates, reverse=True):
            try:
                tier, report = self.choose(step)
            except CheckpointError as e:
                passed.append(str(e))
                continue
            if passed:
                report.reason = "; ".join([*passed, report.reason] if report.reason else passed) + \
                    f": loading step {step} from the {tier} tier instead"
                warnings.warn(f"{self.persistent.where()}: {report.reason}", UserWarning, stacklevel=4)
            return step, tier, report
        if passed:       # steps exist and none can be read: never a silent fresh start
            raise CheckpointError(f"{self.persistent.where()}: no step can be loaded from either tier: "
                                  + "; ".join(passed))
        return None
