"""The layout every store without rename shares: files under a version prefix, the
manifest last.

Object stores (S3, and any pyarrow filesystem) have no atomic directory rename, so a save
writes its files under a fresh version prefix inside the step directory and commits by
writing the manifest last::

    s3://bucket/run/step_100/manifest.json               <- the commit record, written last
    s3://bucket/run/step_100/v3f9c2a1b00c4d2e1/model-00000-of-00002.npz
    s3://bucket/run/step_100/v3f9c2a1b00c4d2e1/config.json  ...

Re-saving a step uploads the new version beside the old one, switches the manifest, and only
then deletes the old version's objects (``stale_after``). What differs per store is only how
the manifest is switched (``VersionedStaging.switch_manifest``): one conditional PUT on S3, a
write beside it and a move on pyarrow filesystems. A prefix no manifest references is a
leftover (``version_leftovers``): an aborted save, or one that never committed.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Callable

from shardckpt.errors import CheckpointError
from shardckpt.format.limits import MAX_MANIFEST_BYTES
from shardckpt.format.manifest import MANIFEST, Manifest
from shardckpt.format.names import is_version_dir
from shardckpt.format.ownership import foreign_entries, staged_by_us
from shardckpt.store.base import Leftover, Staging, Store

ABORT_MARKER = "_ABORTED"
STALE_VERSION_SECONDS = 3600         # an unreferenced version prefix untouched this long is dead


class VersionedStore(Store):
    """A store that keeps checkpoints under version prefixes (see module doc). Subclasses
    add ``put(name, data)`` and ``delete(names)``."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        ...

    @abstractmethod
    def delete(self, names: list[str]) -> None:
        ...

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy object ``src`` to ``dst`` (both root-relative) where the data lies, without
        sending it through this process where the store allows (a server-side copy)."""

    def retire(self, name: str) -> None:
        try:
            raw = self.read_bytes(f"{name}/{MANIFEST}", MAX_MANIFEST_BYTES)
        except CheckpointError:
            raw = None                                # damaged: names decide what is ours
        self.delete([f"{name}/{MANIFEST}"])          # it stops being a checkpoint here
        try:
            manifest = Manifest.loads(raw, self.where(name)) if raw is not None else None
        except CheckpointError:
            manifest = None
        try:
            self.delete_ours(name, manifest)
        except Exception:  # noqa: BLE001 - no longer a checkpoint; what is left is a leftover for gc
            pass

    def remove_leftover(self, name: str) -> None:
        """Delete what a dead save left under ``name`` (a version prefix), best effort: only
        the objects that are ours (``format/ownership.py``), never the user's."""
        try:
            self.delete_ours(name, None)
        except Exception:  # noqa: BLE001 - best effort: unreferenced objects are invisible
            pass

    def delete_ours(self, name: str, manifest: Manifest | None) -> None:
        """Delete the objects of checkpoint (or version prefix) ``name`` that are ours
        (those ``manifest`` lists, and the names a save stages), leaving the user's (#17.12b)."""
        head, _, last = name.rpartition("/")
        if head and is_version_dir(last):     # one version prefix: what a save stages in it
            doomed = [f"{name}/{e.name}" for e in self.list(name) if staged_by_us(e.name, e.is_dir)]
        else:
            children = self.list(name)
            versions = {c.name: [(e.name, e.is_dir) for e in self.list(f"{name}/{c.name}")]
                        for c in children if c.is_dir and is_version_dir(c.name)}
            keep = set(foreign_entries(manifest, [(c.name, c.is_dir) for c in children], versions.__getitem__))
            doomed = [f"{name}/{c.name}" for c in children if not c.is_dir and c.name not in keep]
            doomed += [f"{name}/{v}/{n}" for v, entries in versions.items() for n, d in entries
                       if not d and f"{v}/{n}" not in keep]
        self.abort_uploads(name)
        self.delete(doomed)
        self.drop_empty(name)

    def abort_uploads(self, name: str, older_than: float | None = None) -> int:
        """Abort unfinished uploads under ``name`` where the store has them (S3 multipart)."""
        return 0

    def drop_empty(self, name: str) -> None:
        """Remove what is left of prefix ``name`` once nothing but empty version directories
        is in it, where a store keeps directories apart from their objects (a pyarrow
        filesystem); nothing on S3."""

    def leftovers(self, owns: Callable[[str], bool], now: float) -> list[Leftover]:
        return version_leftovers(self, owns, now)


def referenced_versions(manifest: Manifest) -> set[str]:
    """The version prefixes a manifest's files live under."""
    return {n.split("/", 1)[0] for n in [*manifest.files, *manifest.meta_files] if "/" in n}


def version_leftovers(store: Store, owns: Callable[[str], bool], now: float) -> list[Leftover]:
    """Version prefixes of checkpoints ``owns`` accepts that no manifest references: removed
    when marked aborted or untouched for ``STALE_VERSION_SECONDS``, else kept (a save may
    still be writing them). A checkpoint whose manifest cannot be read is left alone."""
    out = []
    for entry in sorted(store.list(""), key=lambda e: e.name):
        if not entry.is_dir or not owns(entry.name):
            continue
        children = store.list(entry.name)
        versions = [c.name for c in children if c.is_dir and is_version_dir(c.name)]
        if not versions:
            continue
        referenced: set[str] = set()
        if any(c.name == MANIFEST for c in children):
            try:
                raw = store.read_bytes(f"{entry.name}/{MANIFEST}", MAX_MANIFEST_BYTES)
                referenced = referenced_versions(Manifest.loads(raw, store.where(entry.name)))
            except (OSError, CheckpointError):
                continue   # damaged or replaced meanwhile: leave it for a person (or the next scan)
        for v in versions:
            if v in referenced:
                continue
            objs = store.list(f"{entry.name}/{v}")
            if not any(staged_by_us(o.name, o.is_dir) for o in objs):
                continue       # only the user's objects are left in it: nothing to clean up
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


def stale_after(previous: bytes | None, manifest: bytes, where: str) -> list[str]:
    """The files of the replaced version (its manifest ``previous``) that the new manifest
    no longer references: what a publish deletes once the new manifest is in place."""
    if previous is None:
        return []
    try:
        old = Manifest.loads(previous, where)
    except CheckpointError:
        return []          # a damaged manifest was replaced: its files are leftovers for gc
    now = Manifest.loads(manifest, where)
    keep = set(now.files) | set(now.meta_files)
    return [n for n in [*old.files, *old.meta_files] if n not in keep]


class VersionedStaging(Staging):
    """A version prefix inside the step directory, published by switching the manifest."""

    store: VersionedStore

    def __init__(self, store: VersionedStore, final: str, txn: str):
        self.store, self.final, self.txn = store, final, txn
        self.version = f"v{txn[:16]}"

    def stored_name(self, name: str) -> str:
        return f"{self.version}/{name}"

    def staged_path(self, name: str) -> str:
        """Root-relative name of staged file ``name``."""
        return f"{self.final}/{self.version}/{name}"

    def read_staged(self, name: str, limit: int) -> bytes | None:
        try:
            return self.store.read_bytes(self.staged_path(name), limit)
        except FileNotFoundError:
            return None

    def remove_staged(self, name: str) -> None:
        self.store.delete([self.staged_path(name)])

    def adopt(self, checkpoint_name: str, stored: str) -> str:
        """A file of the checkpoint being replaced stays where it is (publish keeps what the
        new manifest references); a file of another checkpoint (an incremental save's base)
        is copied into this version, server-side, so each checkpoint stays whole on its own."""
        if checkpoint_name == self.final:
            return stored
        name = stored.rsplit("/", 1)[-1]
        self.store.copy(f"{checkpoint_name}/{stored}", self.staged_path(name))
        return self.stored_name(name)

    def forget(self, names: set[str]) -> None:
        pass         # staged objects are simply written again by the next attempt

    @abstractmethod
    def switch_manifest(self, manifest: bytes, expect: Any) -> bytes | None:
        """Make ``manifest`` the checkpoint's manifest (the commit point), never leaving a
        torn one; returns the manifest it replaced (None if there was none). With
        ``expect``, ``VersionChanged`` if the checkpoint is not that version any more."""

    def publish(self, manifest: bytes, expect: Any = None) -> list[str]:
        previous = self.switch_manifest(manifest, expect)
        stale = stale_after(previous, manifest, self.store.where(self.final))
        try:
            self.store.delete([f"{self.final}/{n}" for n in stale])
        except Exception:  # noqa: BLE001 - unreferenced objects are invisible; gc removes them
            pass
        return stale

    def discard(self) -> None:
        self.store.remove_leftover(f"{self.final}/{self.version}")

    def mark_aborted(self, reason: str) -> None:
        self.discard()
        try:
            self.store.put(self.staged_path(ABORT_MARKER), reason.encode()[:4096])
        except Exception:  # noqa: BLE001 - participants still stop at the deadline
            pass

    def aborted(self) -> bool:
        return self.store.exists(self.staged_path(ABORT_MARKER))

    def manifest_limit(self) -> int:
        return MAX_MANIFEST_BYTES
