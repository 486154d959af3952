"""Local filesystem primitives for crash-safe commits.

The rules (see docs/format.md): a save writes into a hidden tmp directory next to its final
name, fsyncs every file, writes the manifest last, fsyncs the directory, renames it into
place and fsyncs the parent. Replacing an existing checkpoint swaps the two directories in
one ``renameat2(RENAME_EXCHANGE)`` call, so the old one stays whole until the new one is
visible; where the kernel or filesystem lacks it we move the old one aside first and
recovery (``recover_replacements``) puts it back if we crash in between. A delete renames
the checkpoint to a hidden name first (instantly invisible), then removes it.
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

from .errors import CheckpointError, CorruptCheckpointError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<host>[^-]+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")


def _libc_handle():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def fsync_path(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durable(path: os.PathLike | str, data: bytes) -> None:
    """Create ``path`` (must not exist) with ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_small_file(path: os.PathLike | str, limit: int, where: str) -> bytes:
    """Read a metadata file, refusing symlinks and anything larger than ``limit``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise CorruptCheckpointError(f"{where}: {Path(path).name} is not a regular file; refusing it")
    if st.st_size > limit:
        raise CorruptCheckpointError(f"{where}: {Path(path).name} is {st.st_size} bytes, over the {limit} limit")
    with open(path, "rb") as f:
        return f.read(limit + 1)[:limit + 1]


def open_data_file(path: os.PathLike | str, where: str) -> tuple[int, int]:
    """Open a shard for reading without following symlinks; returns (fd, size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return final.parent / f".{final.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def parse_hidden(name: str):
    m = _HIDDEN.match(name)
    return m.groupdict() if m else None


def owner_alive(info: dict) -> bool:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    if info["host"] != host:
        return True  # another machine's save: only age can tell (see manager)
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(info["pid"]) != 0


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the platform cannot."""
    try:
        libc = _libc_handle()
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    res = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the fully written, fsynced ``tmp`` directory visible as ``final``.

    If ``final`` exists it is replaced without a window in which neither is present
    (``renameat2`` exchange), or with a window that ``recover_replacements`` repairs.
    """
    fsync_path(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif exchange(tmp, final):
        remove_tree(tmp)  # now holds the old checkpoint
    else:
        old = hidden_name(final, "old")
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(final.parent)
        remove_tree(old)
    fsync_path(final.parent)


def retire_dir(path: Path) -> None:
    """Delete a checkpoint crash-safely: rename it out of sight, fsync, then remove."""
    hidden = hidden_name(path, "del")
    os.rename(path, hidden)
    fsync_path(path.parent)
    remove_tree(hidden)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=False)


def recover_replacements(directory: Path) -> None:
    """Undo a replacement interrupted between its two renames (fallback path only): an
    ``.old`` directory whose final name is gone is moved back. One whose final name is back
    in place (the replacement died after its second rename) is obsolete and removed."""
    for entry in os.scandir(directory):
        info = parse_hidden(entry.name)
        if info and info["kind"] == "old" and not owner_alive(info):
            final = directory / info["name"]
            if not final.exists():
                os.rename(entry.path, final)
                fsync_path(directory)
            else:
                remove_tree(Path(entry.path))
