"""The ``System`` interface and its registry.

A system is one way to put a state on disk and get it back: shardckpt with some backend,
Orbax with some settings, ``np.savez``, or a raw limit of the machine. One module per
system (or family of variants) under ``ckbench/systems/``; each class registers itself with
``@register`` and is picked up automatically (every module in this package is imported).

The harness turns a system into timed operations:

* ``save(state, path)``: a durable save of ``state`` (returns what it wrote when that is not
  ``path``). Timed. Operation ``<name>_save``.
* ``async_save(state, path)`` (optional): returns ``(written_path_or_None, wait)``; the time
  to return is *blocking*, the time until ``wait()`` returns is *total*.
  Operation ``<name>_async``.
* ``restore(path, target)``: arrays back from ``path`` (a checkpoint this system wrote
  with ``make_source``, or the one of ``restores_from``), waited for
  (``jax.block_until_ready``). Timed, with the files in the page cache (``hot``) and out
  of it (``cold``). Operations ``<name>_restore_hot`` / ``_cold``.

Everything else (``setup``, ``prepare``, ``cleanup``, ``make_source``, ``teardown``) is
untimed.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common import rmtree

REGISTRY: dict[str, type[System]] = {}

ORBAX_DEFAULT = "orbax"        # the system every "x Orbax-default" ratio divides by


def register(cls: type[System]) -> type[System]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a registered system needs a name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"system {cls.name!r} registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def load_all() -> dict[str, type[System]]:
    """Import every module of this package (each registers its systems)."""
    from .. import systems
    for m in pkgutil.iter_modules(systems.__path__):
        if m.name != "base" and not m.name.startswith("_"):
            importlib.import_module(f"{systems.__name__}.{m.name}")
    return REGISTRY


class Context:
    """What a system may use: the state (``state.items``, ``state.model``/``state.opt``,
    ``state.targets``), a scratch directory and a global step counter."""

    def __init__(self, state, workdir: Path, args=None):
        self.state = state
        self.workdir = Path(workdir)
        self.args = args
        self.step = 0

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def sub(self, name: str) -> Path:
        p = self.workdir / name
        p.mkdir(parents=True, exist_ok=True)
        return p


class System:
    name = ""                  # registry key and operation-name prefix
    label = ""                 # for tables and plots
    family = ""                # shardckpt | orbax | numpy | limit (ratios and grouping)
    needs_ray = False          # runs on the run's local Ray (skipped with --no-ray)
    default = True             # part of a run unless --systems names it
    restores_from: str | None = None   # restore another system's checkpoint (its make_source)
    restore_caches: tuple[str, ...] = ("hot", "cold")
    limit_of: str | None = None        # limits only: "write" (for saves) or "read" (restores)
    measure_memory = True      # peak host memory of save/restore in a fresh process

    def __init__(self, ctx: Context):
        self.ctx = ctx

    # --- capabilities ------------------------------------------------------------------------
    @classmethod
    def can(cls, action: str) -> bool:
        """Whether the class implements ``save``, ``async_save`` or ``restore``."""
        return getattr(cls, action) is not getattr(System, action)

    # --- lifecycle (untimed) -----------------------------------------------------------------
    def setup(self) -> None:
        """Once per state, before the warm-up."""

    def teardown(self) -> None:
        """Once per state, at the end."""

    def prepare(self, action: str) -> None:
        """Untimed, right before each timed ``action`` (after the page cache is set)."""

    def cleanup(self, action: str, path: Path | None) -> None:
        """Untimed, after each ``action``: remove what a save wrote."""
        if action in ("save", "async") and path is not None:
            rmtree(path)

    def make_source(self, path: Path) -> Path:
        """Write the checkpoint that the timed restores read (once, untimed) at ``path``
        (which does not exist yet); return where it is."""
        return self.save(self.ctx.state, path) or path

    # --- timed -------------------------------------------------------------------------------
    def save(self, state, path: Path) -> Path | None:
        raise NotImplementedError

    def async_save(self, state, path: Path) -> tuple[Path | None, Callable[[], None]]:
        raise NotImplementedError

    def restore(self, path: Path, target: dict) -> Any:
        raise NotImplementedError

    # --- checks ------------------------------------------------------------------------------
    def result_leaves(self, result) -> list | None:
        """The restored arrays in ``flat_host_arrays`` order (bit-exact check); None: no check."""
        import jax
        return jax.tree.leaves(result)

    # --- names -------------------------------------------------------------------------------
    def op_name(self, action: str, cache: str | None = None) -> str:
        return f"{self.name}_{action}" + (f"_{cache}" if cache else "")

    def op_label(self, action: str, cache: str | None = None) -> str:
        what = {"save": "save", "async": "async save", "restore": "restore"}[action]
        return f"{self.label} {what}" + (f" [{cache} cache]" if cache else "")
