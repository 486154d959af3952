"""Local filesystem primitives for crash-safe commits.

The rules (see docs/format.md): a save writes into a hidden tmp directory next to its final
name, fsyncs every file, writes the manifest last, fsyncs the directory, renames it into
place and fsyncs the parent. Replacing an existing checkpoint swaps the two directories in
one ``renameat2(RENAME_EXCHANGE)`` call, so the old one stays whole until the new one is
visible; where the kernel or filesystem lacks it we move the old one aside first and
recovery (the local store's leftovers plan) puts it back if we crash in between. A delete
renames the checkpoint to a hidden name first (instantly invisible), then removes it.

Every operation that can fail as a disk fails (a write, an fsync, a rename, an exchange, a
removal) is a method of ``Posix`` and passes ``check(point, path)`` first: a no-op here;
``shardckpt.testing.FaultyPosix`` overrides it to fail as a failing disk would. A
``LocalStore`` holds the ``Posix`` it commits through.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import socket
import stat
import uuid
from pathlib import Path

from shardckpt.errors import CheckpointError, CorruptCheckpointError

RENAME_EXCHANGE = 2
AT_FDCWD = -100
HIDDEN_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<host>[^-]+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)")

_UNFINISHED: set[Path] = set()   # hidden directories whose removal failed in this process


def this_host() -> str:
    """This machine's name as hidden leftover names carry it (letters and digits only)."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def raise_named(e: OSError, path: os.PathLike | str):
    """Re-raise ``e`` naming ``path``: ``os.write``/``os.fsync`` errors carry no file name,
    and "No space left on device" alone does not say which file of a save hit it."""
    if e.filename is None and e.errno:
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    raise e


def open_dir_beneath(root: os.PathLike | str, parts: list[str], where: str) -> int:
    """A file descriptor of directory ``root/parts[0]/.../parts[-1]``, opened one component
    at a time: ``root`` and ``parts[0]`` (the checkpoint the caller named) as named, every
    later component with ``O_NOFOLLOW``, so nothing inside a checkpoint (a symlinked
    ``v<hex>/`` version directory) leads out of it (#17.11). FileNotFoundError when a
    component is missing or a file; CorruptCheckpointError when one is a symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for i, part in enumerate(parts):
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if i else 0)
        inside = "/".join(parts[1:i + 1])
        try:
            nxt = os.open(part, flags, dir_fd=fd)
        except NotADirectoryError as e:   # a file, or (O_NOFOLLOW) a symlink
            try:
                link = i and stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
            except OSError:
                link = False
            os.close(fd)
            if link:
                raise CorruptCheckpointError(f"{where}: {inside} is a symlink; refusing to follow it out of "
                                             "the checkpoint") from e
            raise FileNotFoundError(e.errno, e.strerror, os.path.join(os.fspath(root), *parts[:i + 1])) from e
        except FileNotFoundError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            if e.errno == errno.ELOOP:
                raise CorruptCheckpointError(f"{where}: {inside} is a symlink; refusing to follow it out of "
                                             "the checkpoint") from e
            raise CheckpointError(f"{where}: cannot open {'/'.join(parts[:i + 1])}: {e}") from e
        os.close(fd)
        fd = nxt
    return fd


def read_small_file(path: os.PathLike | str, limit: int, where: str, dir_fd: int | None = None) -> bytes:
    """Read a metadata file, refusing symlinks, non-regular files and anything larger than
    ``limit``. Allocates what the file holds, not ``limit`` (2 GiB for the index). With
    ``dir_fd``, ``path`` is relative to that directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)   # a FIFO must not block
    except FileNotFoundError:
        raise
    except NotADirectoryError as e:   # a parent is a file: nothing of ours is there
        raise FileNotFoundError(e.errno, e.strerror, e.filename) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptCheckpointError(f"{where}: {Path(path).name} is a symlink; refusing it") from e
        raise CheckpointError(f"{where}: cannot open {Path(path).name}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(f"{where}: {Path(path).name} is not a regular file; refusing it")
        if st.st_size > limit:
            raise CorruptCheckpointError(f"{where}: {Path(path).name} is {st.st_size} bytes, over the {limit} limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(st.st_size + 1)   # one more: a file that grew shows it
    finally:
        os.close(fd)


def open_data_file(path: os.PathLike | str, where: str, dir_fd: int | None = None) -> tuple[int, int]:
    """Open a shard for reading without following symlinks (nor blocking on a FIFO);
    returns (fd, size). With ``dir_fd``, ``path`` is relative to that directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{where}: shard file {Path(path).name} is missing") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptCheckpointError(f"{where}: shard file {Path(path).name} is a symlink; refusing it") from e
        raise CheckpointError(f"{where}: cannot open {Path(path).name}: {e}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{where}: {Path(path).name} is not a regular file")
    return fd, st.st_size


def hidden_name(final: Path, kind: str) -> Path:
    """``.step_7.tmp-host-pid-rand`` beside ``step_7``: never listed as a checkpoint, and
    the owner's host and pid tell a later start whether the owner is still alive."""
    return final.parent / f".{final.name}.{kind}-{this_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def parse_hidden(name: str) -> dict | None:
    m = HIDDEN_NAME.fullmatch(name)
    return m.groupdict() if m else None


def owner_alive(info: dict) -> bool:
    if info["host"] != this_host():
        return True  # another machine's save: only age can tell (see the leftovers plan)
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(info["pid"]) != 0


_libc = None


def _libc_handle():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


class Posix:
    """The failing operations of a local commit (see module doc)."""

    def check(self, point: str, path: os.PathLike | str) -> None:
        """Called before each operation: ``point`` is "write", "fsync", "rename",
        "exchange", "remove" or "carry" (recreating one of the user's entries in a re-saved
        checkpoint, ``carry.py``); ``path`` the file, or the checkpoint's final name for a
        rename. Production does nothing here."""

    # --- files ---------------------------------------------------------------------------
    def write_all(self, fd: int, data, path: os.PathLike | str) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            self.check("write", path)
            n = os.write(fd, view)
            view = view[n:]

    def fsync_fd(self, fd: int, path: os.PathLike | str) -> None:
        self.check("fsync", path)
        os.fsync(fd)

    def fsync_path(self, path: os.PathLike | str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.fsync_fd(fd, path)
        except OSError as e:
            raise_named(e, path)
        finally:
            os.close(fd)

    def write_file_durable(self, path: os.PathLike | str, data: bytes) -> None:
        """Create ``path`` (must not exist) with ``data`` and fsync it."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.write_all(fd, data, path)
            self.fsync_fd(fd, path)
        except OSError as e:
            raise_named(e, path)
        finally:
            os.close(fd)

    # --- directories ----------------------------------------------------------------------
    def exchange(self, a: Path, b: Path) -> bool:
        """Atomically swap two existing paths; False where the platform cannot."""
        try:
            fn = _libc_handle().renameat2
        except (OSError, AttributeError):
            return False
        try:
            self.check("exchange", b)
        except OSError as e:   # the tests' stand-in for a filesystem without RENAME_EXCHANGE
            err = e.errno
        else:
            res = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
            if res == 0:
                return True
            err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            return False
        raise OSError(err, os.strerror(err), str(b))

    def rename(self, src: Path, dst: Path, final: Path) -> None:
        """``os.rename``; ``final`` is the checkpoint the rename publishes or retires."""
        self.check("rename", final)
        os.rename(src, dst)

    def remove_tree(self, path: Path) -> None:
        self.check("remove", path)
        shutil.rmtree(path, ignore_errors=False)

    def publish_dir(self, tmp: Path, final: Path, after_swap=None) -> None:
        """Make the fully written, fsynced ``tmp`` directory visible as ``final``.

        If ``final`` exists it is replaced without a window in which neither is present
        (``renameat2`` exchange), or with a window that the leftovers plan repairs. The
        commit point is the fsync of the parent after the rename: if anything fails before
        it, ``final`` is left (or put back) as it was and the error raised; ``tmp`` is the
        caller's to remove. A failure to remove the replaced copy after it does not fail the
        save: that copy is hidden and removed later (``finish_deletes``, or the leftover
        cleanup once this process has exited). ``after_swap(old, final)`` runs after the commit
        point, before the replaced copy ``old`` is removed (the local store moves the user's
        late entries over); if it fails, that copy is kept rather than removed.
        """
        self.fsync_path(tmp)
        old = self._swap_in(tmp, final)
        try:
            self.fsync_path(final.parent)
        except OSError as e:
            self._swap_back(tmp, final, old, e)
            raise
        if old is not None:
            if after_swap is not None:
                try:
                    after_swap(old, final)
                except (OSError, CheckpointError):
                    return      # committed; what could not be moved stays in the hidden copy
            self._remove_or_defer(old)

    def _swap_in(self, tmp: Path, final: Path) -> Path | None:
        """Put ``tmp`` in place as ``final``; returns where the checkpoint it replaced is now
        (None if there was none). Another process may publish or delete ``final`` meanwhile
        (saves of one step racing, retention): the last one to publish wins."""
        for _ in range(100):
            if not final.exists():
                try:
                    self.rename(tmp, final, final)
                    return None
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue   # another save of this step was published first: replace it
                    raise
            try:
                if self.exchange(tmp, final):
                    return tmp     # tmp now holds the replaced checkpoint
            except FileNotFoundError:
                continue           # deleted meanwhile: publish by a plain rename
            old = hidden_name(final, "old")
            try:
                os.rename(final, old)
            except FileNotFoundError:
                continue
            try:
                self.rename(tmp, final, final)
            except OSError:
                os.rename(old, final)   # put the old one back (recovery does it if we die here)
                raise
            return old
        raise OSError(errno.EBUSY, "kept being replaced by other saves while publishing", str(final))

    def _swap_back(self, tmp: Path, final: Path, old: Path | None, cause: OSError) -> None:
        """Undo ``_swap_in`` after the commit's directory fsync failed, so that the failed save
        leaves ``final`` as it was; raises if even that fails (the new checkpoint then stays
        visible, its durability unknown)."""
        try:
            if old is None:
                os.rename(final, tmp)
            elif old == tmp:
                if not self.exchange(tmp, final):
                    raise OSError(errno.ENOTSUP, "cannot exchange back", str(final))
            else:
                os.rename(final, tmp)
                os.rename(old, final)
        except OSError as e:
            raise CheckpointError(f"{final} is visible, but syncing {final.parent} failed ({cause}) and "
                                  f"undoing the rename failed ({e}): it may not survive a power loss") from cause
        try:
            self.fsync_path(final.parent)
        except OSError:
            pass   # the state in memory is right again; the original error is raised

    def _remove_or_defer(self, path: Path) -> None:
        try:
            self.remove_tree(path)
        except OSError:
            _UNFINISHED.add(path)

    def finish_deletes(self, directory: Path) -> None:
        """Remove the hidden directories in ``directory`` that this process failed to remove
        earlier (a replaced copy after a commit, a retired checkpoint); they are never listed,
        and once this process has exited any manager's leftover cleanup removes them too."""
        for path in [p for p in _UNFINISHED if p.parent == Path(directory)]:
            try:
                self.remove_tree(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            _UNFINISHED.discard(path)

    def retire_dir(self, path: Path) -> None:
        """Delete a checkpoint crash-safely: rename it out of sight, fsync, then remove.

        Raises FileNotFoundError if it is gone already, ``CheckpointError`` naming it if the
        delete fails (the checkpoint is then either kept whole or hidden for good)."""
        hidden = hidden_name(path, "del")
        try:
            self.rename(path, hidden, path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise CheckpointError(f"could not delete checkpoint {path}: {e}; it is kept as it was") from e
        try:
            self.fsync_path(path.parent)
            self.remove_tree(hidden)
        except OSError as e:
            _UNFINISHED.add(hidden)
            raise CheckpointError(f"deleting checkpoint {path} failed: {e}; it is no longer listed, and its "
                                  f"hidden remains ({hidden.name}) are removed by the next cleanup") from e


#: What every local store commits through unless given another.
POSIX = Posix()
