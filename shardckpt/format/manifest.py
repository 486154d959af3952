"""The manifest: the commit record of a checkpoint (``manifest.json``, written last).

It keeps what a human reads: items, arrays with real dtypes and shapes, scalar leaves,
files with sizes and checksums, metrics. The bulk chunk table lives in the index
(``index.py``), referenced and checksummed from here. A manifest read is hostile input:
its size is capped before parsing, its JSON depth bounded, its checksum (xxh3-64 of the
canonical JSON) verified, and every field checked against the schema; any damage raises
``CorruptCheckpointError`` naming the checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import xxhash

from shardckpt.errors import CheckpointError, CorruptCheckpointError
from shardckpt.format import limits
from shardckpt.format.names import check_file_name
from shardckpt.tree import ArraySpec, decode_scalar, real_dtype, storage_dtype

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.msgpack"
CHECKSUM_FIELD = "checksum"
CHECKSUM_ALGO = "xxh3-64"


# Top-level fields of a manifest written before manifests carried a checksum (legacy).
_LEGACY_FIELDS = frozenset({"format", "version", "step", "created", "writers", "host_count", "metrics",
                            "items", "files", "meta_files", "index", "transaction"})
_CHECKSUM = re.compile(r"xxh3-64:([0-9a-f]{16})")
DIGEST = re.compile(r"xxh3-64:[0-9a-f]{16}")       # an array's content digest (ItemRecord.digests)


def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptCheckpointError(f"{what}: expected an integer in [{lo}, {hi}], got {v!r:.100}")
    return v


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > limits.MAX_NDIM:
        raise CorruptCheckpointError(f"{what}: malformed shape {v!r:.200}")
    shape = tuple(_int(d, what) for d in v)
    if math.prod(shape) > limits.MAX_ELEMENTS:
        raise CorruptCheckpointError(f"{what}: shape {shape} is implausibly large")
    return shape


_SPECS: dict[tuple, ArraySpec] = {}     # record values -> the spec they parsed to (every check passed)
SPEC_MEMO = 4096


def parse_array_spec(key: str, d: Any, where: str) -> ArraySpec:
    """An array's record as an ``ArraySpec``, every field checked. The checks depend only on
    the record's values, so records seen before (the same few specs recur thousands of
    times: every layer's kernels, a checkpoint read again) are served from a memo keyed by
    those exact values and their exact types; anything else is checked in full."""
    memo_key = _spec_memo_key(d)
    spec = _SPECS.get(memo_key) if memo_key is not None else None
    if spec is not None:
        return spec
    spec = _parse_array_spec(key, d, where)
    if memo_key is not None:
        if len(_SPECS) >= SPEC_MEMO:
            _SPECS.clear()
        _SPECS[memo_key] = spec
    return spec


def _spec_memo_key(d: Any) -> tuple | None:
    """The values a record's checks read, as a hashable key, when they have the plain types
    a record holds (str, int, a list of ints; never bool, whose hash equals an int's);
    else None (not memoised)."""
    if type(d) is not dict:
        return None
    dtype, stored, impl, shape, sshape = (d.get("dtype"), d.get("stored_dtype"), d.get("key_impl"), d.get("shape"),
                                          d.get("stored_shape"))
    if type(dtype) is not str or type(stored) is not str or not (impl is None or type(impl) is str) \
            or type(shape) is not list or type(sshape) is not list \
            or not all(type(v) is int for v in shape) or not all(type(v) is int for v in sshape):
        return None
    return dtype, stored, impl, tuple(shape), tuple(sshape), "key_impl" in d


def _parse_array_spec(key: str, d: Any, where: str) -> ArraySpec:
    what = f"{where}: array {key!r}"
    if not isinstance(d, dict):
        raise CorruptCheckpointError(f"{what}: malformed record")
    try:
        dtype = d["dtype"]
        stored_dtype = d["stored_dtype"]
        key_impl = d.get("key_impl")
        if not isinstance(dtype, str) or not isinstance(stored_dtype, str) or len(dtype) > 64:
            raise CorruptCheckpointError(f"{what}: malformed dtype {dtype!r:.80} / {stored_dtype!r:.80}")
        if key_impl is None:
            real = real_dtype(dtype, what)
            if storage_dtype(real).name != stored_dtype:
                raise CorruptCheckpointError(f"{what}: dtype {dtype} cannot be stored as {stored_dtype!r:.80}")
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
    """What one item holds: its arrays' specs, its scalar leaves, and (optional) a content
    digest of each array (``"xxh3-64:<hex>"`` over the stored bytes of its pieces in box
    order, ``digest_pieces``): what an incremental save compares to carry unchanged arrays."""

    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    scalars: dict[str, dict] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"arrays": {k: s.to_json() for k, s in self.arrays.items()}, "scalars": self.scalars}
        if self.digests:
            d["digests"] = dict(sorted(self.digests.items()))
        return d


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
            "created": self.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "writers": self.writers, "host_count": self.host_count, "metrics": self.metrics,
            "items": {k: v.to_json() for k, v in self.items.items()},
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "meta_files": {k: v.to_json() for k, v in sorted(self.meta_files.items())},
            "index": self.index_file,
            **({"transaction": self.transaction} if self.transaction else {}),
        }

    def dumps(self) -> bytes:
        """The manifest as written: JSON carrying ``"checksum"``, the xxh3-64 of the
        canonical form of everything else (see ``manifest_checksum``)."""
        return self._encode()[0]

    def encode(self, where: str) -> tuple[bytes, Manifest]:
        """``(dumps(), loads(dumps()))`` without parsing the bytes just made: the parsed
        manifest comes from the very document they encode (the reader's checks on their
        size and JSON density, then its schema checks on that document, every shape and
        name). The JSON parse, depth and checksum a load would repeat hold by
        construction. Raises ``CorruptCheckpointError`` for what every load would refuse."""
        raw, doc = self._encode()
        check_raw(raw, where)
        return raw, Manifest.from_doc(doc, where, checksum_checked=True)

    def _encode(self) -> tuple[bytes, dict]:
        doc = self.to_json()
        text = json.dumps(doc, allow_nan=False)
        if json_depth(doc) > limits.MAX_JSON_DEPTH:
            raise CheckpointError(f"manifest: metrics or leaves nested deeper than {limits.MAX_JSON_DEPTH} levels "
                                  "cannot be saved")
        doc = json.loads(text)            # what a reader will see (tuples -> lists, int keys -> str)
        doc[CHECKSUM_FIELD] = manifest_checksum(doc)
        return laid_out(doc).encode(), doc

    @classmethod
    def loads(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check a manifest. Raises ``CorruptCheckpointError`` naming ``where`` for
        any damage: not JSON, nested too deep, wrong checksum, wrong schema."""
        check_raw(raw, where)
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({e})") from e
        if json_depth(d) > limits.MAX_JSON_DEPTH:
            raise CorruptCheckpointError(f"{where}: manifest nests JSON deeper than {limits.MAX_JSON_DEPTH} levels")
        return cls.from_doc(d, where)

    @classmethod
    def from_doc(cls, d: Any, where: str, *, checksum_checked: bool = False) -> Manifest:
        """The checks of ``loads`` after the JSON parse: format, version, checksum (unless
        the caller computed it from ``d`` itself), every field's schema."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a shardckpt manifest")
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{where}: format version {version!r:.20} is not supported "
                                         f"by this shardckpt (reads version {FORMAT_VERSION})")
        if not checksum_checked:
            _check_manifest_checksum(d, where)
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
                    decode_scalar(k, v, f"{where}: item {name!r}")
                digests = _dict(rec.get("digests", {}), f"{where}: item {name!r} digests")
                for k, v in digests.items():
                    if k not in arrays or not isinstance(v, str) or not DIGEST.fullmatch(v):
                        raise CorruptCheckpointError(f"{where}: item {name!r}: malformed digest of {k!r:.200}")
                items[str(name)] = ItemRecord(arrays, scalars, dict(digests))
            files = {check_file_name(k, where): _file_record(v, f"{where}: file {k!r}") for k, v in _dict(d["files"], where).items()}
            meta = {check_file_name(k, where): _file_record(v, f"{where}: file {k!r}") for k, v in _dict(d["meta_files"], where).items()}
            index_file = check_file_name(d.get("index", INDEX), where)
            if index_file in meta and meta[index_file].size > limits.MAX_INDEX_BYTES:
                raise CorruptCheckpointError(f"{where}: chunk index {index_file} is {meta[index_file].size} bytes, "
                                             f"over the limit of {limits.MAX_INDEX_BYTES}")
            metrics = _dict(d.get("metrics", {}), where)
            host_count = _int(d.get("host_count", 1), f"{where}: host_count", 1)
            created = d.get("created", "")
            transaction = d.get("transaction", "")
            if not isinstance(created, str) or not isinstance(transaction, str):
                raise CorruptCheckpointError(f"{where}: malformed created/transaction field")
            writers = _dict(d.get("writers", {}), where)
        except CorruptCheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e!s:.200})") from e
        return cls(step=step, items=items, files=files, meta_files=meta, metrics=metrics,
                   created=created, writers=writers, host_count=host_count, index_file=index_file,
                   transaction=transaction[:64])


def check_raw(raw: bytes, where: str) -> None:
    """What a load checks of a manifest's bytes before parsing them: their size, and that
    parsing them would not take implausibly much memory."""
    if len(raw) > limits.MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{where}: manifest is {len(raw)} bytes, over the limit of {limits.MAX_MANIFEST_BYTES}")
    cost = parse_cost(raw)
    if cost > limits.MAX_JSON_COST_FACTOR * len(raw) + limits.JSON_COST_SLACK:
        raise CorruptCheckpointError(f"{where}: manifest is implausibly dense JSON ({len(raw)} bytes would take "
                                     f"~{cost >> 20} MiB to parse); refusing it")


_ENCODE = json.JSONEncoder(separators=(", ", ": "), allow_nan=False).encode
LINE_LEVELS = 4       # objects nested less deep get one member a line: one line per array record


def laid_out(doc: Any, encode: Any = _ENCODE, level: int = 0) -> str:
    """``doc`` as JSON for people and for speed: objects down to ``LINE_LEVELS`` deep one
    member a line (items, arrays, digests, files), everything deeper on that member's line,
    by the C encoder ``encode`` (``json.dumps(indent=...)`` runs in Python, ~3x slower).
    An object with keys other than strings is left to ``encode`` whole (it converts them)."""
    if type(doc) is dict and doc and level < LINE_LEVELS and all(type(k) is str for k in doc):
        pad = "\n" + " " * (level + 1)
        return "{" + ",".join([pad + encode(k) + ": " + laid_out(v, encode, level + 1) for k, v in doc.items()]) + \
            "\n" + " " * level + "}"
    return encode(doc)


def parse_cost(raw: bytes) -> int:
    """About the memory ``json.loads(raw)`` takes, counted without parsing (a few byte scans):
    Python objects cost far more than their text (a 1-key dict ~240 bytes for ``{"a":1}``),
    so a small hostile file can ask for gigabytes. What shardckpt writes costs ~5x its size (~12x for
    a tree of nothing but scalar leaves)."""
    return (raw.count(b"{") * 240 + raw.count(b"[") * 72 + (raw.count(b'"') // 2) * 60
            + raw.count(b",") * 40)


def canonical_json(doc: Any) -> bytes:
    """The canonical serialisation a manifest checksum covers: ``json.dumps(doc,
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)``, UTF-8
    (pure ASCII). Insensitive to whitespace, key order and escapes of the file; sensitive
    to every key and value."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def manifest_checksum(doc: dict) -> str:
    """``"xxh3-64:<16 hex digits>"`` of the canonical JSON of ``doc`` without its checksum."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    return f"{CHECKSUM_ALGO}:{xxhash.xxh3_64(canonical_json(body)).hexdigest()}"


def seal_manifest(doc: dict) -> dict:
    """``doc`` with its checksum (re)computed: for tools and tests that write manifests."""
    doc = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    doc[CHECKSUM_FIELD] = manifest_checksum(doc)
    return doc


def _check_manifest_checksum(d: dict, where: str) -> None:
    if CHECKSUM_FIELD not in d:
        # Written by shardckpt before manifests carried a checksum: accepted as legacy, but
        # only with exactly the fields that release wrote (a bit flip in the checksum's
        # own name would otherwise turn a sealed manifest into an unchecked one).
        extra = sorted(set(d) - _LEGACY_FIELDS)
        if extra:
            raise CorruptCheckpointError(f"{where}: manifest has no checksum and unknown fields {extra!r:.200}")
        return
    got = d[CHECKSUM_FIELD]
    if not isinstance(got, str) or not _CHECKSUM.fullmatch(got):
        raise CorruptCheckpointError(f"{where}: manifest checksum {got!r:.80} is malformed")
    want = manifest_checksum(d)
    if got != want:
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch (recorded {got}, content has {want}); "
                                     f"{MANIFEST} is damaged")


def json_depth(doc: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), iteratively: no recursion limit."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if depth > deepest:
            deepest = depth
            if depth > limits.MAX_JSON_DEPTH:
                return depth
        stack.extend((x, depth + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise CorruptCheckpointError(f"{where}: expected a JSON object, got {type(v).__name__}")
    return v


def _file_record(v: Any, what: str) -> FileRecord:
    v = _dict(v, what)
    xxh = v.get("xxh3_64")
    if not isinstance(xxh, str) or not re.fullmatch(r"[0-9a-f]{16}", xxh):
        raise CorruptCheckpointError(f"{what}: malformed checksum {xxh!r:.40}")
    writer, item = v.get("writer", {}), v.get("item")
    if not isinstance(writer, dict) or not (item is None or isinstance(item, str)):
        raise CorruptCheckpointError(f"{what}: malformed item or writer record")
    return FileRecord(_int(v.get("size"), f"{what} size"), xxh, item, writer)
