"""What a directory is, decided once, here, through its Store: the only layout check.

A directory (on any store) is one of:

``checkpoint``  a committed shardckpt checkpoint (it holds ``manifest.json``);
``legacy``      the guide's original single-file layout (``model.npz`` / ``optimizer.npz``);
``orbax``       an Orbax checkpoint (``orbax`` names which kind: ``standard``, ``pytree``,
                ``step`` or ``manager``), recognised by its file names and the small
                ``_CHECKPOINT_METADATA``, without importing Orbax;
``steps``       a directory of shardckpt checkpoints named ``<prefix>_<step>`` (a manager
                directory);
``empty`` / ``other`` / ``file`` / ``missing``   nothing we can open.

``open_checkpoint`` opens the first two and refuses the rest with an error of our own that
says what the directory is and what to do (``OrbaxCheckpointError`` names the conversion
command). The manager, ``ls``, ``verify``, ``inspect``, ``convert`` and ``export`` all ask
``layout_of``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shardckpt.errors import CheckpointError, CheckpointNotFoundError, OrbaxCheckpointError
from shardckpt.format import limits
from shardckpt.format.manifest import MANIFEST
from shardckpt.format.nesting import raw_json_depth
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.legacy import LegacyCheckpoint, is_legacy_listing
from shardckpt.store.base import Entry, Store
from shardckpt.store.registry import resolve

ORBAX_STEP_DIR = re.compile(r"(?:(.*)_)?([0-9]{1,18})")   # Orbax step directories: "29", "step_29"
STEP_CHECKPOINT = re.compile(r"([A-Za-z0-9][A-Za-z0-9_\-]*)_(0|[1-9][0-9]{0,17})")
ORBAX_TMP = ".orbax-checkpoint-tmp"
ORBAX_METADATA = "_CHECKPOINT_METADATA"
MAX_ORBAX_METADATA = 16 << 20
MAX_SCANNED_CHILDREN = 10_000


@dataclass(frozen=True)
class Layout:
    kind: str                 # checkpoint | legacy | orbax | steps | empty | other | file | missing
    orbax: str | None = None  # the Orbax kind when kind == "orbax"

    @property
    def openable(self) -> bool:
        return self.kind in ("checkpoint", "legacy")


def layout_of(store: Store, name: str, listing: list[Entry] | None = None) -> Layout:
    """What directory ``name`` of ``store`` is (see module doc), from its ``listing`` (read
    here when not given), a few more listings at most and one small JSON file; never raises
    for what it finds."""
    if listing is None:
        if name and store.size(name) is not None:
            return Layout("file")
        try:
            listing = store.list(name)
        except (OSError, CheckpointError):
            return Layout("missing")
    entries = {e.name: e for e in listing}
    if MANIFEST in entries and not entries[MANIFEST].is_dir:
        return Layout("checkpoint")
    if not entries:
        return Layout("empty" if store.is_dir(name) else "missing")
    if is_legacy_listing(set(entries)):
        return Layout("legacy")
    orbax = orbax_kind(store, name, entries)
    if orbax is not None:
        return Layout("orbax", orbax)
    if step_checkpoints(store, name, entries):
        return Layout("steps")
    return Layout("other")


def step_checkpoints(store: Store, name: str, entries: dict[str, Entry] | None = None) -> list[tuple[int, str]]:
    """(step, root-relative name) of the ``<prefix>_<step>`` checkpoints directly in ``name``
    (any prefix), step order."""
    entries = entries if entries is not None else {e.name: e for e in store.list(name)}
    out = []
    for child in entries.values():
        m = STEP_CHECKPOINT.fullmatch(child.name)
        path = f"{name}/{child.name}" if name else child.name
        if m and child.is_dir and not child.is_link and store.exists(f"{path}/{MANIFEST}"):
            out.append((int(m.group(2)), path))
    return sorted(out)


# --- Orbax, recognised by name ------------------------------------------------------------------

def small_json(store: Store, name: str) -> Any:
    """A small JSON file, or None when absent, too large, unreadable, not JSON, or nested
    deeper than ``MAX_JSON_DEPTH`` (measured on the bytes before parsing: a hostile file
    nested 100,000 deep never reaches ``json.loads``, which would raise ``RecursionError``,
    or crash a program that raised the recursion limit)."""
    try:
        raw = store.read_bytes(name, MAX_ORBAX_METADATA)
        if raw_json_depth(raw) > limits.MAX_JSON_DEPTH:
            return None
        return json.loads(raw)
    except (OSError, CheckpointError, ValueError, RecursionError):
        return None


def _is_file(entries: dict[str, Entry], name: str) -> bool:
    e = entries.get(name)
    return e is not None and not e.is_dir and not e.is_link


def _is_dir(entries: dict[str, Entry], name: str) -> bool:
    e = entries.get(name)
    return e is not None and e.is_dir and not e.is_link


def is_orbax_tree(entries: dict[str, Entry]) -> bool:
    """A directory holding one Orbax pytree (with or without _CHECKPOINT_METADATA)."""
    return (_is_file(entries, "_METADATA") or _is_file(entries, "manifest.ocdbt")
            or _is_dir(entries, "ocdbt.process_0") or _is_file(entries, "checkpoint"))


def orbax_kind(store: Store, name: str, entries: dict[str, Entry] | None = None) -> str | None:
    """What kind of Orbax directory ``name`` is, or None (a shardckpt checkpoint never is):

    ``"standard"``  a ``StandardCheckpointer`` directory
    ``"pytree"``    a ``PyTreeCheckpointer`` directory (or a bare Orbax tree of any handler)
    ``"step"``      one ``CheckpointManager`` step: ``<root>/<step>/<item>/...``
    ``"manager"``   a ``CheckpointManager`` root: ``<root>/<step>/...``
    """
    if entries is None:
        try:
            entries = {e.name: e for e in store.list(name)}
        except (OSError, CheckpointError):
            return None
    if not entries or MANIFEST in entries:
        return None
    path = (lambda child: f"{name}/{child}") if name else (lambda child: child)
    if _is_file(entries, ORBAX_METADATA):
        meta = small_json(store, path(ORBAX_METADATA))
        handlers = meta.get("item_handlers") if isinstance(meta, dict) else None
        if isinstance(handlers, str):
            return "standard" if "StandardCheckpointHandler" in handlers else "pytree"
        if isinstance(handlers, dict) or not is_orbax_tree(entries):
            return "step"
        return "pytree"
    if is_orbax_tree(entries):
        return "pytree"
    found_item = False
    for n, child in enumerate(sorted(entries.values(), key=lambda e: e.name)):
        if n >= MAX_SCANNED_CHILDREN:
            break
        if not child.is_dir or child.is_link or ORBAX_TMP in child.name:
            continue
        try:
            grand = {e.name: e for e in store.list(path(child.name))}
        except (OSError, CheckpointError):
            continue
        if MANIFEST in grand:
            return None            # it holds shardckpt checkpoints: not an Orbax directory
        if ORBAX_STEP_DIR.fullmatch(child.name) and (_is_file(grand, ORBAX_METADATA)
                                                    or _is_file(grand, "commit_success.txt")):
            return "manager"
        if is_orbax_tree(grand) and not _is_file(grand, ORBAX_METADATA):
            found_item = True   # an item of a step (items have no _CHECKPOINT_METADATA)
    if found_item or _is_file(entries, "commit_success.txt"):
        return "step"
    return None


def orbax_hint(where: str, kind: str) -> str:
    return (f"{where}: this is an Orbax checkpoint ({kind}), not a shardckpt checkpoint; convert it "
            f"with `shardckpt convert {where} NEW_DIR` (or shardckpt.convert.from_orbax(src, dst)) "
            "and load NEW_DIR")


# --- opening ------------------------------------------------------------------------------------

def open_checkpoint(path: Any, *, allow_pickle: bool = False, filesystem: Any = None) -> Checkpoint:
    """Open a committed shardckpt checkpoint (a path or a URI such as ``s3://...``), or a
    directory in the guide's single-file layout (``model.npz``, ``optimizer.npz``,
    ``config.json``) read-only."""
    store, name = resolve(path, filesystem)
    return open_in(store, name, allow_pickle=allow_pickle)


def open_in(store: Store, name: str, *, allow_pickle: bool = False) -> Checkpoint:
    """``open_checkpoint`` for checkpoint ``name`` of ``store``."""
    try:
        return Checkpoint.at(store, name)      # the common case costs one read
    except CheckpointNotFoundError as e:
        no_manifest = e
    layout = layout_of(store, name)
    where = store.where(name)
    if layout.kind == "legacy":
        return LegacyCheckpoint.at(store, name, allow_pickle=allow_pickle)
    if layout.kind == "checkpoint":   # published between the two looks
        return Checkpoint.at(store, name)
    if layout.kind == "orbax":
        raise OrbaxCheckpointError(orbax_hint(where, layout.orbax))
    if layout.kind == "steps":
        names = ", ".join(n.rsplit("/", 1)[-1] for _, n in step_checkpoints(store, name)[-3:])
        raise CheckpointNotFoundError(f"{where}: a directory of checkpoints ({names}, ...), not one "
                                      "checkpoint: open one of them, or use "
                                      f"CheckpointManager({where!r}).load_latest()")
    if layout.kind == "file":
        raise CheckpointNotFoundError(f"{where}: a file, not a checkpoint directory")
    if layout.kind == "missing":
        raise CheckpointNotFoundError(f"{where}: no such checkpoint directory")
    raise no_manifest
