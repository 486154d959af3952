"""What a user passes (a path, ``~/ckpts``, ``file:///abs``, ``s3://b/run``, ``gs://...``, a
pyarrow filesystem and a path, or a Store) -> the Store that serves it, decided once, here.

Each Store class claims its own URIs (``Store.claims``); nothing else in the package looks
at schemes. ``resolve`` splits a checkpoint's location into (store of its parent directory,
its name), which is how every save and load addresses a checkpoint.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shardckpt.errors import CheckpointError
from shardckpt.store.arrow import ArrowStore
from shardckpt.store.base import Store
from shardckpt.store.local import LocalStore
from shardckpt.store.s3 import S3Store

#: Asked in order; the first that claims a URI serves it (pyarrow takes any other scheme).
STORES: list[type[Store]] = [LocalStore, S3Store, ArrowStore]
#: Stores whose modules import Ray, imported only when a URI of theirs is first used (so a
#: local save, the CLI's ``--help`` and ``import shardckpt`` never pay for Ray's import).
RAY_STORES = {"mem://": ("shardckpt.store.memory", "RayMemoryStore")}


def register_store(cls: type[Store]) -> None:
    """Serve the URIs ``cls.claims`` with ``cls`` (asked before the built-in stores):
    how a store of your own becomes reachable from every path argument."""
    if cls not in STORES:
        STORES.insert(0, cls)


def local_root(path: Any) -> Path:
    """A local path as given (``str``, ``PathLike``, ``file://`` URI, ``~``) made absolute and
    normal (``a/../b`` is ``b``: the name of a checkpoint is never ``..``)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise CheckpointError(f"{text}: a file:// URI names a local path (file:///abs/path), not host "
                                  f"{parts.netloc!r}")
        text = parts.path
    return Path(os.path.abspath(os.path.expanduser(text)))


def is_uri(path: Any) -> bool:
    """A URI served by a store other than the local one (``s3://``, ``gs://``...)."""
    return isinstance(path, str) and not LocalStore.claims(path)


def ray_stores(uri: str) -> list[type[Store]]:
    """The Ray-backed store class that serves ``uri``, imported now ([] for other URIs)."""
    for scheme, (module, name) in RAY_STORES.items():
        if uri.startswith(scheme):
            return [getattr(importlib.import_module(module), name)]
    return []


def open_store(directory: Any, filesystem: Any = None) -> Store:
    """The store rooted at ``directory``: a Store as it is, a local path or ``file://`` URI,
    a URI some store claims, or a path on the pyarrow ``filesystem`` given."""
    if isinstance(directory, Store):
        return directory
    if filesystem is not None:
        return filesystem_store(filesystem, str(directory))
    if isinstance(directory, str) and is_uri(directory):
        for cls in [*STORES[:-1], *ray_stores(directory), STORES[-1]]:
            if cls.claims(directory):
                return cls(directory)
        raise CheckpointError(f"{directory}: no store serves this URI")
    try:
        return LocalStore(local_root(directory))
    except TypeError:
        raise CheckpointError(f"{directory!r:.80} is not a path, a URI or a Store") from None


def filesystem_store(filesystem: Any, directory: str) -> Store:
    """A store for ``directory`` on a pyarrow filesystem: a URI whose host and path are the
    filesystem's path (``arrow://bucket/run``), or the path itself (Ray Train's run storage).
    S3 goes through boto3 with the filesystem's own endpoint and region (``s3.py`` says
    why), a plain path on the local filesystem is a local directory, anything else through
    pyarrow."""
    kind = type(filesystem).__name__
    if "://" in directory:
        parts = urlsplit(directory)
        return ArrowStore(directory, filesystem) if kind != "S3FileSystem" else \
            S3Store.of_arrow_filesystem(filesystem, parts.netloc + parts.path)
    path = directory.rstrip("/")
    if kind == "LocalFileSystem":
        return LocalStore(local_root(path))
    if kind == "S3FileSystem":
        return S3Store.of_arrow_filesystem(filesystem, path)
    return ArrowStore(f"{kind.lower()}://{path}", filesystem)


def resolve(path: Any, filesystem: Any = None) -> tuple[Store, str]:
    """(store of the parent directory, name of the checkpoint in it) for ``path``."""
    if isinstance(path, Store):
        raise CheckpointError(f"{path!r}: name a checkpoint inside the store, not the store itself")
    if filesystem is not None or is_uri(path):
        uri = str(path)
        parts = urlsplit(uri)
        head, _, name = parts.path.rstrip("/").rpartition("/")
        if not name or (filesystem is None and not parts.netloc):
            raise CheckpointError(f"{uri}: name a checkpoint directory inside the bucket, not its root")
        if filesystem is not None:
            return open_store(uri.rstrip("/").rpartition("/")[0], filesystem), name
        parent = f"{parts.scheme}://{parts.netloc}{head}" + (f"?{parts.query}" if parts.query else "")
        return open_store(parent), name
    try:
        p = local_root(path)
    except TypeError:
        raise CheckpointError(f"{path!r:.80} is not a path or a URI") from None
    if not p.name:
        raise CheckpointError(f"{path}: not a checkpoint directory name")
    return LocalStore(p.parent), p.name
