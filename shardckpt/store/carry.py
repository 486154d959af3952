"""A local re-save keeps the user's entries of the checkpoint it replaces (#17.2).

A local save publishes a new directory in place of the old one and removes the old one. The
user's own entries in it (``notes.txt``, ``plots/``: anything ``format/ownership.py`` does
not call ours) must survive, as they survive retention and ``gc``. So before the new
directory is published they are recreated in it: directories as new directories (same mode
and times), everything else as a hard link to the same inode (a symlink as the link itself,
never followed; where links are refused, a regular file is copied and a symlink recreated).
Until the publish the old checkpoint is untouched, so a save failing at any point (the
carry included) leaves it whole, and a crash leaves either the old directory or the new one
with every entry. Entries the user adds while the save publishes are moved over from the
replaced copy before it is removed (``move_missing``).

Every directory is opened relative to its parent's descriptor without following symlinks
(``os.fwalk``), so nothing outside the checkpoint is ever linked in. Each step passes
``posix.check("carry", path)`` first (``shardckpt.testing.FaultPlan`` fails it on purpose).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from shardckpt.errors import CheckpointError
from shardckpt.store.posix import Posix, open_dir_beneath


def carry_into(posix: Posix, src: Path, names: list[str], dst: Path) -> None:
    """Recreate the entries ``names`` of directory ``src`` (``"v<hex>/name"`` for one inside
    a version directory) in ``dst``. Refuses (CheckpointError, nothing linked) when ``dst``
    already has an entry of that name: the new save writes a file the user owns."""
    clashes = [n for n in names if os.path.lexists(dst / n)]
    if clashes:
        raise CheckpointError(f"{src}: {', '.join(clashes[:5])} are not shardckpt's (not in the manifest) and this "
                              "save writes entries of the same name; move them away and save again (nothing was "
                              "saved, the checkpoint is as it was)")
    made: list[tuple[Path, os.stat_result | None]] = []
    for name in names:
        parent, _, base = name.rpartition("/")
        out = dst / parent if parent else dst
        if parent and not out.is_dir():
            posix.check("carry", out)
            os.mkdir(out, 0o755)
            made.append((out, None))
        pfd = open_dir_beneath(src.parent, [src.name, *(parent.split("/") if parent else [])], str(src))
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                made += _copy_dir(posix, pfd, base, out / base, st)
            else:
                _link(posix, pfd, base, out / base, st)
        finally:
            os.close(pfd)
    for path, st in reversed(made):      # children before parents: their entries are durable
        posix.fsync_path(path)
        if st is not None:
            os.chmod(path, stat.S_IMODE(st.st_mode))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_dir(posix: Posix, pfd: int, base: str, out: Path, st: os.stat_result) -> list:
    """``base`` (a directory under ``pfd``) recreated as ``out``; returns the directories made."""
    def fail(e: OSError) -> None:
        raise CheckpointError(f"cannot carry {e.filename or base} into the re-saved checkpoint ({e.strerror}); "
                              "nothing was saved, the checkpoint is as it was") from e
    posix.check("carry", out)
    os.mkdir(out, 0o700)
    made = [(out, st)]
    try:
        for dirpath, dirnames, filenames, dfd in os.fwalk(base, dir_fd=pfd, follow_symlinks=False, onerror=fail):
            here = out / os.path.relpath(dirpath, base)
            for d in dirnames:
                posix.check("carry", here / d)
                os.mkdir(here / d, 0o700)
                made.append((here / d, os.stat(d, dir_fd=dfd, follow_symlinks=False)))
            for f in filenames:
                _link(posix, dfd, f, here / f, None)
    except RecursionError as e:
        raise CheckpointError(f"cannot carry {base} into the re-saved checkpoint: nested too deeply; nothing was "
                              "saved, the checkpoint is as it was") from e
    return made


def _link(posix: Posix, sfd: int, name: str, dst: Path, st: os.stat_result | None) -> None:
    """A hard link ``dst`` to entry ``name`` of ``sfd`` (a symlink itself, never its target);
    where links are refused, a copy of a regular file or a new symlink."""
    posix.check("carry", dst)
    try:
        os.link(name, dst, src_dir_fd=sfd, follow_symlinks=False)
        return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise
    st = st or os.stat(name, dir_fd=sfd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=sfd), dst)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=sfd)
        with os.fdopen(fd, "rb") as f, open(dst, "xb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            posix.fsync_fd(out.fileno(), dst)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    else:
        raise CheckpointError(f"cannot carry {name} (not a file, link or directory) into the re-saved checkpoint "
                              "on this filesystem; nothing was saved, the checkpoint is as it was")


def move_missing(posix: Posix, old: Path, new: Path, names: list[str]) -> None:
    """After a publish: move the entries ``names`` of the replaced copy ``old`` that the new
    checkpoint ``new`` lacks (made while the save published), and inside directories both
    have, their missing entries, so removing ``old`` removes only what was carried."""
    stack = list(names)
    while stack:
        name = stack.pop()
        src, dst = old / name, new / name
        try:
            s_st = os.lstat(src)
        except FileNotFoundError:
            continue
        if not os.path.lexists(dst):
            if dst.parent.is_dir() and not dst.parent.is_symlink():
                posix.check("carry", dst)
                os.rename(src, dst)
                posix.fsync_path(dst.parent)
            continue
        d_st = os.lstat(dst)
        if stat.S_ISDIR(s_st.st_mode) and stat.S_ISDIR(d_st.st_mode):
            stack += [f"{name}/{child}" for child in os.listdir(src)]
