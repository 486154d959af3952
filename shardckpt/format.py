"""The on-disk format, version 1: manifest schema, chunk index, and validation.

``manifest.json`` is the commit record (written last; no manifest, no checkpoint). It keeps
what a human reads: items, arrays with real dtypes and shapes, scalar leaves, files with
sizes and checksums, metrics. The bulk chunk table (up to ~10^6 rows for a 70B model on 512
devices) lives in ``index.msgpack``, referenced and checksummed by the manifest.

Everything read here is treated as hostile: sizes are capped before parsing, names must be
plain file names inside the checkpoint, shapes and byte counts are checked against each
other and against the files before any array is allocated, and no pickle is ever involved.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import CorruptCheckpointError
from .shard_io import ChunkRecord
from .tree import ArraySpec, decode_scalar, real_dtype, storage_dtype

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.msgpack"
MAX_MANIFEST_BYTES = 256 << 20
MAX_INDEX_BYTES = 2 << 30
MAX_ELEMENTS = 1 << 50
MAX_NDIM = 64
MAX_DEFLATE_RATIO = 1032        # deflate cannot inflate more than this per input byte
# A plain name; remote checkpoints may prefix one version directory (see remote.py).
_SAFE_NAME = re.compile(r"^(v[0-9a-f]{8,32}/)?[A-Za-z0-9_@\-][A-Za-z0-9_.@\-]{0,254}$")


def check_file_name(name: Any, where: str) -> str:
    """A file named by a manifest must be a plain name in the checkpoint directory."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise CorruptCheckpointError(f"{where}: file name {name!r:.200} is not a plain file name "
                                     "inside the checkpoint; refusing it")
    return name


def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptCheckpointError(f"{what}: expected an integer in [{lo}, {hi}], got {v!r:.100}")
    return v


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_NDIM:
        raise CorruptCheckpointError(f"{what}: malformed shape {v!r:.200}")
    shape = tuple(_int(d, what) for d in v)
    if math.prod(shape) > MAX_ELEMENTS:
        raise CorruptCheckpointError(f"{what}: shape {shape} is implausibly large")
    return shape


def parse_array_spec(key: str, d: Any, where: str) -> ArraySpec:
    what = f"{where}: array {key!r}"
    if not isinstance(d, dict):
        raise CorruptCheckpointError(f"{what}: malformed record")
    try:
        dtype = d["dtype"]
        stored_dtype = d["stored_dtype"]
        key_impl = d.get("key_impl")
        if key_impl is None:
            real = real_dtype(dtype)
            if storage_dtype(real).name != stored_dtype:
                raise CorruptCheckpointError(f"{what}: dtype {dtype} cannot be stored as {stored_dtype}")
        elif not isinstance(key_impl, str) or stored_dtype != "uint32":
            raise CorruptCheckpointError(f"{what}: malformed PRNG key record")
        spec = ArraySpec(dtype=str(dtype), shape=_shape(d["shape"], what), stored_dtype=str(stored_dtype),
                         stored_shape=_shape(d["stored_shape"], what), key_impl=key_impl)
    except CorruptCheckpointError:
        raise
    except Exception as e:  # KeyError, TypeError, CheckpointError from dtype parsing
        raise CorruptCheckpointError(f"{what}: malformed record ({e})") from e
    if key_impl is None and spec.shape != spec.stored_shape:
        raise CorruptCheckpointError(f"{what}: shape {spec.shape} != stored shape {spec.stored_shape}")
    if key_impl is not None and spec.stored_shape[:len(spec.shape)] != spec.shape:
        raise CorruptCheckpointError(f"{what}: key data shape {spec.stored_shape} does not extend {spec.shape}")
    return spec


@dataclass
class ItemRecord:
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    scalars: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"arrays": {k: s.to_json() for k, s in self.arrays.items()}, "scalars": self.scalars}


@dataclass
class FileRecord:
    size: int
    xxh3_64: str
    item: str | None = None
    writer: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"size": self.size, "xxh3_64": self.xxh3_64}
        if self.item is not None:
            d["item"] = self.item
        if self.writer:
            d["writer"] = self.writer
        return d


@dataclass
class Manifest:
    step: int | None
    items: dict[str, ItemRecord]
    files: dict[str, FileRecord]           # shard files
    meta_files: dict[str, FileRecord]      # config.json, metrics.json, ... and the index
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    writers: dict[str, str] = field(default_factory=dict)
    host_count: int = 1
    index_file: str = INDEX
    transaction: str = ""                  # id of the save that committed it (multi-process)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "step": self.step,
            "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "writers": self.writers, "host_count": self.host_count, "metrics": self.metrics,
            "items": {k: v.to_json() for k, v in self.items.items()},
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "meta_files": {k: v.to_json() for k, v in sorted(self.meta_files.items())},
            "index": self.index_file,
            **({"transaction": self.transaction} if self.transaction else {}),
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=False, allow_nan=False).encode()

    @classmethod
    def loads(cls, raw: bytes, where: str) -> "Manifest":
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: manifest is {len(raw)} bytes, over the limit")
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a shardckpt manifest")
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{where}: format version {version!r:.20} is not supported "
                                         f"by this shardckpt (reads version {FORMAT_VERSION})")
        try:
            step = d.get("step")
            if step is not None:
                _int(step, f"{where}: step")
            items = {}
            for name, rec in _dict(d["items"], where).items():
                rec = _dict(rec, f"{where}: item {name!r}")
                # required, as written: a damaged key must not read as "no arrays"
                arrays = {str(k): parse_array_spec(k, v, where) for k, v in _dict(rec["arrays"], where).items()}
                scalars = _dict(rec["scalars"], where)
                for k, v in scalars.items():
                    decode_scalar(k, v)
                items[str(name)] = ItemRecord(arrays, scalars)
            files = {check_file_name(k, where): _file_record(v, f"{where}: file {k!r}") for k, v in _dict(d["files"], where).items()}
            meta = {check_file_name(k, where): _file_record(v, f"{where}: file {k!r}") for k, v in _dict(d["meta_files"], where).items()}
            index_file = check_file_name(d.get("index", INDEX), where)
            metrics = _dict(d.get("metrics", {}), where)
            host_count = _int(d.get("host_count", 1), f"{where}: host_count", 1)
        except CorruptCheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
        return cls(step=step, items=items, files=files, meta_files=meta, metrics=metrics,
                   created=str(d.get("created", "")), writers=_dict(d.get("writers", {}), where),
                   host_count=host_count, index_file=index_file,
                   transaction=str(d.get("transaction", ""))[:64])


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise CorruptCheckpointError(f"{where}: expected a JSON object, got {type(v).__name__}")
    return v


def _file_record(v: Any, what: str) -> FileRecord:
    v = _dict(v, what)
    xxh = v.get("xxh3_64")
    if not isinstance(xxh, str) or not re.fullmatch(r"[0-9a-f]{16}", xxh):
        raise CorruptCheckpointError(f"{what}: malformed checksum {xxh!r:.40}")
    writer = v.get("writer", {})
    return FileRecord(_int(v.get("size"), f"{what} size"), xxh, v.get("item"), writer if isinstance(writer, dict) else {})


# --- chunk index --------------------------------------------------------------------------

def dump_index(chunks_by_item: dict[str, dict[str, list[tuple[str, ChunkRecord]]]]) -> bytes:
    """Serialise ``{item: {key: [(file, chunk), ...]}}`` compactly (files by number)."""
    files: dict[str, int] = {}
    items: dict[str, dict[str, list]] = {}
    for item, by_key in chunks_by_item.items():
        out = items.setdefault(item, {})
        for key, rows in by_key.items():
            out[key] = [[files.setdefault(f, len(files)), c.member, list(c.offset), list(c.shape),
                         -1 if c.data_offset is None else c.data_offset, c.nbytes, c.crc32] for f, c in rows]
    return msgpack.packb({"version": FORMAT_VERSION, "files": list(files), "items": items}, use_bin_type=True)


def load_index(raw: bytes, manifest: Manifest, where: str) -> dict[str, dict[str, list[tuple[str, ChunkRecord]]]]:
    """Parse and validate the chunk index against the manifest: every chunk names a file of
    the manifest, lies inside its array, has the byte count its shape implies, and the chunks
    of each array tile it exactly (no gap, no overlap)."""
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: chunk index is not valid msgpack ({e})") from e
    try:
        d = _dict(d, where)
        files = [check_file_name(f, where) for f in d["files"]]
        for f in files:
            if f not in manifest.files:
                raise CorruptCheckpointError(f"{where}: index names file {f!r} that the manifest does not list")
        out: dict[str, dict[str, list[tuple[str, ChunkRecord]]]] = {}
        stored_in: dict[str, int] = {}   # uncompressed chunk bytes per file
        inflated: dict[str, int] = {}    # inflated bytes of compressed chunks per file
        for item, by_key in _dict(d["items"], where).items():
            if item not in manifest.items:
                raise CorruptCheckpointError(f"{where}: index has unknown item {item!r}")
            specs = manifest.items[item].arrays
            item_out = out.setdefault(item, {})
            for key, rows in _dict(by_key, where).items():
                if key not in specs:
                    raise CorruptCheckpointError(f"{where}: index has chunks for unknown array {key!r}")
                spec = specs[key]
                itemsize = real_dtype(spec.stored_dtype).itemsize
                parsed = []
                for row in rows:
                    fidx, member, off, shp, data_off, nbytes, crc = row
                    what = f"{where}: chunk of {key!r}"
                    f = files[_int(fidx, what, 0, len(files) - 1)]
                    off, shp = _shape(off, what), _shape(shp, what)
                    if len(off) != len(spec.stored_shape) or len(shp) != len(off) or any(
                            o + s > g for o, s, g in zip(off, shp, spec.stored_shape)):
                        raise CorruptCheckpointError(f"{what}: box {off}+{shp} lies outside the array {spec.stored_shape}")
                    if _int(nbytes, what) != math.prod(shp) * itemsize:
                        raise CorruptCheckpointError(f"{what}: {nbytes} bytes do not match shape {shp}")
                    size = manifest.files[f].size
                    if _int(data_off, what, -1) >= 0:
                        if data_off + nbytes > size:
                            raise CorruptCheckpointError(f"{what}: bytes beyond the end of {f}")
                        stored_in[f] = stored_in.get(f, 0) + nbytes
                    else:  # compressed: nbytes is the inflated size, bounded by deflate's ratio
                        inflated[f] = inflated.get(f, 0) + nbytes
                    if stored_in.get(f, 0) > size or inflated.get(f, 0) > MAX_DEFLATE_RATIO * size + 65536:
                        raise CorruptCheckpointError(f"{what}: the chunks of {f} claim more bytes than it holds")
                    if not isinstance(member, str):
                        raise CorruptCheckpointError(f"{what}: malformed member name")
                    parsed.append((f, ChunkRecord(key, member, off, shp, None if data_off < 0 else data_off,
                                                  nbytes, _int(crc, what, 0, 0xFFFFFFFF))))
                check_tiling(key, spec.stored_shape, [c for _, c in parsed], where)
                item_out[key] = parsed
            for key, spec in specs.items():
                if key not in item_out:
                    raise CorruptCheckpointError(f"{where}: array {key!r} of item {item!r} has no chunks")
    except CorruptCheckpointError:
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: malformed chunk index ({type(e).__name__}: {e})") from e
    for item in manifest.items:
        if manifest.items[item].arrays and item not in out:
            raise CorruptCheckpointError(f"{where}: item {item!r} has no chunks in the index")
    return out


def check_tiling(key: str, shape: tuple[int, ...], chunks: list[ChunkRecord], where: str) -> None:
    """The chunks of one array must cover it exactly once."""
    total = math.prod(shape)
    covered = sum(math.prod(c.shape) for c in chunks)
    if covered != total or (total == 0 and not chunks):
        raise CorruptCheckpointError(f"{where}: chunks of {key!r} cover {covered} of {total} elements")
    boxes = sorted((c.offset, c.shape) for c in chunks if math.prod(c.shape))
    if len(boxes) > 4096:
        return  # volume check above; pairwise check would be quadratic
    for i, (ao, ash) in enumerate(boxes):
        for bo, bsh in boxes[i + 1:]:
            if all(b < a + n and a < b + m for a, n, b, m in zip(ao, ash, bo, bsh)):
                raise CorruptCheckpointError(f"{where}: chunks of {key!r} overlap at {ao} and {bo}")
