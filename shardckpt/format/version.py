"""One committed version of a checkpoint: its manifest and its chunk index, validated.

Whoever reads a committed checkpoint (the reader restoring it, the committer carrying its
items into a new save, ``verify``) goes through a ``Version``: the manifest is parsed and
checked once; metadata files (the index, its fragments, ``config.json``) are read only when
asked and only if the manifest lists them with the size and xxh3-64 read. Reading is a
function handed in (``read(name, limit) -> bytes`` for names inside the checkpoint), so this
module does no I/O of its own and works over any store.

Files are read by name, and a replacement swaps the whole checkpoint: a file that does not
match the manifest may belong to a newer version rather than be damaged. Before any damage
is reported the manifest is read again (``raise_if_replaced``); if it changed, the error is
``ReplacedWhileReadingError`` (the load functions read the new version), never a mix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import xxhash

from shardckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, ReplacedWhileReadingError
from shardckpt.format import limits
from shardckpt.format.fragments import FragmentedIndex, is_directory, load_directory
from shardckpt.format.index import ChunkTable, load_index
from shardckpt.format.manifest import MANIFEST, Manifest
from shardckpt.format.names import check_file_name

Box = tuple[tuple[int, ...], tuple[int, ...]]
Reader = Callable[[str, int], bytes]       # (name inside the checkpoint, size limit) -> bytes


def version_id(raw_manifest: bytes) -> str:
    """What identifies a committed version: the SHA-1 of its manifest's bytes."""
    return hashlib.sha1(raw_manifest).hexdigest()


class Version:
    """A committed version: ``read(MANIFEST, limit)`` must return its manifest now."""

    def __init__(self, read: Reader, where: str, *,
                 known: tuple[bytes, Manifest, dict[str, dict[str, ChunkTable]]] | None = None):
        """``known``: the manifest's bytes, parsed manifest and one-file index, parsed and
        validated already (by the committer that just published them): nothing is read."""
        self.read, self.where = read, where
        if known is None:
            try:
                raw = read(MANIFEST, limits.MAX_MANIFEST_BYTES)
            except (FileNotFoundError, NotADirectoryError) as e:
                raise CheckpointNotFoundError(f"{where}: no {MANIFEST}; this is not a committed checkpoint") from e
            manifest, index = Manifest.loads(raw, where), None
        else:
            raw, manifest, index = known
        self.manifest = manifest
        self.raw_manifest = raw
        self.id = version_id(raw)                  # what caches key a version by
        self._index: dict[str, dict[str, ChunkTable]] | None = index
        self._fragmented: FragmentedIndex | bool | None = None if index is None else False   # False: one index file
        self._index_bytes = 0

    # --- metadata files -------------------------------------------------------------------
    def meta_name(self, name: str) -> str | None:
        """The stored name of metadata file ``name`` (object stores keep it under a version
        prefix), or None if the checkpoint has none."""
        if name in self.manifest.meta_files:
            return name
        found = [n for n in self.manifest.meta_files if n.rsplit("/", 1)[-1] == name]
        return found[0] if len(found) == 1 else None

    def read_meta(self, name: str, limit: int) -> bytes:
        """Metadata file ``name`` (as stored), checked against its size and xxh3-64."""
        check_file_name(name, self.where)
        rec = self.manifest.meta_files.get(name)
        if rec is None:
            raise CorruptCheckpointError(f"{self.where}: {name} is not listed in the manifest")
        if rec.size > limit:
            raise CorruptCheckpointError(f"{self.where}: {name} is {rec.size} bytes, over the {limit} limit")
        try:
            raw = self.read(name, limit)
        except FileNotFoundError as e:
            self.raise_if_replaced(e)
            raise CorruptCheckpointError(f"{self.where}: {name} is missing") from e
        if len(raw) != rec.size or xxhash.xxh3_64(raw).hexdigest() != rec.xxh3_64:
            self.raise_if_replaced(None)
            raise CorruptCheckpointError(f"{self.where}: {name} does not match its checksum in the manifest")
        return raw

    def raise_if_replaced(self, cause: BaseException | None) -> None:
        """Raise ``ReplacedWhileReadingError`` if the checkpoint no longer holds the manifest
        this version was read from: another process replaced it (a new save of the same
        path) or deleted it (retention) meanwhile."""
        try:
            now = self.read(MANIFEST, limits.MAX_MANIFEST_BYTES)
        except (OSError, CheckpointError):
            now = None
        if now != self.raw_manifest:
            what = "deleted" if now is None else "replaced by another save"
            raise ReplacedWhileReadingError(f"{self.where} was {what} while being read; nothing read from "
                                            "it is used (open it again)") from cause

    # --- the chunk index ------------------------------------------------------------------
    def index(self) -> dict[str, dict[str, ChunkTable]]:
        """The whole validated chunk index: item -> key -> ``ChunkTable``, parsed once (a
        fragmented index: every fragment read, every array checked whole)."""
        if self._index is None:
            fragmented = self._index_source()
            if fragmented:
                self._index = fragmented.full()
        return self._index

    def chunk_tables(self, item: str, requests: dict[str, list[Box]]) -> dict[str, ChunkTable]:
        """The chunks of ``item``'s arrays that can meet the requested boxes (key -> boxes),
        validated: from a fragmented index only the fragments holding them are read."""
        fragmented = self._index_source()
        if not fragmented:
            index = self.index()[item]
            return {key: index[key] for key in requests}
        return fragmented.tables(item, requests)

    def fragments(self) -> FragmentedIndex | None:
        """The fragmented index (its directory, and the fragments read so far), or None when
        the index is one file."""
        return self._index_source() or None

    @property
    def index_bytes_read(self) -> int:
        """Bytes of chunk index (directory and fragments, or the one file) read so far."""
        f = self._fragmented
        return self._index_bytes + (f.bytes_read if f else 0)

    def _index_source(self) -> Any:
        """Read ``index.msgpack``: a fragment directory becomes a ``FragmentedIndex`` (its
        fragments read on demand); a whole index is loaded at once (returns False)."""
        if self._fragmented is None:
            raw = self.read_meta(self.manifest.index_file, limits.MAX_INDEX_BYTES)
            self._index_bytes = len(raw)
            if is_directory(raw):
                directory = load_directory(raw, self.manifest, self.where)
                self._fragmented = FragmentedIndex(directory, self.manifest, self.where,
                                                   lambda name: self.read_meta(name, limits.MAX_INDEX_BYTES))
            else:
                self._index = load_index(raw, self.manifest, self.where)
                self._fragmented = False
        return self._fragmented
