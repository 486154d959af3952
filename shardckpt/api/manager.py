"""CheckpointManager: a directory of step checkpoints with retention and resume.

The directory holds ``{prefix}_{step}`` checkpoints, each committed atomically. The manager
keeps no state of its own on disk: every query rescans the directory (manifests are cached
by their file identity), so several managers and processes see the same truth, and a crash
at any moment leaves only hidden ``.tmp``/``.del`` leftovers that the next start removes.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import math
import operator
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Self

import optax
from flax import nnx

from shardckpt.api.core import check_item_name, restore_item, save_checkpoint, saved_tree_record, tree_files
from shardckpt.api.nnx import load_model_from, model_item
from shardckpt.api.nnx_state import check_model_classes, check_optimizer_target, check_tx, fresh_optimizer, model_config_of, restore_optimizer, state_of
from shardckpt.api.session import SaveOptions, participants, resolve_load_executor
from shardckpt.api.tiers import MemoryTier, TierRestore, Tiers
from shardckpt.catalog import Catalog, CheckpointInfo, metric_number
from shardckpt.errors import CheckpointError, CheckpointNotFoundError, StructureMismatchError
from shardckpt.format.names import check_name
from shardckpt.loading.checkpoint import read_consistently
from shardckpt.loading.open import layout_of, open_checkpoint, open_in
from shardckpt.saving.metrics import check_metrics
from shardckpt.saving.pipeline import SaveReport, prepare_items
from shardckpt.store.registry import open_store, resolve
from shardckpt.tree import summarize
from shardckpt.workers import Background

SAVE_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(SaveOptions))


def check_manager_directory(directory: Any, store, prefix: str) -> None:
    """Refuse, at construction, a directory a manager cannot keep checkpoints in: a file, or
    an Orbax checkpoint or run holding no checkpoint of ours (its steps would be invisible
    and a resume would start from scratch beside them)."""
    if isinstance(directory, (str, os.PathLike)):
        try:
            parent, name = resolve(directory)
        except CheckpointError:
            parent, name = None, ""          # the root of a bucket or tier: never a file
        if name and parent.size(name) is not None:
            raise CheckpointError(f"{store.where()} is a file; a CheckpointManager keeps its checkpoints in a "
                                  "directory (pass the run directory, e.g. the parent of step_10)")
    layout = layout_of(store, "")
    if layout.kind == "orbax":
        Catalog(store, prefix).scan()   # an Orbax run holding none of ours: OrbaxCheckpointError, saying how to convert
    if layout.kind == "checkpoint":
        raise CheckpointError(f"{store.where()} is one checkpoint, not a directory of them: pass its parent "
                              "directory to CheckpointManager, or load it with load_model / restore")


#: Managers whose last async save nobody has waited for: at exit, after the interpreter has
#: waited for their threads, a failure among them is printed (it would be lost otherwise).
UNCOLLECTED: weakref.WeakSet = weakref.WeakSet()


def report_uncollected_failures() -> None:
    """The exit hook: name every async save that failed and that nobody collected."""
    for mgr in list(UNCOLLECTED):
        failure = mgr.uncollected_failure()
        if failure:
            print(f"shardckpt: {failure}", file=sys.stderr, flush=True)


atexit.register(report_uncollected_failures)

LATEST_ATTEMPTS = 10     # load_latest/load_best re-pick when retention deletes the pick meanwhile
DEFAULT_JOIN_TIMEOUT = 20.0   # seconds for every participant of a multi-process save to begin it
RESERVED_ITEMS = ("model", "optimizer")


@dataclass
class CheckpointState:
    """What a load returns: the guide's fields, and ``items`` (the extra pytrees saved with
    ``manager.save(..., items={...})``, by name)."""

    step: int
    model: nnx.Module
    optimizer: nnx.Optimizer | None
    config: dict
    train_config: dict
    metrics: dict[str, float]
    extra: dict
    items: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """Save, list, retain and load step checkpoints in one directory.

    Retention keeps a checkpoint if it is among the ``max_to_keep`` most recent **or** among
    the ``best_to_keep`` best by ``best_metric`` (``best_mode`` "min" or "max"); the newest
    is never deleted. ``max_to_keep=None`` keeps everything.
    """

    def __init__(self, directory: os.PathLike | str, max_to_keep: int | None = 5,
                 best_metric: str | None = None, best_mode: str = "min", best_to_keep: int = 3,
                 prefix: str = "step", *, backend: str = "auto", num_writers: int | None = None,
                 save_timeout: float | None = None, num_shards: int | None = None,
                 compress: bool = False, verify: bool = True, progress: bool | None = None,
                 async_save: bool = False, join_timeout: float | None = DEFAULT_JOIN_TIMEOUT,
                 incremental: bool = True, memory: MemoryTier | None = None, persist_every: int | None = None):
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode={best_mode!r}: expected 'min' or 'max'")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool)
                                        or max_to_keep < 1):
            raise CheckpointError(f"max_to_keep={max_to_keep!r}: keep at least 1 (an integer, or None for all)")
        if not isinstance(best_to_keep, int) or isinstance(best_to_keep, bool) or best_to_keep < 0:
            raise CheckpointError(f"best_to_keep={best_to_keep!r}: expected an integer >= 0")
        if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
            raise CheckpointError(f"best_metric={best_metric!r:.60}: give the name of a metric you save, or None")
        for name, value in (("verify", verify), ("async_save", async_save), ("incremental", incremental)):
            if not isinstance(value, bool):
                raise CheckpointError(f"{name}={value!r:.40}: expected True or False")
        check_name(prefix, "prefix")
        if memory is not None and not isinstance(memory, MemoryTier):
            raise CheckpointError(f"memory={summarize(memory)}: give a MemoryTier(replicas=..., keep=...), or None")
        if persist_every is not None:
            if memory is None:
                raise CheckpointError("persist_every= copies steps from the memory tier: give memory=MemoryTier(...) "
                                      "too (without it every save goes to the directory)")
            if not isinstance(persist_every, int) or isinstance(persist_every, bool) or persist_every < 1:
                raise CheckpointError(f"persist_every={persist_every!r:.40}: expected an integer >= 1 (or None: "
                                      "only the newest step, at close())")
        self.options = SaveOptions(backend, num_writers, save_timeout, join_timeout, num_shards, compress, progress,
                                   world=True)
        self.store = open_store(directory)
        self.directory = self.store.location("")
        check_manager_directory(directory, self.store, prefix)
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.best_to_keep = best_to_keep
        self.prefix = prefix
        self.verify = verify
        self.catalog = Catalog(self.store, prefix)
        self.async_save = async_save
        self.incremental = incremental
        self.last_save: SaveReport | None = None
        self._pending: Background | None = None
        self._pending_step: int | None = None
        self._best_metric_missing_said = False
        #: the memory tier and its persistence (``api/tiers.py``); None: saves go to ``directory``
        self.tiers = Tiers(memory, self.store, prefix, persist_every, self._retain_persistent) if memory else None
        self.last_restore: TierRestore | None = None
        try:
            self.store.prepare_parent()   # best effort: a read-only mount still loads
        except OSError:
            pass
        self.cleanup_leftovers()

    def __getattr__(self, name: str) -> Any:
        """The save options (``backend``, ``num_writers``, ``save_timeout``...) read as
        attributes; they live in ``self.options``, checked when the manager was made."""
        if name in SAVE_OPTION_NAMES and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --- discovery -------------------------------------------------------------------------
    def step_path(self, step: int) -> Any:
        """Where ``step`` lives: a path, or a URI for an object store (``mem://...`` while it
        is only in the memory tier)."""
        if self.tiers and step in {i.step for i in self.tiers.catalog.checkpoints()}:
            return self.tiers.location(step)
        return self.store.location(self.catalog.name_of(step))

    def cleanup_leftovers(self) -> list:
        """Remove saves and deletes that a dead process left half done; put back a
        checkpoint whose replacement was interrupted. Best effort: never raises, never
        needed for loading (a read-only or foreign directory loads all the same); several
        processes may run it at once. Returns what was done."""
        self.store.finish_pending_deletes()
        done = self.catalog.cleanup_leftovers()
        if self.tiers:
            done += self.tiers.catalog.cleanup_leftovers()
        return done

    def _scan(self) -> list[CheckpointInfo]:
        return self.tiers.merged() if self.tiers else self.catalog.checkpoints()

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self._scan()

    def all_steps(self) -> list[int]:
        return [i.step for i in self._scan()]

    def __len__(self) -> int:
        return len(self._scan())

    @property
    def latest_step(self) -> int | None:
        infos = self._scan()
        return infos[-1].step if infos else None

    def _ranked_best(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        return Catalog.ranked_best(infos, self.best_metric, self.best_mode)

    @property
    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric``; the latest without a metric."""
        infos = self._scan()
        if not self.best_metric:
            return infos[-1].step if infos else None
        ranked = self._ranked_best(infos)
        return ranked[0].step if ranked else (infos[-1].step if infos else None)

    # --- save ------------------------------------------------------------------------------
    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
             config: Any = None, train_config: dict | None = None, metrics: dict | None = None,
             extra: dict | None = None, *, items: dict[str, Any] | None = None,
             process_index: int | None = None, process_count: int | None = None,
             blocking: bool | None = None) -> Any:
        """Commit a checkpoint of ``step`` atomically, then apply retention.

        With several participants (``process_count`` > 1, or taken from the Ray Train context
        or ``jax.process_count()``), every participant calls ``save`` for the same step; each
        writes only its part and the coordinator commits once all have reported. Processes
        holding the same replicated state split the arrays between them. A participant that
        has not begun the save within ``join_timeout`` seconds aborts it, naming the missing
        ones (with Ray).

        ``items`` (name -> pytree) saves more state in the same atomic checkpoint, e.g.
        ``items={"ema": ema_params, "data": loader_state}``; it comes back as
        ``state.items[name]``. ``model`` may also be a plain pytree (no config then).

        Async (``blocking=False``, or ``async_save=True`` on the manager): returns once a
        consistent host snapshot is taken; shards are written and committed in the
        background, then retention runs. The next save waits for the previous one; a
        background failure is raised by the next ``save``, ``load_*`` or
        ``wait_until_finished``. Returns the path the checkpoint will have.
        """
        self.wait_until_finished()
        step = _check_step(step)
        check_metrics(metrics)          # raised here, not by a background save
        self._check_best_metric(metrics)
        saved = {"model": state_of(model, "model")}
        if optimizer is not None:
            if not isinstance(optimizer, nnx.Optimizer):
                raise CheckpointError(f"optimizer= is a {type(optimizer).__name__}, not an nnx.Optimizer; save "
                                      "other optimizer state with items={'name': state}")
            saved["optimizer"] = nnx.state(optimizer)
        if items is not None and not isinstance(items, dict):
            raise CheckpointError(f"items= is {summarize(items)}: give a dict of item name -> pytree")
        for name, tree in (items or {}).items():
            check_item_name(name)
            if name == "model" or name == "optimizer" and optimizer is not None:
                raise CheckpointError(f"items={{{name!r}: ...}}: the item {name!r} is what {name}= writes; give it "
                                      f"once: as {name}= or (optimizer= not given) as items={{'optimizer': ...}}")
            if tree is None:
                raise CheckpointError(f"items[{name!r}] is None: nothing to save")
            saved[name] = state_of(tree, f"items[{name!r}]")
        json_files = {"config.json": {"model_config": model_config_of(model, config), "step": step,
                                      "train_config": train_config}, **tree_files(saved)}
        if metrics is not None:
            json_files["metrics.json"] = metrics
        if extra is not None:
            json_files["extra.json"] = extra
        index, _ = participants(process_index, process_count, ray_train_world=True)
        final = self.tiers.location(step) if self.tiers else self.step_path(step)
        blocking = not self.async_save if blocking is None else blocking
        prepared = prepare_items(saved, snapshot=not blocking)
        if not blocking:
            json_files = copy.deepcopy(json_files)
            metrics = copy.deepcopy(metrics)
        run = functools.partial(self._save_prepared, final, prepared, step, json_files, metrics,
                                index == 0, process_index, process_count)
        if blocking:
            return run()
        self._pending, self._pending_step = Background(run, f"shardckpt-async-save-{step}"), step
        UNCOLLECTED.add(self)
        return final

    def _keep_report(self, report: SaveReport) -> None:
        self.last_save = report

    def _check_best_metric(self, metrics: dict | None) -> None:
        """With ``best_metric``, each save's value of it must be a number (a string cannot
        rank checkpoints); a save without it is said once, since best_step and best-K
        retention then ignore that checkpoint."""
        if not self.best_metric:
            return
        if metrics is None or self.best_metric not in metrics:
            if not self._best_metric_missing_said:
                self._best_metric_missing_said = True
                have = ", ".join(sorted(map(str, metrics or {}))) or "none"
                warnings.warn(f"{self.directory}: best_metric={self.best_metric!r} is not among this save's "
                              f"metrics ({have}): best_step and best-{self.best_to_keep} retention ignore "
                              "checkpoints without it", UserWarning, stacklevel=3)
            return
        value = metrics[self.best_metric]
        if hasattr(value, "dtype") and getattr(value, "ndim", None) == 0 and value.dtype.kind in "biuf":
            value = value.item()           # a NumPy or JAX scalar: stored as its number
        if metric_number(value) is None:
            if isinstance(value, float) and not math.isfinite(value):
                return          # a diverged loss is saved; it just never ranks as best
            raise CheckpointError(f"metrics[{self.best_metric!r}]={value!r:.60}: best_metric ranks checkpoints by "
                                  "this value, so it must be a number")

    def _save_prepared(self, final, prepared, step, json_files, metrics, retain, process_index,
                       process_count) -> Any:
        latest = None
        if self.incremental:        # the base: the newest step of the tier this save writes to
            infos = self.tiers.catalog.checkpoints() if self.tiers else self._scan()
            latest = infos[-1].step if infos else None
        path = save_checkpoint(final, {}, self.options.with_participant(process_index, process_count), step=step,
                               json_files=json_files, metrics=metrics, prepared=prepared,
                               base=self.catalog.name_of(latest) if latest is not None else None,
                               missing_base_ok=True,
                               on_report=self._keep_report)
        if retain and self.tiers:
            self.tiers.retain()
            if self.tiers.due(step):
                self.tiers.persist_later(step)
        elif retain:
            self.apply_retention()
        return path

    def _retain_persistent(self) -> None:
        """Retention in the directory, after a step from the memory tier reached it."""
        infos = self.catalog.checkpoints()
        _, doomed = Catalog.retention_plan(infos, self.max_to_keep, self.best_metric, self.best_mode,
                                           self.best_to_keep)
        for info in doomed:
            self.catalog.delete(info)

    def wait_until_finished(self) -> None:
        """Wait for a background save; raise its error if it failed."""
        pending, self._pending = self._pending, None
        UNCOLLECTED.discard(self)
        if pending is not None:
            pending.result()
        if self.tiers:
            self.tiers.collect(wait=False)     # a failed background persist, said once

    def wait_until_persisted(self) -> None:
        """Wait for every background copy from the memory tier to the directory; raise the
        first failure (the step stays in memory)."""
        self.wait_until_finished()
        if self.tiers:
            self.tiers.collect(wait=True)

    def uncollected_failure(self) -> str | None:
        """What went wrong with the finished background save nobody has waited for yet."""
        pending = self._pending
        if pending is None or not pending.done() or pending.exception() is None:
            return None
        error = pending.exception()
        return (f"the background save of step {self._pending_step} to {self.directory} failed and was not "
                f"committed: {type(error).__name__}: {error}")

    def close(self) -> None:
        """Wait for a background save (raising its error); nothing else to release. A
        program that ends without calling it still commits its last async save: the
        interpreter waits for the save's thread at exit, and a failure is printed then.
        With a memory tier, the newest step in memory is copied to the directory first (and
        every persist under way finishes), then the tier's steps leave the nodes' memory (the
        directory holds the newest; a persist that fails raises and keeps them)."""
        self.wait_until_finished()
        if self.tiers:
            self.tiers.persist_newest()
            self.tiers.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def retention_plan(self) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
        """(kept, deleted) under the retention rules, without deleting anything (in the
        directory; the memory tier keeps its ``keep`` newest)."""
        return Catalog.retention_plan(self.catalog.checkpoints(), self.max_to_keep, self.best_metric, self.best_mode,
                                      self.best_to_keep)

    def apply_retention(self) -> list[int]:
        _, doomed = self.retention_plan()
        for info in doomed:
            self.catalog.delete(info)   # False: another manager retired it first
        return [i.step for i in doomed] + (self.tiers.retain() if self.tiers else [])

    # --- load ------------------------------------------------------------------------------
    def load(self, path: Any, model: Any = None,
             model_cls: type | None = None, config_cls: type | None = None,
             tx: optax.GradientTransformation | None = None, should_load_optimizer: bool = True,
             *, strict: bool = True, allow_pickle: bool = False, shardings: Any = None,
             optimizer_shardings: Any = None, wrt: Any = nnx.Param,
             items: dict[str, Any] | None = None, optimizer: nnx.Optimizer | None = None,
             fresh_optimizer: bool = False) -> CheckpointState:
        """Load the checkpoint at ``path`` (a step directory, ours or the guide's layout).

        ``model``: a module to fill in place, or a pytree target (``state.model`` is then the
        restored pytree); without it ``model_cls`` (default ``LMModel``) is built from the
        saved config. The optimizer: ``optimizer=`` (an ``nnx.Optimizer``, concrete or
        abstract) is filled; else it is rebuilt as ``nnx.Optimizer(model, tx, wrt=wrt)``.
        A checkpoint holding an optimizer needs one of them (or ``should_load_optimizer=False``):
        an optax transformation cannot be rebuilt from its state. The saved state must be
        the target's, leaf for leaf (``strict``, the default): another ``tx`` or ``wrt`` raises
        StructureMismatchError saying what was saved; ``strict=False`` restores what matches
        and warns about the rest; ``fresh_optimizer=True`` keeps the weights and starts a new
        optimizer (``optimizer=`` as given, or built from ``tx=``).
        ``items`` gives targets (or None: as saved) for extra items; the ones not named
        come back as saved in ``state.items`` (``items={"optimizer": target}`` reads the
        optimizer item as a plain pytree). ``shardings`` / ``optimizer_shardings``
        restore onto another device layout (see ``load_model``); by default arrays follow
        the target's own shardings. A checkpoint that another process replaces (or deletes)
        meanwhile is read again (or not found): the state returned is always one whole
        saved version.
        """
        self.wait_until_finished()
        check_load_options(model, model_cls, config_cls, tx, should_load_optimizer, strict=strict, items=items,
                           optimizer=optimizer, fresh_optimizer=fresh_optimizer)
        return read_consistently(lambda: self._load_once(
            path, model, model_cls, config_cls, tx, should_load_optimizer, strict=strict,
            allow_pickle=allow_pickle, shardings=shardings, optimizer_shardings=optimizer_shardings,
            wrt=wrt, items=items or {}, optimizer=optimizer, fresh=fresh_optimizer))

    def _open(self, path: Any, allow_pickle: bool):
        """A checkpoint of the memory tier is opened through the manager's own memory store
        (which reads a lost file from the directory where the step was persisted)."""
        if self.tiers and isinstance(path, str) and path.startswith(self.tiers.store.uri + "/"):
            name = path[len(self.tiers.store.uri) + 1:].partition("?")[0]
            return open_in(self.tiers.store, name, allow_pickle=allow_pickle)
        return open_checkpoint(path, allow_pickle=allow_pickle)

    def _load_once(self, path, model, model_cls, config_cls, tx, should_load_optimizer, *, strict,
                   allow_pickle, shardings, optimizer_shardings, wrt, items, optimizer, fresh) -> CheckpointState:
        ck = self._open(path, allow_pickle)
        executor = resolve_load_executor(self.backend, self.num_writers)   # a Ray worker reads via its node's cache
        cfg_file = ck.read_config()
        cfg = cfg_file.get("model_config")
        loaded = load_model_from(ck, model, model_cls, config_cls, verify=self.verify, executor=executor,
                                 progress=self.progress, shardings=shardings)
        saved_opt = "optimizer" in ck.items
        # The item "optimizer" is a plain pytree when saved with items={"optimizer": tree} (its
        # container record says so) or when items= asks for it as one; else an nnx.Optimizer's.
        opt_is_tree = saved_opt and ("optimizer" in items or saved_tree_record(ck, "optimizer") is not None)
        wants = tx is not None or optimizer is not None
        needs_module = fresh or (should_load_optimizer and saved_opt and not opt_is_tree)
        if needs_module and not isinstance(loaded, nnx.Module):
            raise CheckpointError(f"{ck.where}: the optimizer is built over a module, and model= is "
                                  f"{summarize(loaded)}: pass the module, or should_load_optimizer=False")
        built = None
        if fresh:
            built = fresh_optimizer(loaded, tx, wrt, optimizer)
        elif should_load_optimizer and opt_is_tree and wants:
            how = "items= asks for it as one" if "optimizer" in items else "it was saved with items={'optimizer': ...}"
            raise StructureMismatchError(f"{ck.where}: the checkpoint's 'optimizer' item is a plain pytree ({how}), "
                                         "not an nnx.Optimizer's state: it comes back in state.items['optimizer']. "
                                         "Drop tx=/optimizer=, or pass fresh_optimizer=True for a new nnx.Optimizer")
        elif should_load_optimizer and saved_opt and not opt_is_tree:
            built, _ = restore_optimizer(ck, loaded, tx, optimizer=optimizer, wrt=wrt, strict=strict,
                                         verify=self.verify, executor=executor, progress=self.progress,
                                         shardings=optimizer_shardings)
        elif should_load_optimizer and optimizer is not None:
            raise StructureMismatchError(f"{ck.where}: optimizer= is given to be filled, and the checkpoint holds no "
                                         f"optimizer (items: {', '.join(ck.items)}): pass fresh_optimizer=True to use "
                                         "it as it is, or should_load_optimizer=False")
        extra_names = [n for n in ck.items if n not in RESERVED_ITEMS and n != model_item(ck)]
        if opt_is_tree and (should_load_optimizer or "optimizer" in items):
            extra_names.append("optimizer")
        unknown = [n for n in items if n not in extra_names]
        if unknown:
            raise StructureMismatchError(f"{ck.where}: items= names {unknown}, which the checkpoint does not hold "
                                         f"as extra items (it has {extra_names or 'none'})")
        extra_items = {name: restore_item(ck, name, items.get(name), strict=True, verify=self.verify,
                                          executor=executor, progress=self.progress) for name in extra_names}
        step = self.step_of(ck, cfg_file)
        return CheckpointState(step=step if isinstance(step, int) else -1, model=loaded,
                               optimizer=built, config=cfg or {},
                               train_config=cfg_file.get("train_config") or {},
                               metrics=ck.read_json("metrics.json", {}) or {},
                               extra=ck.read_json("extra.json", {}) or {}, items=extra_items)

    def step_of(self, ck, cfg_file: dict) -> int | None:
        """The step a loaded checkpoint reports, by one rule: a directory named
        ``{prefix}_{N}`` is step N (what the listing, ``load_step`` and retention go by,
        whatever its manifest says); any other directory the step its manifest records, else
        its config's, else -1."""
        named = self.catalog.step_of(ck.name)
        if named is not None:
            return named
        for step in (ck.step, cfg_file.get("step")):
            if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                return step
        return -1

    def load_step(self, step: int, **kw) -> CheckpointState:
        """The checkpoint of ``step`` (CheckpointNotFoundError if it is not committed); the
        keyword arguments of ``load``."""
        self.wait_until_finished()
        check_load_options(**kw)
        step = _check_step(step)
        if step not in self.all_steps():
            raise CheckpointNotFoundError(f"{self.store.where()}: no committed checkpoint for step {step} "
                                          f"(have {self.all_steps()})")
        if not self.tiers:
            return self.load(self.step_path(step), **kw)
        tier, report = self.tiers.choose(step)
        path = self.tiers.location(step) if tier == "memory" else self.store.location(self.catalog.name_of(step))
        state = self.load(path, **kw)
        self.last_restore = report
        return state

    def _load_picked(self, pick, **kw) -> CheckpointState | None:
        """Load the step ``pick()`` chooses; if another process's retention deletes it
        meanwhile, choose again (a concurrent saver made a newer one). The options are
        checked first, also in an empty directory."""
        self.wait_until_finished()
        check_load_options(**kw)
        for attempt in range(LATEST_ATTEMPTS):
            step = pick()
            if step is None:
                return None
            try:
                return self.load_step(step, **kw)
            except CheckpointNotFoundError:
                if attempt + 1 == LATEST_ATTEMPTS:
                    raise
        return None

    def load_latest(self, **kw) -> CheckpointState | None:
        """The newest committed checkpoint, or None in an empty directory (``load``'s
        keyword arguments). With a memory tier: the newest step either tier can give whole
        (``last_restore`` says which tier, how many bytes came from each, and why a newer
        step was passed over, also said as a warning)."""
        if not self.tiers:
            return self._load_picked(lambda: self.latest_step, **kw)
        self.wait_until_finished()
        check_load_options(**kw)
        picked = self.tiers.pick_newest(self.all_steps())
        if picked is None:
            return None
        step, _, report = picked
        state = self.load_step(step, **kw)
        self.last_restore.reason = report.reason
        return state

    def load_best(self, **kw) -> CheckpointState | None:
        """The best checkpoint by ``best_metric`` (the latest without one)."""
        return self._load_picked(lambda: self.best_step, **kw)


def check_load_options(model: Any = None, model_cls: Any = None, config_cls: Any = None, tx: Any = None,
                       should_load_optimizer: bool = True, *, strict: bool = True, allow_pickle: bool = False,
                       shardings: Any = None, optimizer_shardings: Any = None, wrt: Any = nnx.Param,
                       items: Any = None, optimizer: Any = None, fresh_optimizer: bool = False) -> None:
    """``CheckpointManager.load``'s options, checked before anything is read (a misspelt
    keyword raises TypeError here too, also for ``load_latest`` in an empty directory)."""
    where = "CheckpointManager.load"
    if items is not None and not isinstance(items, dict):
        raise CheckpointError(f"{where}: items= is {summarize(items)}: give a dict of item name -> target (or None)")
    check_model_classes(model_cls, config_cls, where)
    for name, value in (("strict", strict), ("should_load_optimizer", should_load_optimizer),
                        ("fresh_optimizer", fresh_optimizer), ("allow_pickle", allow_pickle)):
        if not isinstance(value, bool):
            raise CheckpointError(f"{where}: {name}= takes True or False, got {summarize(value)}")
    if tx is not None:
        check_tx(tx, where)
    if optimizer is not None:
        check_optimizer_target(optimizer, where)
        if tx is not None:
            raise CheckpointError(f"{where}: tx= and optimizer= are both given; optimizer= carries its own tx: "
                                  "give one of them")
    if fresh_optimizer:
        if not should_load_optimizer:
            raise CheckpointError(f"{where}: fresh_optimizer=True builds a new optimizer and should_load_optimizer=False "
                                  "asks for none: give one of them")
        if tx is None and optimizer is None:
            raise CheckpointError(f"{where}: fresh_optimizer=True builds nnx.Optimizer(model, tx, wrt=wrt): pass tx= "
                                  "(or optimizer= to use as it is)")
    if items and "optimizer" in items and (tx is not None or optimizer is not None) and not fresh_optimizer:
        raise CheckpointError(f"{where}: items={{'optimizer': ...}} reads the optimizer item as a plain pytree, and "
                              "tx=/optimizer= rebuild an nnx.Optimizer from it: give one of them")


def _check_step(step: Any) -> int:
    """Steps are non-negative integers (numpy/jax integer scalars accepted; bools and
    floats refused rather than silently rounded)."""
    try:
        if isinstance(step, bool):
            raise TypeError
        value = operator.index(step)
    except TypeError:
        raise CheckpointError(f"step={step!r:.50} is not an integer") from None
    if value < 0:
        raise CheckpointError(f"step={value} is negative")
    return value


