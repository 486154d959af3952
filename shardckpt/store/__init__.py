"""Stores: where checkpoint bytes live (see base.py). ``resolve`` turns what a user passes
(a path, ``s3://...``, another URI) into (store of the parent directory, checkpoint name)
once, so no caller sniffs strings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import CheckpointError
from .base import Entry, Sink, Source, Staging, Store, Written
from .local import LocalStore

__all__ = ["Entry", "Sink", "Source", "Staging", "Store", "Written", "LocalStore", "open_store",
           "resolve", "is_uri"]


def is_uri(path: Any) -> bool:
    """A URI with a scheme other than ``file`` (``s3://``, ``gs://``...)."""
    return isinstance(path, str) and "://" in path and urlsplit(path).scheme not in ("", "file")


def open_store(directory: Any, filesystem: Any = None) -> Store:
    """The store rooted at ``directory`` (a path, a URI, or a Store)."""
    if isinstance(directory, Store):
        return directory
    if filesystem is not None or is_uri(directory):
        uri = str(directory)
        if filesystem is None and urlsplit(uri).scheme in ("s3", "s3a"):
            from .object import S3Store
            return S3Store(uri)
        from .object import ArrowStore
        return ArrowStore(uri, filesystem)
    if isinstance(directory, str) and directory.startswith("file://"):
        directory = directory[len("file://"):]
    return LocalStore(Path(os.fspath(directory)))


def resolve(path: Any, filesystem: Any = None) -> tuple[Store, str]:
    """(store of the parent directory, name of the checkpoint in it) for ``path``."""
    if is_uri(path) or filesystem is not None:
        uri = str(path)
        parts = urlsplit(uri)
        head, _, name = parts.path.rstrip("/").rpartition("/")
        if not name:
            raise CheckpointError(f"{uri}: name a checkpoint directory inside the bucket, not its root")
        parent = f"{parts.scheme}://{parts.netloc}{head}" + (f"?{parts.query}" if parts.query else "")
        return open_store(parent, filesystem), name
    p = Path(os.fspath(path)).absolute()
    if not p.name:
        raise CheckpointError(f"{path}: not a checkpoint directory name")
    return LocalStore(p.parent), p.name
