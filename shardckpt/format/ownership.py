"""Which entries of a checkpoint directory shardckpt wrote, and which are the user's.

Users keep their own files in step directories (``notes.txt``, ``plots/``), sometimes even
inside an object-store checkpoint's version prefix (``step_1/v<txn>/user-notes.txt``).
Nothing of theirs is ever deleted: retention and ``gc`` leave a checkpoint holding such
entries alone, a local re-save carries them into the new directory, and an object store's
retire and leftover cleanup delete only the library's objects. The rule, in one place:

* beside the manifest: the manifest and the files it lists (the first component of each
  name) are ours, nothing else (a version directory is looked into, below);
* inside a version directory: the files the manifest lists, and files named as a save
  names what it stages (``*.npz`` shards, ``*.msgpack`` index, fragments and part reports,
  ``*.json`` metadata, the abort marker): an unreferenced version prefix is an aborted or
  running save of ours, or a replaced version whose removal failed;
* with no readable manifest (a damaged one being replaced): the staged-name rule
  everywhere. A directory is never ours unless it is a version directory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from shardckpt.format.manifest import MANIFEST, Manifest
from shardckpt.format.names import is_version_dir

#: Names a save stages (shards, index, fragments, part reports, metadata files, the abort
#: marker, a pyarrow store's manifest written beside the version's files before its move).
STAGED_NAME = re.compile(r"[A-Za-z0-9_@\-][A-Za-z0-9_.@\-]{0,254}\.(npz|msgpack|json)|_ABORTED|manifest\.json\.pending")

Listing = Iterable[tuple[str, bool]]     # (name, is_dir) of a directory's entries


def staged_by_us(name: str, is_dir: bool = False) -> bool:
    """Whether a file of this name is one a save writes (see module doc)."""
    return not is_dir and bool(STAGED_NAME.fullmatch(name))


def foreign_entries(manifest: Manifest | None, children: Listing,
                    list_version: Callable[[str], Listing]) -> tuple[str, ...]:
    """The user's entries of a checkpoint directory whose own entries are ``children`` and
    whose version directory ``v`` holds ``list_version(v)``; those inside a version
    directory as ``"v<hex>/name"``. ``manifest`` None: it could not be read."""
    listed = set(manifest.files) | set(manifest.meta_files) if manifest is not None else set()
    top = {n.split("/", 1)[0] for n in listed if "/" not in n}
    out = []
    for name, is_dir in children:
        if is_dir and is_version_dir(name):
            out += [f"{name}/{n}" for n, d in list_version(name)
                    if d or (f"{name}/{n}" not in listed and not staged_by_us(n))]
        elif name == MANIFEST and not is_dir:
            continue
        elif manifest is not None:
            if is_dir or name not in top:
                out.append(name)
        elif not staged_by_us(name, is_dir):
            out.append(name)
    return tuple(sorted(out))
