"""Any pyarrow filesystem (``gs://``, ``hdfs://``, fsspec wrapped in
``pyarrow.fs.PyFileSystem``, or a ``pyarrow.fs`` object given with the path): the layout and
commit rule of ``versioned.py``, with pyarrow's own buffered output streams (which upload in
parts on object stores).

pyarrow filesystems have no conditional write, and overwriting a file in place can leave it
torn (a full disk half-way): the new manifest is written whole beside the version's files
first, then moved over the old one. ``move`` is a rename on local and HDFS filesystems and a
server-side copy on object stores; either way a reader sees the old manifest or the new one,
never a part of either.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlsplit

import xxhash

from shardckpt.errors import CheckpointError, CorruptCheckpointError
from shardckpt.format.manifest import MANIFEST
from shardckpt.format.names import is_version_dir
from shardckpt.store.base import Entry, Sink, Source, T, Written, count_read
from shardckpt.store.versioned import VersionedStaging, VersionedStore

PENDING_MANIFEST = "manifest.json.pending"


def arrow_fs(uri: str):
    """``pyarrow.fs``, or our error saying which extra installs it (every method that
    needs it asks here: the first call on a ``gs://`` store may be any of them)."""
    try:
        import pyarrow.fs as pafs
    except ImportError as e:
        raise CheckpointError(f"{uri}: this scheme needs pyarrow: pip install 'shardckpt[fs]'") from e
    return pafs


class ArrowStore(VersionedStore):
    """Any pyarrow filesystem (``gs://``, ``hdfs://``, fsspec wrapped in
    ``pyarrow.fs.PyFileSystem``): the same layout and commit rule as S3, with pyarrow's own
    buffered output streams (which upload in parts on object stores)."""

    def __init__(self, uri: str, filesystem: Any = None):
        self.uri = uri.rstrip("/")
        self._filesystem = filesystem
        self._fs = None
        self.deadline: float | None = None

    @classmethod
    def claims(cls, uri: str) -> bool:
        return "://" in uri and not uri.startswith("file://")   # pyarrow resolves the scheme (or refuses it)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._filesystem is None:
            state["_fs"] = None
        return state

    @property
    def fs(self):
        if self._fs is None:
            pafs = arrow_fs(self.uri)
            parts = urlsplit(self.uri)
            if self._filesystem is not None:
                self._fs, self._root = self._filesystem, (parts.netloc + parts.path)
            else:
                try:
                    self._fs, self._root = pafs.FileSystem.from_uri(self.uri)
                except Exception as e:  # noqa: BLE001 - pyarrow raises several types
                    raise CheckpointError(f"{self.uri}: cannot open this filesystem ({e})") from e
            self._root = self._root.rstrip("/")
        return self._fs

    def fs_path(self, name: str) -> str:
        _ = self.fs
        return f"{self._root}/{name}" if name else self._root

    def size(self, name: str) -> int | None:
        pafs = arrow_fs(self.uri)
        info = self.fs.get_file_info(self.fs_path(name))
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, name: str, limit: int) -> bytes:
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self.where(name))
        if size > limit:
            raise CorruptCheckpointError(f"{self.where(name)} is {size} bytes, over the {limit} limit")
        with self.fs.open_input_file(self.fs_path(name)) as f:
            return f.read()

    def open(self, name: str) -> Source:
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self.where(name))
        return ArrowSource(self, name, size)

    def list(self, prefix: str = "") -> list[Entry]:
        pafs = arrow_fs(self.uri)
        infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path(prefix), allow_not_found=True))
        return [Entry(i.base_name, i.type == pafs.FileType.Directory, i.size or 0,
                      i.mtime.timestamp() if i.mtime else 0.0) for i in infos]

    def put(self, name: str, data: bytes) -> None:
        path = self.fs_path(name)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def copy(self, src: str, dst: str) -> None:
        if self.size(src) is None:
            raise FileNotFoundError(self.where(src))
        path = self.fs_path(dst)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.fs.copy_file(self.fs_path(src), path)

    def delete(self, names: list[str]) -> None:
        for n in names:
            try:
                self.fs.delete_file(self.fs_path(n))
            except FileNotFoundError:
                pass

    def stage(self, final: str, txn: str, owner: tuple[str, int] | None = None) -> "ArrowStaging":
        return ArrowStaging(self, final, txn)

    def drop_empty(self, name: str) -> None:
        pafs = arrow_fs(self.uri)
        try:
            left = self.fs.get_file_info(pafs.FileSelector(self.fs_path(name), recursive=True, allow_not_found=True))
            base = self.fs_path(name).rstrip("/") + "/"
            if all(i.type == pafs.FileType.Directory and is_version_dir(i.path[len(base):]) for i in left):
                self.fs.delete_dir(self.fs_path(name))
        except Exception:  # noqa: BLE001 - best effort
            pass


class ArrowSource(Source):
    def __init__(self, store: ArrowStore, name: str, size: int):
        self.store, self.path, self.size = store, name, size
        self.name = name.rsplit("/", 1)[-1]
        self.f = store.fs.open_input_file(store.fs_path(name))

    def readinto(self, offset: int, view: memoryview) -> None:
        got = self.f.read_at(len(view), offset)
        if len(got) != len(view):
            raise CorruptCheckpointError(f"{self.name} is truncated at byte {offset + len(got)}")
        view[:] = memoryview(got)
        count_read(len(view))

    def close(self) -> None:
        self.f.close()


class ArrowSink(Sink):
    def __init__(self, out):
        self.out, self.pos, self.hasher = out, 0, xxhash.xxh3_64()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.out.write(view)
        self.pos += len(view)


class ArrowStaging(VersionedStaging):
    """A version prefix inside the step directory, published by moving a fully written
    manifest over the old one (the committer's re-check guards carry-overs: there is no
    conditional write here)."""

    store: ArrowStore

    def switch_manifest(self, manifest: bytes, expect=None) -> bytes | None:
        final = f"{self.final}/{MANIFEST}"
        try:
            previous = self.store.read_bytes(final, self.manifest_limit())
        except (FileNotFoundError, CheckpointError):
            previous = None
        pending = self.staged_path(PENDING_MANIFEST)
        try:
            self.store.put(pending, manifest)                   # whole, or an error and nothing
            self.store.fs.move(self.store.fs_path(pending), self.store.fs_path(final))   # the commit
        except BaseException:
            self.store.delete([pending])
            raise
        return previous

    def write_stream(self, name: str, fill: Callable[[Sink], T]) -> tuple[T, Written]:
        path = self.store.fs_path(self.staged_path(name))
        self.store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        try:
            with self.store.fs.open_output_stream(path) as out:
                sink = ArrowSink(out)
                result = fill(sink)
        except BaseException:
            try:                     # nothing of the file remains (the version is discarded anyway)
                self.store.fs.delete_file(path)
            except Exception:  # noqa: BLE001
                pass
            raise
        return result, Written(self.stored_name(name), sink.pos, sink.hasher.hexdigest())
