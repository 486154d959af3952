"""Local filesystem primitives for crash-safe commits.

The rules (see docs/format.md): a save writes into a hidden tmp directory next to its final
name, fsyncs every file, writes the manifest last, fsyncs the directory, renames it into
place and fsyncs the parent. Replacing an existing checkpoint swaps the two directories in
one ``renameat2(RENAME_EXCHANGE)`` call, so the old one stays whole until the new one is
visible; where the kernel or filesystem lacks it we move the old one aside first and
recovery (the Catalog's leftovers plan, ``catalog.py``) puts it back if we crash in between. A delete renames
the checkpoint to a hidden name first (instantly invisible), then removes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import os
import re
import shutil
import socket
import stat
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, CorruptCheckpointError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<host>[^-]+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")


# --- fault injection seam (tests only; disabled by default) --------------------------------

@dataclass
class Fault:
    """One injected failure: the ``after``+1-th to ``after``+``times``-th calls of ``point``
    on a path whose name matches ``match`` (fnmatch) fail with ``OSError(errno)``.

    Points: ``"write"`` (a data write into a shard or metadata file), ``"fsync"`` (of a file
    or a directory), ``"rename"`` (publishing or retiring a checkpoint directory; the name
    matched is the checkpoint's final name) and ``"remove"`` (deleting a directory tree).
    """

    point: str
    match: str = "*"
    errno: int = errno.EIO
    after: int = 0
    times: int = 1


class FaultPlan:
    """Makes named storage operations fail as a failing disk would (ENOSPC, EIO, a failed
    fsync), for the I/O-fault tests. Only one plan is active at a time::

        with FaultPlan(Fault("fsync", "manifest.json")) as plan:
            ...                      # the manifest's fsync raises EIO
        assert plan.fired

    When no plan is active (always, outside tests) each seam costs one global lookup.
    """

    def __init__(self, *faults: Fault):
        self.faults = list(faults)
        self.seen: dict[int, int] = {}
        self.fired: list[tuple[str, str, int]] = []   # (point, path, errno) of each injected failure
        self.calls: list[tuple[str, str]] = []        # every (point, path) consulted
        self._lock = threading.Lock()

    def check(self, point: str, path) -> None:
        name = os.path.basename(os.fspath(path))
        with self._lock:
            self.calls.append((point, os.fspath(path)))
            for i, f in enumerate(self.faults):
                if f.point != point or not fnmatch.fnmatchcase(name, f.match):
                    continue
                n = self.seen.get(i, 0)
                self.seen[i] = n + 1
                if f.after <= n < f.after + f.times:
                    self.fired.append((point, os.fspath(path), f.errno))
                    raise OSError(f.errno, f"{os.strerror(f.errno)} (injected at {point})", os.fspath(path))

    def __enter__(self) -> "FaultPlan":
        global FAULTS
        if FAULTS is not None:
            raise RuntimeError("another FaultPlan is active")
        FAULTS = self
        return self

    def __exit__(self, *exc) -> None:
        global FAULTS
        FAULTS = None


FAULTS: FaultPlan | None = None


def inject(point: str, path) -> None:
    """The seam: raise the active plan's fault for ``point`` on ``path``, if any."""
    if FAULTS is not None:
        FAULTS.check(point, path)


def _libc_handle():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def fsync_path(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        inject("fsync", path)
        os.fsync(fd)
    except OSError as e:
        raise_named(e, path)
    finally:
        os.close(fd)


def write_file_durable(path: os.PathLike | str, data: bytes) -> None:
    """Create ``path`` (must not exist) with ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            inject("write", path)
            n = os.write(fd, view)
            view = view[n:]
        inject("fsync", path)
        os.fsync(fd)
    except OSError as e:
        raise_named(e, path)
    finally:
        os.close(fd)


def raise_named(e: OSError, path: os.PathLike | str):
    """Re-raise ``e`` naming ``path``: ``os.write``/``os.fsync`` errors carry no file name,
    and "No space left on device" alone does not say which file of a save hit it."""
    if e.filename is None and e.errno:
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    raise e


def read_small_file(path: os.PathLike | str, limit: int, where: str) -> bytes:
    """Read a metadata file, refusing symlinks, non-regular files and anything larger than
    ``limit``. Allocates what the file holds, not ``limit`` (2 GiB for the index)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)   # a FIFO must not block
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
    try:
        inject("exchange", b)
    except OSError as e:   # the tests' stand-in for a filesystem without RENAME_EXCHANGE
        err = e.errno
    else:
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
    (``renameat2`` exchange), or with a window that the Catalog's leftovers plan repairs.
    The commit point is the fsync of the parent after the rename: if anything fails before
    it, ``final`` is left (or put back) as it was and the error raised; ``tmp`` is the
    caller's to remove. A failure to remove the replaced copy after it does not fail the
    save: that copy is hidden and removed later (``finish_deletes``, or the leftover
    cleanup once this process has exited).
    """
    fsync_path(tmp)
    old = _swap_in(tmp, final)
    try:
        fsync_path(final.parent)
    except OSError as e:
        _swap_back(tmp, final, old, e)
        raise
    if old is not None:
        _remove_or_defer(old)


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Put ``tmp`` in place as ``final``; returns where the checkpoint it replaced is now
    (None if there was none). Another process may publish or delete ``final`` meanwhile
    (saves of one step racing, retention): the last one to publish wins."""
    for _ in range(100):
        if not final.exists():
            try:
                inject("rename", final)
                os.rename(tmp, final)
                return None
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue   # another save of this step was published first: replace it
                raise
        try:
            if exchange(tmp, final):
                return tmp     # tmp now holds the replaced checkpoint
        except FileNotFoundError:
            continue           # deleted meanwhile: publish by a plain rename
        old = hidden_name(final, "old")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            continue
        try:
            inject("rename", final)
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)   # put the old one back (recovery does it if we die here)
            raise
        return old
    raise OSError(errno.EBUSY, "kept being replaced by other saves while publishing", str(final))


def _swap_back(tmp: Path, final: Path, old: Path | None, cause: OSError) -> None:
    """Undo ``_swap_in`` after the commit's directory fsync failed, so that the failed save
    leaves ``final`` as it was; raises if even that fails (the new checkpoint then stays
    visible, its durability unknown)."""
    try:
        if old is None:
            os.rename(final, tmp)
        elif old == tmp:
            if not exchange(tmp, final):
                raise OSError(errno.ENOTSUP, "cannot exchange back", str(final))
        else:
            os.rename(final, tmp)
            os.rename(old, final)
    except OSError as e:
        raise CheckpointError(f"{final} is visible, but syncing {final.parent} failed ({cause}) and "
                              f"undoing the rename failed ({e}): it may not survive a power loss") from cause
    try:
        fsync_path(final.parent)
    except OSError:
        pass   # the state in memory is right again; the original error is raised


_UNFINISHED: set[Path] = set()   # hidden directories whose removal failed in this process


def _remove_or_defer(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError:
        _UNFINISHED.add(path)


def finish_deletes(directory: Path) -> None:
    """Remove the hidden directories in ``directory`` that this process failed to remove
    earlier (a replaced copy after a commit, a retired checkpoint); they are never listed,
    and once this process has exited any manager's leftover cleanup removes them too."""
    for path in [p for p in _UNFINISHED if p.parent == Path(directory)]:
        try:
            remove_tree(path)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        _UNFINISHED.discard(path)


def retire_dir(path: Path) -> None:
    """Delete a checkpoint crash-safely: rename it out of sight, fsync, then remove.

    Raises FileNotFoundError if it is gone already, ``CheckpointError`` naming it if the
    delete fails (the checkpoint is then either kept whole or hidden for good)."""
    hidden = hidden_name(path, "del")
    try:
        inject("rename", path)
        os.rename(path, hidden)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"could not delete checkpoint {path}: {e}; it is kept as it was") from e
    try:
        fsync_path(path.parent)
        remove_tree(hidden)
    except OSError as e:
        _UNFINISHED.add(hidden)
        raise CheckpointError(f"deleting checkpoint {path} failed: {e}; it is no longer listed, and its "
                              f"hidden remains ({hidden.name}) are removed by the next cleanup") from e


def remove_tree(path: Path) -> None:
    inject("remove", path)
    shutil.rmtree(path, ignore_errors=False)
