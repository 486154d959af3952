"""Read-only support for the guide's original single-file layout.

That layout is ``model.npz`` / ``optimizer.npz`` (dotted keys, often compressed),
``config.json``, ``metrics.json``, ``extra.json`` and ``optimizer_meta.pkl``. We read the
arrays with ``np.load(allow_pickle=False)``. The pickle file is never unpickled: the
optimizer is restored by key path from ``optimizer.npz``, and while a pickle is present
loading the optimizer is refused unless the caller passes ``allow_pickle=True`` (a
stranger's pickle runs code on load; the flag says the caller trusts the directory). Such
checkpoints carry no checksums and lose bfloat16 (stored as raw ``V2``): the restore
target's dtype gives the bits their meaning back.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .reader import MAX_JSON_BYTES, Checkpoint
from .errors import CheckpointError, CorruptCheckpointError
from .format import MAX_DEFLATE_RATIO, ItemRecord
from .storage import read_small_file
from .tree import ArraySpec

LEGACY_FILES = {"model": "model.npz", "optimizer": "optimizer.npz"}
# what zipfile and np.load raise on a damaged archive
_ZIP_ERRORS = (zipfile.BadZipFile, ValueError, OSError, zlib.error, EOFError, NotImplementedError,
               RuntimeError, struct.error, OverflowError, KeyError, IndexError)
PICKLE_META = "optimizer_meta.pkl"


def is_legacy_dir(path: Path) -> bool:
    return (path / "model.npz").is_file() or (path / "optimizer.npz").is_file()


def normalize_key(key: str) -> str:
    """Legacy writers used '/' or '.' and sometimes a trailing '.value'."""
    key = key.replace("/", ".")
    for suffix in (".value", ".raw_value"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key


class LegacyCheckpoint(Checkpoint):
    legacy = True

    def __init__(self, path, *, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle
        super().__init__(path)

    def _open(self) -> None:
        self._records: dict[str, ItemRecord] = {}
        self._members: dict[str, dict[str, str]] = {}
        for item, fname in LEGACY_FILES.items():
            f = self.path / fname
            if f.is_file():
                self._records[item], self._members[item] = self._scan(f)
        cfg = self.read_config()
        self._step = cfg.get("step") if isinstance(cfg.get("step"), int) else None
        self._metrics = self.read_json("metrics.json", {}) or {}

    def _scan(self, f: Path) -> tuple[ItemRecord, dict[str, str]]:
        """Array headers only: shapes and dtypes without reading any data."""
        rec, members = ItemRecord(), {}
        try:
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with zf.open(info) as m:
                        version = np.lib.format.read_magic(m)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read(m, max_header_size=65536)
                        header_len = m.tell()
                    if dtype.hasobject:
                        raise CorruptCheckpointError(f"{f}: member {info.filename} holds Python objects; refusing it")
                    # np.load allocates what the header declares: it must be what the member
                    # holds, and a deflated member cannot hold more than deflate's ratio allows.
                    declared = math.prod(shape) * dtype.itemsize
                    if (declared + header_len != info.file_size
                            or info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 65536):
                        raise CorruptCheckpointError(
                            f"{f}: member {info.filename} declares {shape} {dtype} ({declared} bytes) but holds "
                            f"{info.file_size - header_len} bytes ({info.compress_size} stored)")
                    key = normalize_key(info.filename[:-4])
                    rec.arrays[key] = ArraySpec(dtype=dtype.str if dtype.kind == "V" else dtype.name,
                                                shape=tuple(shape), stored_dtype=dtype.str if dtype.kind == "V" else dtype.name,
                                                stored_shape=tuple(shape))
                    members[key] = info.filename[:-4]
        except CorruptCheckpointError:
            raise
        except _ZIP_ERRORS as e:
            raise CorruptCheckpointError(f"{f}: not a readable .npz file ({type(e).__name__}: {e})") from e
        return rec, members

    @property
    def step(self):
        return self._step

    @property
    def items(self) -> list[str]:
        return list(self._records)

    @property
    def metrics(self) -> dict:
        return self._metrics if isinstance(self._metrics, dict) else {}

    def item_record(self, item: str) -> ItemRecord:
        if item == "optimizer" and (self.path / PICKLE_META).exists():
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{self.path / PICKLE_META}: this legacy checkpoint keeps optimizer metadata "
                    "as a pickle, which can run code when loaded; it is refused by default. Pass "
                    "allow_pickle=True only if you trust whoever wrote it.")
        if item not in self._records:
            from .errors import StructureMismatchError
            raise StructureMismatchError(f"{self.where}: legacy checkpoint has no {item!r}")
        return self._records[item]

    def read_json(self, name: str, default: Any = None) -> Any:
        f = self.path / name
        if not f.exists():
            return default
        raw = read_small_file(f, MAX_JSON_BYTES, self.where)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{f}: not valid JSON ({e})") from e

    def index(self):
        raise CheckpointError(f"{self.where}: legacy checkpoints have no chunk index")

    def _read_arrays(self, item, specs, verify, executor, progress) -> dict[str, np.ndarray]:
        out = {}
        f = self.path / LEGACY_FILES[item]
        try:
            with np.load(f, allow_pickle=False) as npz:
                for key, spec in specs.items():
                    arr = npz[self._members[item][key]]
                    if not arr.dtype.isnative:  # a big-endian writer: values, not raw bytes
                        arr = arr.astype(arr.dtype.newbyteorder("="))
                    if tuple(arr.shape) != spec.shape:
                        raise CorruptCheckpointError(f"{f}: {key!r} changed shape while reading")
                    out[key] = arr
        except CorruptCheckpointError:
            raise
        except _ZIP_ERRORS as e:
            raise CorruptCheckpointError(f"{f}: cannot read ({type(e).__name__}: {e})") from e
        return out

    def _read_boxes(self, item, specs, requests, verify, executor, progress):
        """Legacy files have no chunk index: read whole arrays, then cut the boxes."""
        full = self._read_arrays(item, specs, verify, executor, progress)
        # np.require, not np.ascontiguousarray: the latter turns a 0-d array (an optimizer's
        # step) into shape (1,).
        return {k: {box: np.require(full[k][tuple(slice(o, o + n) for o, n in zip(*box))], requirements="C")
                    for box in requests[k]} for k in specs}
