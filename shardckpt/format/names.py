"""Every name rule of the format, in one place.

Names come from users (item names, step prefixes) and from manifests (file names, which are
hostile input); each rule is one regular expression used with ``fullmatch`` (``$`` would
accept a trailing newline), so a name either is plain or is refused, everywhere alike.
"""

from __future__ import annotations

import re
from typing import Any

from shardckpt.errors import CheckpointError, CorruptCheckpointError

#: Item names and step prefixes: they become file and directory names
#: (``{item}-00000-of-00002.npz``, ``{prefix}_{step}``).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
MAX_NAME_CHARS = 100

#: The version prefix under which an object-store checkpoint keeps its files
#: (``step_7/v3f9c2a1b00c4d2e1/model-00000-of-00002.npz``).
VERSION_DIR = re.compile(r"v[0-9a-f]{8,32}")

#: A file named by a manifest: a plain name, optionally under one version prefix.
SAFE_FILE_NAME = re.compile(r"(v[0-9a-f]{8,32}/)?[A-Za-z0-9_@\-][A-Za-z0-9_.@\-]{0,254}")

#: Index fragments (``index-00000.msgpack``), possibly under a version prefix.
FRAGMENT_NAME = re.compile(r"(v[0-9a-f]{8,32}/)?index-[0-9]{5,}\.msgpack")

#: A step number in a directory name: canonical decimal (no sign, no leading zeros).
STEP_NUMBER = r"(0|[1-9][0-9]{0,17})"


def check_name(name: Any, what: str) -> str:
    """A user-given item name or prefix: letters, digits, '_' and '-', starting with a
    letter or digit, at most ``MAX_NAME_CHARS`` characters; else ``CheckpointError``
    naming ``what``."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise CheckpointError(f"{what}: {name!r:.60} is not allowed: use letters, digits, '_' and '-' "
                              f"(starting with a letter or digit, at most {MAX_NAME_CHARS} characters)")
    return name


def check_file_name(name: Any, where: str) -> str:
    """A file named by a manifest must be a plain name in the checkpoint directory."""
    if not isinstance(name, str) or not SAFE_FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise CorruptCheckpointError(f"{where}: file name {name!r:.200} is not a plain file name "
                                     "inside the checkpoint; refusing it")
    return name


def is_version_dir(name: str) -> bool:
    return bool(VERSION_DIR.fullmatch(name))


def fragment_name(k: int) -> str:
    return f"index-{k:05d}.msgpack"


def is_fragment_name(name: str) -> bool:
    """Whether metadata file ``name`` is an index fragment (the committer writes new ones)."""
    return bool(FRAGMENT_NAME.fullmatch(name))


def step_pattern(prefix: str) -> re.Pattern:
    """The directory names of step checkpoints: ``{prefix}_{N}``."""
    return re.compile(rf"{re.escape(prefix)}_{STEP_NUMBER}")
