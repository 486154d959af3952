"""The Store seam: where a checkpoint's bytes live and how a commit is published.

Everything above this package (the save transaction, the reader, the coordinators, the
executors, the catalog) talks to a ``Store`` and never asks which kind it is. A store is a
directory of checkpoints addressed by root-relative names (``"step_7/manifest.json"``); a
save goes through a ``Staging`` area that the store hands out per transaction:

* writers stream shard files into it (``write_stream``) and small files (``write_bytes``);
  each returns the file's size and xxh3-64, computed while writing, never by reading back;
* the committer ``publish``es it with the manifest bytes, atomically: a POSIX rename (or
  exchange) on a local disk, one manifest PUT on an object store;
* an aborted save ``discard``s it; what a crash leaves behind is invisible (never listed as
  a checkpoint) and removable by ``gc``.

Stores and staging areas are picklable: Ray writer actors and every participant of a
multi-process save rebuild them on their own node and write straight into the store.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: Seconds a save may take by default (``save_timeout=``): the deadline of its transaction,
#: of its writers and of the store's retries of transient errors.
DEFAULT_SAVE_TIMEOUT = 600.0
COPY_PIECE = 8 << 20           # bytes a copy between stores reads at once

# What this process read from stores (bytes of shard data and calls), for tests and
# benchmarks: replica-aware restores are judged by these counters.
READ_STATS = {"bytes": 0, "reads": 0}
_READ_LOCK = threading.Lock()


def count_read(nbytes: int) -> None:
    with _READ_LOCK:
        READ_STATS["bytes"] += nbytes
        READ_STATS["reads"] += 1


def read_stats() -> dict:
    with _READ_LOCK:
        return dict(READ_STATS)


@dataclass(frozen=True)
class Leftover:
    """Something a save or delete left behind, and what cleanup does with it."""

    name: str                 # root-relative
    kind: str                 # tmp | del | old (local directories) | version (object-store prefixes)
    checkpoint: str           # the step directory it belongs to
    action: str               # remove | restore | keep
    reason: str
    host: str = ""
    pid: int = 0
    owner_alive: bool = False
    age_s: float = 0.0


class VersionChanged(Exception):
    """A conditional publish found the checkpoint replaced since its version was read."""


@dataclass(frozen=True)
class Entry:
    """One entry directly under a listed prefix."""

    name: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0          # seconds since the epoch; 0 where the store cannot tell
    is_link: bool = False       # a symlink (local stores): never followed, never ours


class Sink(ABC):
    """A file being written: bytes go in order; ``pos`` is the count written so far."""

    pos: int

    @abstractmethod
    def write(self, data) -> None:
        ...


@dataclass(frozen=True)
class Written:
    """A file a staging area holds, durable: its name in the manifest, size and checksum."""

    name: str
    size: int
    xxh3_64: str


class Source(ABC):
    """One stored file opened for reading, checked to be a plain file of ``size`` bytes."""

    size: int
    name: str

    @abstractmethod
    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` exactly (CorruptCheckpointError when short)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Store(ABC):
    """A directory of checkpoints. Names are relative to its root, '/'-separated."""

    uri: str                      # how users name the root (a path or "s3://bucket/prefix")
    #: Whether a directory exists apart from what it holds (a local disk); on object stores a
    #: prefix exists exactly when objects lie under it, so an empty one is no error.
    has_directories: bool = False
    deadline: float | None = None  # time.time() until which transient errors are retried (a save's)
    #: The largest shard file a save should plan for this store (None: as the writers like):
    #: the memory tier keeps files small, so the copies in flight of a save stay small.
    max_file_bytes: int | None = None

    # --- naming ----------------------------------------------------------------------------
    def where(self, name: str = "") -> str:
        """``name`` as the user would write it, for messages and return values."""
        return f"{self.uri.rstrip('/')}/{name}" if name else self.uri

    def location(self, name: str) -> Any:
        """What a save or ``step_path`` returns for checkpoint ``name``: a ``Path`` on a
        local disk, a URI string elsewhere."""
        return self.where(name)

    # --- reading ---------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, name: str, limit: int) -> bytes:
        """A whole small file (FileNotFoundError if absent; CorruptCheckpointError if larger
        than ``limit``, a link, or not a plain file)."""

    @abstractmethod
    def open(self, name: str) -> Source:
        """A file for ranged reads (FileNotFoundError if absent)."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The size of file ``name``, None if there is none."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[Entry]:
        """Entries directly under ``prefix`` ("" is the root); [] when it does not exist."""

    # --- writing ---------------------------------------------------------------------------
    @abstractmethod
    def stage(self, final: str, txn: str, owner: tuple[str, int] | None = None) -> "Staging":
        """The staging area of transaction ``txn`` saving checkpoint ``final``: created on
        first call, the same area on every later call with the same arguments (every
        participant of a save calls it). ``owner`` (host, pid) is who drives the save,
        so a later cleanup can tell a dead save from a running one."""

    @abstractmethod
    def retire(self, name: str) -> None:
        """Delete checkpoint ``name`` so that it stops being one at once (manifest first or a
        rename out of sight), then remove its files. FileNotFoundError when it is gone."""

    @abstractmethod
    def remove_leftover(self, name: str) -> None:
        """Remove something a dead save left (a staging area), best effort."""

    def restore_leftover(self, name: str, final: str) -> None:
        """Put back a checkpoint that an interrupted replacement moved aside (local stores
        only: object stores never move a committed checkpoint)."""
        raise OSError(f"{self.where(name)}: nothing to restore on this store")

    def leftovers(self, owns: Callable[[str], bool], now: float) -> list[Leftover]:
        """What dead saves and deletes left among the checkpoints ``owns(name)`` accepts,
        and what cleanup would do with each (each store knows its own: hidden directories
        on a local disk, unreferenced version prefixes on object stores). Changes nothing."""
        return []

    def finish_pending_deletes(self) -> None:
        """Finish removals this process began and could not complete (best effort)."""

    def copy_out(self, name: str, staging: "Staging", dst_name: str) -> Written:
        """Write file ``name`` into another store's ``staging`` as ``dst_name`` (a copy of a
        checkpoint, ``saving/persist.py``): streamed through this process here; a store
        whose files others hold (the memory tier) has them write it."""
        with self.open(name) as source:
            def fill(sink: Sink) -> None:
                offset = 0
                while offset < source.size:
                    piece = memoryview(bytearray(min(COPY_PIECE, source.size - offset)))   # fresh: sinks may keep it
                    source.readinto(offset, piece)
                    sink.write(piece)
                    offset += len(piece)
            return staging.write_stream(dst_name, fill)[1]

    def is_dir(self, name: str = "") -> bool:
        """Whether ``name`` (the root: "") is a directory: on object stores, a prefix that
        holds objects."""
        return bool(self.list(name))

    @classmethod
    def claims(cls, uri: str) -> bool:
        """Whether this kind of store serves ``uri`` (see ``registry.open_store``)."""
        return False

    def lock(self, name: str):
        """A context manager serialising the commits of checkpoint ``name`` across processes
        where the store can (a file lock on local disks); elsewhere a no-op, and publishes are
        conditional instead (``Staging.publish(..., expect=token)``)."""
        return contextlib.nullcontext()

    def prepare_parent(self) -> None:
        """Make sure the root exists (a local directory); object stores need nothing."""

    def exists(self, name: str) -> bool:
        return self.size(name) is not None


class Staging(ABC):
    """The files of one save transaction before they are published (see module doc)."""

    store: Store
    final: str
    txn: str

    @abstractmethod
    def stored_name(self, name: str) -> str:
        """The name the manifest records for staged file ``name`` (relative to the
        checkpoint directory: plain on a local disk, under the version prefix elsewhere)."""

    @abstractmethod
    def write_stream(self, name: str, fill: Callable[[Sink], T]) -> tuple[T, Written]:
        """Create file ``name`` and let ``fill`` write it; durable when this returns. On any
        error nothing of the file remains and the error is raised."""

    def write_bytes(self, name: str, data: bytes) -> Written:
        def fill(sink: Sink) -> None:
            sink.write(data)
        return self.write_stream(name, fill)[1]

    @abstractmethod
    def read_staged(self, name: str, limit: int) -> bytes | None:
        """A small file staged earlier (by any participant), None when not (yet) there."""

    @abstractmethod
    def remove_staged(self, name: str) -> None:
        """Remove a staged file that is not part of the checkpoint (a part report)."""

    @abstractmethod
    def adopt(self, checkpoint_name: str, stored: str) -> str:
        """Carry file ``stored`` of the checkpoint being replaced into this save without
        copying data where the store allows; returns its name in the new manifest."""

    def expect_bytes(self, nbytes: int) -> None:
        """Told, before a participant's shards are written, that ``nbytes`` will be: a store
        of bounded capacity (the memory tier) refuses a save that cannot fit here, before
        anything is written."""

    def version_token(self) -> Any:
        """What identifies the committed version of ``final`` now, for ``publish(expect=)``
        (None where the store cannot publish conditionally)."""
        return None

    def forget(self, names: set[str]) -> None:
        """Drop staged files of an attempt that will be redone (a carry-over of an outdated
        version), so the next attempt can stage them again."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.remove_staged(name)

    @abstractmethod
    def publish(self, manifest: bytes, expect: Any = None) -> list[str]:
        """Commit: make the staged files plus ``manifest`` the checkpoint ``final``,
        atomically, replacing the one there (which stays whole until then). With ``expect``
        (a ``version_token``): only if the checkpoint is still that version, else raise
        ``VersionChanged`` (publishing nothing). Returns the names of the replaced version's
        files that are no longer referenced (removed)."""

    @abstractmethod
    def discard(self) -> None:
        """Remove everything staged, best effort (an abort)."""

    @abstractmethod
    def aborted(self) -> bool:
        """Whether the area is gone or marked aborted (participants poll it)."""

    def mark_aborted(self, reason: str) -> None:
        """Tell every participant polling this area that the save is off, then discard."""
        self.discard()
