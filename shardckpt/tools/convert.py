"""Orbax <-> shardckpt conversion, and export of model weights as safetensors.

    from_orbax(src, dst)          an Orbax checkpoint -> a shardckpt checkpoint
    to_orbax(src, dst)            a shardckpt checkpoint -> an Orbax checkpoint
    convert(src, dst)             either, the direction found from ``src``
    export_safetensors(src, out)  the ``model`` item's arrays -> one ``.safetensors`` file
    orbax_kind(path)              is this an Orbax directory, and which kind (cheap, no orbax import)

What Orbax 0.12 writes (``use_ocdbt=True``, the default):

    <dir>/                         StandardCheckpointer / PyTreeCheckpointer .save(dir, tree)
      _CHECKPOINT_METADATA         JSON: {"item_handlers": "<handler class>", "metrics", "custom_metadata", ...}
      _METADATA                    JSON: {"tree_metadata": {"('a', 'b')": {"key_metadata", "value_metadata"}}, ...}
      _sharding                    JSON: the sharding of every array when it was saved
      array_metadatas/process_0    JSON: per array write/chunk shape and ext_metadata
                                   ({"random_key_impl": "threefry2x32"} for typed PRNG keys)
      manifest.ocdbt, d/, ocdbt.process_0/   the array data (a TensorStore OCDBT database)
      _strings.json                string leaves (PyTreeCheckpointer only)
      commit_success.txt
    <root>/<step>/                 CheckpointManager: one directory per step
      _CHECKPOINT_METADATA         {"item_handlers": {"default"|"state"|"model"|...: "<handler class>"}, "metrics"}
      <item>/                      each item laid out as above (a JsonSave item: <item>/metadata)

Inside the OCDBT database each array is a zarr v2 array ``<param.name>/.zarray`` + chunks
(zstd level 1). bfloat16 is stored as bfloat16 (zarr dtype ``"bfloat16"``), typed PRNG keys
as their key data (``"<u4"``, shape ``+ (2,)`` for threefry); the key implementation is only
in ``array_metadatas/process_*`` (``_METADATA`` and ``.metadata()`` report ``uint32``). ``nnx.state(...)`` trees show every ``nnx.Variable`` as a
``{"value": leaf}`` node. The conversion reads Orbax's own metadata to build the restore
arguments (host numpy arrays in the saved dtype, nothing on an accelerator), so no target
is needed, and restores with Orbax itself; it is bit exact in both directions.

Orbax is imported only by the functions that read or write it (it costs seconds to import);
recognising an Orbax directory is ``load.open.orbax_kind``'s job, by file names alone.

What an Orbax directory may not do to us (it is input, possibly hostile; docs/reliability.md):

- name items or tree keys that become paths outside it: item names of ``_CHECKPOINT_METADATA``
  must be ``format.names.NAME``, every key of ``_METADATA`` a plain path part (not empty, ".",
  "..", no "/", "\\" or NUL), checked before Orbax opens anything;
- hold a symlink or a special file anywhere (Orbax and TensorStore would follow it): refused
  before Orbax reads a byte;
- declare arrays larger than this machine's memory, or larger than its bytes on disk could
  hold compressed (``MAX_COMPRESSION_RATIO`` times their size, plus ``DECLARED_SLACK``):
  refused from Orbax's metadata, before any array is allocated;
- nest its JSON deeper than ``format.limits.MAX_JSON_DEPTH`` (measured on the bytes, before
  ``json.loads`` could recurse), zarr metadata included (``.zarray`` files and keys of the
  OCDBT database, which TensorStore's recursive C++ parser would crash on).

In the other direction a shardckpt checkpoint's names are checked the same way before they
become Orbax item directories and parameter names. Every conversion writes into a hidden
directory beside ``dst`` (created with ``tempfile.mkdtemp``) and publishes it with one rename
onto ``dst``, which must be missing or an empty directory: a failure removes that hidden
directory and leaves nothing at ``dst`` (Orbax's ``.orbax-checkpoint-tmp`` directories are
inside it too), and a ``dst`` that someone filled meanwhile is never replaced. Orbax's own
logging (absl) and warnings are silenced while a conversion runs; its failures become one
``CheckpointError`` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from shardckpt.api.core import save_checkpoint
from shardckpt.errors import CheckpointError, CheckpointNotFoundError
from shardckpt.format import limits
from shardckpt.format.manifest import json_depth
from shardckpt.format.names import NAME, check_name
from shardckpt.format.nesting import raw_json_depth
from shardckpt.loading.open import (
    MAX_ORBAX_METADATA,
    ORBAX_STEP_DIR,
    ORBAX_TMP,
    is_orbax_tree,
    layout_of,
    open_checkpoint,
    orbax_kind,
    small_json,
    step_checkpoints,
)
from shardckpt.store.local import LocalStore
from shardckpt.store.posix import Posix
from shardckpt.store.registry import resolve
from shardckpt.tree import key_of

#: The JSON file in a converted shardckpt checkpoint that records where it came from, so
#: ``to_orbax`` can write the original Orbax layout back.
PROVENANCE = "orbax.json"
_TREE_HANDLERS = ("StandardCheckpointHandler", "PyTreeCheckpointHandler")
_JSON_HANDLERS = ("JsonCheckpointHandler",)
_METRICS_ITEM = "metrics"   # orbax.checkpoint.checkpoint_manager.METRIC_ITEM_NAME
_KINDS = ("standard", "pytree", "step", "manager")

#: How much larger than its compressed bytes an array may be. Orbax compresses every chunk
#: with zstd, whose densest block (an RLE block: a 3-byte header and 1 byte for up to 128 KiB)
#: inflates 32768 times; Orbax's own checkpoint of 256 MiB of zeros measures 27,654 times
#: (deflate's 1032 would refuse it).
MAX_COMPRESSION_RATIO = 32768
#: Declared bytes allowed beyond that, whatever the source's size (small trees of zeros).
DECLARED_SLACK = 64 << 20


def _local(path: os.PathLike | str) -> tuple[LocalStore, str]:
    store, name = resolve(path)
    if not isinstance(store, LocalStore):
        raise CheckpointError(f"{path}: Orbax conversion works on local directories (convert a local copy)")
    return store, name


def _local_path(path: os.PathLike | str) -> Path:
    """A local path as an absolute one (``~`` expanded, ``a/../b`` normalised): Orbax refuses
    relative paths."""
    store, name = _local(path)
    return store.location(name)


def _orbax_kind(path: os.PathLike | str) -> str | None:
    """The Orbax kind of a local directory (``load.open.orbax_kind``: the layout check)."""
    return orbax_kind(*_local(path))


def shardckpt_kind(path: os.PathLike | str) -> str | None:
    """``"checkpoint"`` (a manifest), ``"manager"`` (``<prefix>_<step>`` checkpoints) or None."""
    kind = layout_of(*_local(path)).kind
    return {"checkpoint": "checkpoint", "steps": "manager"}.get(kind)


def _shardckpt_steps(path: Path) -> list[tuple[int, Path]]:
    store, name = _local(path)
    return [(n, store.location(child)) for n, child in step_checkpoints(store, name)]


def _is_file(p: Path) -> bool:
    try:
        return p.is_file() and not p.is_symlink()
    except OSError:
        return False


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink()
    except OSError:
        return False


def _read_json(p: Path) -> Any:
    """A small JSON file, or None when absent or unreadable (``load.open.small_json``)."""
    store, name = _local(p)
    return small_json(store, name)


def _metadata_json(p: Path, limit: int = MAX_ORBAX_METADATA) -> Any:
    """An Orbax metadata file that must be readable: its JSON, or our error naming it (more
    than ``limit`` bytes, not JSON, nested deeper than ``limits.MAX_JSON_DEPTH``, measured
    before parsing); None when it does not exist."""
    store, name = _local(p)
    try:
        raw = store.read_bytes(name, limit)
    except FileNotFoundError:
        return None
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read it ({e.strerror or e})") from e
    if raw_json_depth(raw) > limits.MAX_JSON_DEPTH:
        raise CheckpointError(f"{p}: nests JSON deeper than {limits.MAX_JSON_DEPTH} levels; refusing it")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e!s:.120})") from e


def _tree_dir(p: Path) -> bool:
    return is_orbax_tree({e.name: e for e in LocalStore(p).list("")}) if _is_dir(p) else False


@dataclass
class ConvertReport:
    """What a conversion or export did: the paths written and anything left out."""

    src: str
    dst: str
    direction: str                         # "from_orbax" | "to_orbax" | "export"
    kind: str                              # the Orbax kind read or written
    written: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _neither(path: Path) -> CheckpointError:
    # NotFound, like open_checkpoint on a directory without a manifest (the CLI exits 2)
    return CheckpointNotFoundError(
        f"{path}: neither an Orbax checkpoint (no _CHECKPOINT_METADATA, _METADATA, manifest.ocdbt, "
        "ocdbt.process_*/ or numbered step directories) nor a shardckpt checkpoint (no manifest.json, "
        "no <prefix>_<step> checkpoints); nothing to convert")


def _check_dst(dst: Path, src: Path | None = None) -> None:
    """Never write over something we did not write: DST must be missing or an empty directory
    (and not inside SRC, which the conversion reads)."""
    try:
        if os.path.lexists(dst):
            if not dst.is_dir() or dst.is_symlink():
                raise CheckpointError(f"{dst}: exists and is not a directory; refusing to overwrite it")
            with os.scandir(dst) as it:
                if any(it):
                    raise CheckpointError(f"{dst}: exists and is not empty; refusing to overwrite it "
                                          "(choose a new destination)")
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot check the destination ({e.strerror or e})") from e
    if src is not None and (dst == src or src in dst.parents):
        raise CheckpointError(f"{dst}: inside the source {src}; choose a destination outside it")


# --- the destination: staged beside it, published by one rename ---------------------------------

@contextlib.contextmanager
def _staged(dst: Path) -> Iterator[Path]:
    """A path to write the whole conversion to, in a hidden directory beside ``dst``;
    renamed onto ``dst`` when the body succeeds. On any failure (or interrupt) the hidden
    directory and the parent directories this created are removed: nothing appears at
    ``dst``, nothing is left beside it. A ``dst`` filled meanwhile is never replaced
    (rename refuses a non-empty directory)."""
    created: list[Path] = []
    parent = dst.parent
    try:
        missing = [p for p in [parent, *parent.parents] if not os.path.lexists(p)]
        for p in reversed(missing):
            os.mkdir(p)
            created.append(p)
        hidden = Path(tempfile.mkdtemp(prefix=".shardckpt-convert-", dir=parent))
    except OSError as e:
        _remove_dirs(created)
        raise CheckpointError(f"{dst}: cannot create a directory beside it ({e.strerror or e})") from e
    out = hidden / "out"
    published = False
    try:
        yield out
        if not os.path.lexists(out):
            raise CheckpointError(f"{dst}: the conversion wrote nothing")
        try:
            os.rename(out, dst)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise CheckpointError(f"{dst}: appeared and is not an empty directory now; refusing to "
                                      "overwrite it (nothing was written)") from e
            raise CheckpointError(f"{dst}: cannot move the converted checkpoint into place "
                                  f"({e.strerror or e})") from e
        published = True
        fsync_dir(parent)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)   # ours (mkdtemp): after the rename, what is left
        if not published:
            _remove_dirs(created)   # rmdir: only while still empty (someone may have used them)


def fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable, best effort (what was renamed is in place either way)."""
    try:
        Posix().fsync_path(d)
    except OSError:
        pass


def _remove_dirs(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except OSError:
            pass


class _OrbaxRecords(logging.Filter):
    """Drops the log records of Orbax's modules (absl logging goes through ``logging``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/orbax/" not in record.pathname.replace(os.sep, "/")


_QUIET = _OrbaxRecords()
_quiet_lock = threading.Lock()
_quiet_users = 0


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Silence Orbax's logging (its background threads log every failure with a traceback)
    and its warnings for the duration of a conversion; other loggers are untouched."""
    global _quiet_users
    logger = logging.getLogger("absl")
    with _quiet_lock:
        if _quiet_users == 0:
            logger.addFilter(_QUIET)
        _quiet_users += 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"orbax(\.|$)")
            yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                logger.removeFilter(_QUIET)


def _orbax_failure(where: Path, what: str, e: BaseException) -> CheckpointError:
    text = " ".join(str(e).split())
    return CheckpointError(f"{where}: {what}: {type(e).__name__}: {text:.300}")


@contextlib.contextmanager
def _as_our_errors(where: Path) -> Iterator[None]:
    """Whatever escapes a conversion as our error: Orbax's, the OS's, too deep a structure."""
    try:
        yield
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{where}: nested too deeply to convert; refusing it") from None
    except MemoryError:
        raise CheckpointError(f"{where}: not enough memory to convert it") from None
    except OSError as e:
        raise CheckpointError(f"{where}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")) from e


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise CheckpointError("converting Orbax checkpoints needs orbax-checkpoint: "
                              "pip install 'shardckpt[orbax]'") from e
    return ocp


# --- checks of an Orbax source, before Orbax reads it --------------------------------------------

#: The zarr metadata files (JSON) TensorStore parses to open an array. Its C++ parser
#: recurses once per level: a ``.zarray`` nested 100,000 deep crashes the process (SIGSEGV)
#: at any Python recursion limit, so their depth is measured before TensorStore sees them,
#: as plain files and inside an OCDBT database alike; one zarr metadata file is small.
_ZARR_JSON = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"})
#: The JSON files Orbax itself parses with ``json.loads`` (and ``array_metadatas/*``): their
#: depth is measured too (a program with a raised recursion limit would crash in C), their
#: size is Orbax's business (``_METADATA`` grows ~250 bytes an array).
_ORBAX_JSON = frozenset({"_METADATA", "_CHECKPOINT_METADATA", "_sharding", "_strings.json"})
_ARRAY_METADATAS = "array_metadatas"
#: ``_METADATA`` as this converter reads it: ~250 bytes an array, so ~250,000 arrays; a
#: converted checkpoint holding more would be over shardckpt's own manifest cap anyway.
TREE_METADATA_BYTES = 64 << 20


def _check_json_depth(where: str, raw: bytes, what: str, limit: int | None) -> None:
    if limit is not None and len(raw) > limit:
        raise CheckpointError(f"{where}: {what} of {len(raw)} bytes (more than {limit}); refusing it")
    if raw_json_depth(raw) > limits.MAX_JSON_DEPTH:
        raise CheckpointError(f"{where}: {what} nests JSON deeper than {limits.MAX_JSON_DEPTH} levels; "
                              "refusing it")


def _read_file(path: str, limit: int | None) -> bytes:
    """A regular file's bytes (``limit`` + 1 at most, to tell that it is over), never through
    a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(-1 if limit is None else limit + 1)
    finally:
        os.close(fd)


def _check_source_tree(root: Path) -> int:
    """Refuse a symlink or a special file (FIFO, socket, device) anywhere under ``root``:
    Orbax and TensorStore would follow or block on it; and metadata files too deeply nested
    (or, for zarr's, too large) to parse safely (``_ZARR_JSON``, ``_ORBAX_JSON``). Returns the
    bytes of its files."""
    total = 0
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            raise CheckpointError(f"{d}: cannot list it ({e.strerror or e})") from e
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as err:
                raise CheckpointError(f"{e.path}: cannot stat it ({err.strerror or err})") from err
            if stat.S_ISLNK(st.st_mode):
                raise CheckpointError(f"{e.path}: a symlink inside the Orbax checkpoint {root}; refusing it "
                                      "(Orbax would read what it points to; copy the target in instead)")
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(e.path))
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                zarr = e.name in _ZARR_JSON
                if zarr or e.name in _ORBAX_JSON or os.path.basename(d) == _ARRAY_METADATAS:
                    limit = MAX_ORBAX_METADATA if zarr else None
                    try:
                        raw = _read_file(e.path, limit)
                    except OSError as err:
                        raise CheckpointError(f"{e.path}: cannot read it ({err.strerror or err})") from err
                    _check_json_depth(e.path, raw, "zarr metadata" if zarr else "Orbax metadata", limit)
            else:
                raise CheckpointError(f"{e.path}: not a regular file or directory (a FIFO, socket or device) "
                                      f"inside the Orbax checkpoint {root}; refusing it")
    return total


def _check_ocdbt_zarr_json(tree_dir: Path) -> None:
    """``_ZARR_JSON`` files inside the OCDBT databases of a tree (the root one, and the
    per-process ones Orbax merges into it), read through TensorStore's key-value store
    (binary, no JSON) before TensorStore opens any array from them."""
    import tensorstore as ts  # with Orbax, which is imported only for a conversion (module doc)

    bases = [tree_dir] + sorted(p for p in tree_dir.glob("ocdbt.process_*") if _is_dir(p))
    for base in bases:
        if not _is_file(base / "manifest.ocdbt"):
            continue
        try:
            kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{base}/"}}).result()
            keys = kv.list().result()
            for key in keys:
                if os.fsdecode(key).rsplit("/", 1)[-1] in _ZARR_JSON:
                    _check_json_depth(f"{base} (OCDBT key {os.fsdecode(key)!r:.120})",
                                      bytes(kv.read(key).result().value), "zarr metadata", MAX_ORBAX_METADATA)
        except CheckpointError:
            raise
        except Exception as e:   # TensorStore's errors (ValueError with its status text)
            raise _orbax_failure(base, "cannot read its OCDBT database", e) from e


def _unsafe_key_part(part: str) -> bool:
    """A tree key part that cannot be a path component: Orbax joins them into parameter
    names, which are paths (a zarr array per parameter without OCDBT)."""
    return part in ("", ".", "..") or any(c in part for c in "/\\\x00")


def _check_tree_keys(tree_dir: Path) -> None:
    """Every key of ``_METADATA`` (Orbax builds the path of each parameter from them) is a
    plain path part; refused before Orbax opens any array."""
    where = tree_dir / "_METADATA"
    doc = _metadata_json(where, TREE_METADATA_BYTES)
    if doc is None:
        raise CheckpointError(f"{tree_dir}: an Orbax tree without _METADATA (written by an Orbax release "
                              "older than this converter reads); nothing to convert")
    entries = doc.get("tree_metadata") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: no tree_metadata object; not an Orbax tree this converter reads")
    for keypath, entry in entries.items():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, dict) and "key" in k for k in keys):
            raise CheckpointError(f"{where}: entry {keypath!r:.80} has no key_metadata list; malformed")
        parts = [str(k["key"]) for k in keys]
        bad = [p for p in parts if _unsafe_key_part(p)]
        if bad or not parts:
            raise CheckpointError(f"{where}: tree key {'.'.join(parts)!r:.120} has a part {bad[0] if bad else ''!r:.40} "
                                  "that is not a plain name (empty, '.', '..', or with '/', '\\' or NUL); "
                                  "refusing it (Orbax would turn it into a path outside the checkpoint)")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # pragma: no cover - not Linux
        return 1 << 62


def _dims(shape: Any) -> tuple[int, ...] | None:
    """A declared shape as ints, or None when it is not a tuple of non-negative ints."""
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if dims is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                               for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _check_declared_sizes(tree_dir: Path, tree: Any, leaf_types: tuple, array_type: type, source_bytes: int) -> None:
    """Refuse, from Orbax's metadata (each array's ``.zarray``), arrays this machine could
    not hold or that the tree's bytes on disk could not hold compressed, and chunks larger
    than that: TensorStore decodes every zarr chunk into a buffer of the chunk's full
    declared shape, whatever the array's (shape ``(4,)`` with chunks ``(2**40,)`` is a 4 TiB
    allocation, which aborts the process with ``std::bad_alloc``)."""
    memory = _memory_bytes()
    plausible = MAX_COMPRESSION_RATIO * source_bytes + DECLARED_SLACK
    bound = min(memory, plausible)
    why = (f"more than this machine's memory ({memory} bytes)" if memory <= plausible else
           f"more than its {source_bytes} bytes on disk can hold compressed ({plausible} bytes)")
    total = 0
    for path, m in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, leaf_types))[0]:
        if not isinstance(m, array_type):
            continue
        name = ".".join(_path_names(path))
        shape = _dims(m.shape if m.shape is not None else ())
        if shape is None:
            raise CheckpointError(f"{tree_dir}: array {name!r:.120} declares the shape {m.shape!r:.80}; refusing it")
        try:
            itemsize = np.dtype(m.dtype).itemsize
        except TypeError:
            itemsize = 8
        nbytes = math.prod(shape) * itemsize
        total += nbytes
        if nbytes > bound:
            raise CheckpointError(f"{tree_dir}: array {name!r:.120} declares the shape {shape} ({m.dtype}): "
                                  f"{nbytes} bytes, {why}; refusing it")
        declared = getattr(getattr(m, "storage", None), "chunk_shape", None)
        if declared is not None:
            chunk = _dims(declared)
            if chunk is None or len(chunk) != len(shape):
                raise CheckpointError(f"{tree_dir}: array {name!r:.120} of shape {shape} declares the chunk shape "
                                      f"{declared!r:.80}; refusing it")
            chunk_bytes = math.prod(chunk) * itemsize
            if chunk_bytes > bound:
                raise CheckpointError(f"{tree_dir}: array {name!r:.120} of shape {shape} declares chunks of shape "
                                      f"{chunk} ({chunk_bytes} bytes each), {why}; refusing it")
    if total > bound:
        raise CheckpointError(f"{tree_dir}: its arrays declare {total} bytes in all, {why}; refusing it")


def _key_impls(tree_dir: Path) -> dict[str, str]:
    """param name -> PRNG key implementation, from ``array_metadatas/process_*``."""
    out: dict[str, str] = {}
    d = tree_dir / "array_metadatas"
    if not _is_dir(d):
        return out
    for f in sorted(d.iterdir()):
        data = _read_json(f) if f.name.startswith("process_") else None
        records = data.get("array_metadatas") if isinstance(data, dict) else None
        for rec in records if isinstance(records, list) else []:
            meta = rec.get("array_metadata") if isinstance(rec, dict) else None
            ext = meta.get("ext_metadata") if isinstance(meta, dict) else None
            if isinstance(ext, dict) and isinstance(ext.get("random_key_impl"), str):
                out[str(meta.get("param_name"))] = ext["random_key_impl"]
    return out


def _path_names(path: tuple) -> list[str]:
    return [key_of((p,)) for p in path]


def read_orbax_tree(tree_dir: os.PathLike | str) -> Any:
    """The pytree of one Orbax tree directory as host values, without a target: arrays as
    numpy arrays in their saved dtype (bfloat16 included), typed PRNG keys re-wrapped as
    ``jax.random`` key arrays, scalars as Python numbers, strings as ``str``.

    Refused with a ``CheckpointError`` before Orbax reads anything: a symlink or special
    file inside, a tree key that is not a plain name, arrays declaring more bytes than this
    machine's memory or than the directory could hold compressed (see the module doc)."""
    tree_dir = _local_path(tree_dir)
    with _quiet_orbax(), _as_our_errors(tree_dir):
        return _read_orbax_tree(tree_dir)


def _read_orbax_tree(tree_dir: Path) -> Any:
    ocp = _ocp()
    from orbax.checkpoint import metadata as om

    source_bytes = _check_source_tree(tree_dir)
    _check_tree_keys(tree_dir)
    _check_ocdbt_zarr_json(tree_dir)
    leaf_types = (om.ArrayMetadata, om.ScalarMetadata, om.StringMetadata)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(tree_dir)
        tree = meta.tree if hasattr(meta, "tree") else meta
        _check_declared_sizes(tree_dir, tree, leaf_types, om.ArrayMetadata, source_bytes)

        def restore_arg(m):
            if isinstance(m, om.ArrayMetadata):
                return ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype)
            if isinstance(m, om.StringMetadata):
                return ocp.RestoreArgs(restore_type=str)
            return ocp.RestoreArgs()

        args = jax.tree.map(restore_arg, tree, is_leaf=lambda x: isinstance(x, leaf_types))
        restored = handler.restore(tree_dir, args=ocp.args.PyTreeRestore(restore_args=args))
        impls = _key_impls(tree_dir)
        kinds = {tuple(_path_names(p)): m for p, m in
                 jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, leaf_types))[0]}

        def fix(path, value):
            names = tuple(_path_names(path))
            m = kinds.get(names)
            if isinstance(m, om.ScalarMetadata) and isinstance(value, (np.ndarray, np.generic)) and value.ndim == 0:
                return value.item()
            impl = impls.get(".".join(names))
            if impl is not None:
                return jax.random.wrap_key_data(jax.device_put(value, jax.devices("cpu")[0]), impl=impl)
            return value

        return jax.tree_util.tree_map_with_path(fix, restored)
    except CheckpointError:
        raise
    except Exception as e:
        raise _orbax_failure(tree_dir, "Orbax could not read this tree", e) from e
    finally:
        handler.close()


def _leaf_paths(tree: Any) -> list[tuple]:
    return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_nnx_layout(tree: Any) -> bool:
    """Every leaf sits alone in a ``{"value": leaf}`` node: an ``nnx.State`` saved as is."""
    def ok(t) -> bool:
        if isinstance(t, dict):
            if set(t) == {"value"} and not isinstance(t["value"], (dict, list, tuple)):
                return True
            return bool(t) and all(ok(v) for v in t.values())
        if isinstance(t, (list, tuple)):
            return bool(t) and all(ok(v) for v in t)
        return False
    return isinstance(tree, (dict, list, tuple)) and bool(_leaf_paths(tree)) and ok(tree)


def _strip_values(t: Any) -> Any:
    if isinstance(t, dict):
        if set(t) == {"value"} and not isinstance(t["value"], (dict, list, tuple)):
            return t["value"]
        return {k: _strip_values(v) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return [_strip_values(v) for v in t]
    return t


def _sequence_prefixes(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of list nodes (Orbax sequence keys), so a round trip rebuilds lists."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _sequence_prefixes(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        out.append(prefix[:-1])
        for i, v in enumerate(tree):
            out += _sequence_prefixes(v, f"{prefix}{i}.")
    return out


def _handler_of(handlers: Any, item: str) -> str:
    return str(handlers.get(item, "")) if isinstance(handlers, dict) else ""


def _checkpoint_metadata(d: Path) -> dict:
    """``d/_CHECKPOINT_METADATA`` as a dict ({} when absent); unreadable, too deep or not an
    object: our error naming it (its item names and metrics are what we convert by)."""
    meta = _metadata_json(d / "_CHECKPOINT_METADATA")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{d / '_CHECKPOINT_METADATA'}: holds a {type(meta).__name__}, not a JSON object")
    return meta


def _orbax_step_items(step_dir: Path) -> tuple[dict[str, Path], dict[str, Any], dict[str, str]]:
    """(tree items, json items, other items by handler) of one CheckpointManager step. Item
    names become paths and shardckpt item names: each must be a ``NAME``."""
    meta = _checkpoint_metadata(step_dir)
    handlers = meta.get("item_handlers")
    trees: dict[str, Path] = {}
    jsons: dict[str, Any] = {}
    other: dict[str, str] = {}
    if isinstance(handlers, dict):
        names = sorted(handlers)
        where = f"{step_dir / '_CHECKPOINT_METADATA'}: item name"
    else:
        with os.scandir(step_dir) as it:
            names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and ORBAX_TMP not in e.name)
        where = f"{step_dir}: item directory"
    for name in names:
        check_name(name, where)
        d = step_dir / name
        h = _handler_of(handlers, name)
        if not _is_dir(d):
            if h:
                other[name] = h + " (its directory is missing)"
            continue
        if any(t in h for t in _TREE_HANDLERS) or (not h and _tree_dir(d)):
            trees[name] = d
        elif any(t in h for t in _JSON_HANDLERS) or (not h and (_is_file(d / "metadata") or _is_file(d / name))):
            # JsonSave writes <item>/metadata; the manager's metrics (best_fn) <step>/metrics/metrics
            data = _metadata_json(d / "metadata") if _is_file(d / "metadata") else _metadata_json(d / name)
            if data is None:
                other[name] = h or "json (unreadable)"
            else:
                jsons[name] = data
        else:
            other[name] = h or "unknown handler"
    return trees, jsons, other


def _split_single(tree: Any) -> tuple[dict[str, Any], bool]:
    """One tree -> shardckpt items: ``{"model": ..., "optimizer": ...}`` splits by its top
    level keys; anything else is the ``model`` item."""
    if isinstance(tree, dict) and "model" in tree and all(
            isinstance(v, (dict, list, tuple)) for v in tree.values()) and all(
            NAME.fullmatch(str(k)) for k in tree):
        return {str(k): v for k, v in tree.items()}, True
    return {"model": tree}, False


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def _convert_one_from_orbax(src: Path, kind: str, dst: Path, final: Path, step: int | None, model_config: Any,
                            skip_unknown: bool, report: ConvertReport) -> None:
    """Convert one Orbax checkpoint (a tree directory or one step) ``src`` to the shardckpt
    checkpoint ``dst`` (in the staging directory; ``final`` is where it ends up)."""
    meta = _checkpoint_metadata(src)
    provenance: dict[str, Any] = {"source": str(src), "kind": kind, "items": {},
                                  "json_items": {}, "custom_metadata": _jsonable(meta.get("custom_metadata")),
                                  "handlers": _jsonable(meta.get("item_handlers"))}
    items: dict[str, Any] = {}

    def add(orbax_item: str | None, tree: Any) -> None:
        if orbax_item in (None, "default", "state"):
            parts, split = _split_single(tree)
        else:
            parts, split = {orbax_item: tree}, False
        for name, sub in parts.items():
            nnx_values = _is_nnx_layout(sub)
            if nnx_values:
                sub = _strip_values(sub)
            if name in items:
                raise CheckpointError(f"{src}: two Orbax items both become the shardckpt item {name!r}")
            items[name] = sub
            provenance["items"][name] = {"orbax_item": orbax_item, "split": split, "nnx_values": nnx_values,
                                         "sequences": _sequence_prefixes(sub)}

    if kind in ("standard", "pytree"):
        add(None, _read_orbax_tree(src))
    else:
        trees, jsons, other = _orbax_step_items(src)
        if other:
            what = ", ".join(f"{k} ({v})" for k, v in other.items())
            if not skip_unknown:
                raise CheckpointError(f"{src}: items written by handlers shardckpt cannot convert: {what}; "
                                      "convert the rest with --skip-unknown (skip_unknown=True)")
            report.notes.append(f"{src}: skipped items of other handlers: {what}")
        if not trees:
            raise CheckpointError(f"{src}: this Orbax step holds no pytree item to convert")
        for name, d in trees.items():
            add(name, _read_orbax_tree(d))
        if isinstance(jsons.get(_METRICS_ITEM), dict):   # CheckpointManager(best_fn=...) metrics
            meta = {**meta, "metrics": jsons.pop(_METRICS_ITEM)}
        provenance["json_items"] = _jsonable(jsons)
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else None
    config = {"model_config": _jsonable(model_config), "step": step, "train_config": None}
    save_checkpoint(dst, items, step=step, metrics=metrics or None,
                    json_files={"config.json": config, PROVENANCE: provenance})
    report.written.append(str(final))
    report.steps.append(step)
    report.items = sorted(set(report.items) | set(items))


def _orbax_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    with os.scandir(root) as it:
        entries = list(it)
    for e in entries:
        m = ORBAX_STEP_DIR.fullmatch(e.name)
        if m and e.is_dir(follow_symlinks=False) and ORBAX_TMP not in e.name \
                and _orbax_kind(e.path) in ("step", "standard", "pytree"):
            out.append((int(m.group(2)), Path(e.path)))
    steps = [n for n, _ in out]
    if len(set(steps)) != len(steps):   # "7" and "step_7"
        dup = next(n for n in steps if steps.count(n) > 1)
        raise CheckpointError(f"{root}: several step directories for step {dup}; convert one of them")
    return sorted(out)


def from_orbax(src: os.PathLike | str, dst: os.PathLike | str, *, step: int | None = None,
               model_config: Any = None, skip_unknown: bool = False) -> ConvertReport:
    """Convert an Orbax checkpoint to shardckpt, bit exact, without a target.

    ``src`` is a ``StandardCheckpointer`` / ``PyTreeCheckpointer`` directory, one
    ``CheckpointManager`` step directory, or a ``CheckpointManager`` root (then every step
    becomes ``dst/step_<n>``, a shardckpt manager directory). Items: Orbax items ``model``,
    ``optimizer``, ... keep their names; a single tree (a standalone checkpoint, or a step's
    ``default`` / ``state`` item) whose top level has a ``model`` key is split into one item
    per top-level key, any other single tree becomes the ``model`` item. ``nnx.State`` trees
    lose the ``value`` level that Orbax shows for every ``nnx.Variable``, so the keys are the
    ones ``save_model`` writes. JSON items and Orbax metrics are kept (``orbax.json``,
    metrics); items of other handlers raise unless ``skip_unknown``. ``dst`` must not exist
    or be an empty directory. ``step`` defaults to the step directory's number (standalone:
    none). ``model_config`` (a dict) goes into ``config.json`` for ``load_model``.

    Paths may be relative or start with ``~``. The source is checked before Orbax reads it
    (no symlinks or special files inside, plain item and key names, declared array sizes
    this machine can hold); a failure raises a ``CheckpointError`` and leaves nothing at
    ``dst`` (a manager root converts all its steps or none).
    """
    src, dst = _local_path(src), _local_path(dst)
    kind = _orbax_kind(src)
    if kind is None:
        raise _neither(src)
    _check_dst(dst, src)
    report = ConvertReport(str(src), str(dst), "from_orbax", kind)
    with _quiet_orbax(), _as_our_errors(src):
        _check_source_tree(src)
        if kind == "manager":
            steps = _orbax_steps(src)
            if not steps:
                raise CheckpointError(f"{src}: an Orbax CheckpointManager directory without committed steps")
            with _staged(dst) as out:
                for n, d in steps:
                    _convert_one_from_orbax(d, _orbax_kind(d) or "step", out / f"step_{n}", dst / f"step_{n}", n,
                                            model_config, skip_unknown, report)
            return report
        if step is None and kind == "step":
            m = ORBAX_STEP_DIR.fullmatch(src.name)
            step = int(m.group(2)) if m else None
        with _staged(dst) as out:
            _convert_one_from_orbax(src, kind, out, dst, step, model_config, skip_unknown, report)
    return report


def _scalar_value(rec: Any) -> Any:
    """A manifest scalar leaf (format.md section 2) as its Python value."""
    if not isinstance(rec, dict):
        return rec
    t, v = rec.get("type"), rec.get("value")
    if t == "float":
        return float(v)
    if t == "int":
        return int(v)
    if t == "bool":
        return bool(v)
    if t == "none":
        return None
    return v


def _host_value(v: Any) -> Any:
    """Orbax writes jax arrays; keep numpy where jax would change the dtype (64-bit off)."""
    if isinstance(v, np.ndarray) and jax.dtypes.canonicalize_dtype(v.dtype) == v.dtype:
        return jax.device_put(v, jax.devices("cpu")[0])
    return v


def _check_key(key: Any, where: str) -> list[str]:
    """The parts of a manifest key that is about to become an Orbax tree path (Orbax joins
    the parts into parameter names, which are paths): none may be empty, ".", "..", or hold
    "/", "\\" or NUL."""
    parts = key.split(".") if isinstance(key, str) else [""]
    bad = next((p for p in parts if _unsafe_key_part(p)), None)
    if bad is not None:
        raise CheckpointError(f"{where}: key {key!r:.120} has a part {bad!r:.40} that is not a plain name "
                              "(empty, '.', '..', or with '/', '\\' or NUL); Orbax would turn it into a "
                              "path; refusing it")
    return parts


_LEAF = object()


def _nest(flat: dict[str, Any], sequences: list[str], nnx_values: bool, where: str) -> Any:
    root: dict = {}
    leaves: set[tuple[str, ...]] = set()
    for key, value in flat.items():
        parts = _check_key(key, where)
        node = root
        for i, part in enumerate(parts[:-1]):
            if tuple(parts[:i + 1]) in leaves:
                raise CheckpointError(f"{where}: key {key!r:.120} nests inside the leaf {'.'.join(parts[:i + 1])!r:.120}")
            node = node.setdefault(part, {})
        if parts[-1] in node:
            raise CheckpointError(f"{where}: key {key!r:.120} is both a leaf and a prefix of other keys")
        node[parts[-1]] = {"value": value} if nnx_values else value
        leaves.add(tuple(parts))
    seqs = set(sequences)

    def lists(node: Any, prefix: tuple[str, ...]) -> Any:
        if prefix in leaves or not isinstance(node, dict):
            return node
        out = {k: lists(v, (*prefix, k)) for k, v in node.items()}
        if ".".join(prefix) in seqs and all(k.isascii() and k.isdigit() for k in out):
            return [out[k] for k in sorted(out, key=int)]
        return out
    return lists(root, ())


def _item_trees(ck: Any, nnx_values: bool | None, prov: dict) -> dict[str, Any]:
    trees = {}
    for item in ck.items:
        check_name(item, f"{ck.where}: item")
        rec = ck.item_record(item)
        where = f"{ck.where}: item {item!r}"
        for key in [*rec.arrays, *rec.scalars]:   # before anything is read
            _check_key(key, where)
        flat = {k: _host_value(v) for k, v in ck.read_arrays(item).items()}
        for k, s in rec.scalars.items():
            value = _scalar_value(s)
            if value is not None:   # Orbax has no None leaves
                flat[k] = value
        info = prov["items"].get(item) or {}
        wrap = nnx_values if nnx_values is not None else info.get("nnx_values", True)
        trees[item] = _nest(dict(sorted(flat.items())), info.get("sequences", []), bool(wrap), where)
    return trees


def _has_str(tree: Any) -> bool:
    return any(isinstance(x, str) for x in jax.tree_util.tree_leaves(tree))


def _save_orbax_tree(path: Path, tree: Any, kind: str) -> None:
    ocp = _ocp()
    if kind == "pytree" or _has_str(tree):
        with ocp.PyTreeCheckpointer() as ck:   # synchronous
            ck.save(path, args=ocp.args.PyTreeSave(tree))
    else:
        with ocp.StandardCheckpointer() as ck:
            ck.save(path, tree)
            ck.wait_until_finished()


def _provenance(ck: Any) -> dict:
    """``orbax.json`` of a converted checkpoint, checked (it names Orbax items, which become
    directories): {} for a native checkpoint; a malformed record is our error."""
    where = f"{ck.where}/{PROVENANCE}"
    try:
        prov = ck.read_json(PROVENANCE)
    except RecursionError:
        raise CheckpointError(f"{where}: nests JSON too deeply; refusing it") from None
    if prov is None:
        return {"items": {}, "json_items": {}}
    if not isinstance(prov, dict) or json_depth(prov) > limits.MAX_JSON_DEPTH + 2:
        raise CheckpointError(f"{where}: not a provenance record (a JSON object at most {limits.MAX_JSON_DEPTH} deep)")
    items, json_items = prov.get("items") or {}, prov.get("json_items") or {}
    if prov.get("kind") not in (None, *_KINDS):
        raise CheckpointError(f"{where}: unknown Orbax kind {prov.get('kind')!r:.40}")
    if not isinstance(items, dict) or not isinstance(json_items, dict):
        raise CheckpointError(f"{where}: items and json_items must be JSON objects")
    for name, info in items.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: item {name!r:.60} is not a JSON object")
        orbax_item = info.get("orbax_item")
        if orbax_item is not None:
            check_name(orbax_item, f"{where}: orbax_item of {name!r:.60}")
        seqs = info.get("sequences", [])
        if not isinstance(seqs, list) or not all(isinstance(x, str) for x in seqs):
            raise CheckpointError(f"{where}: sequences of {name!r:.60} must be a list of keys")
    for name in json_items:
        check_name(name, f"{where}: JSON item")
    return {**prov, "items": items, "json_items": json_items}


def _to_orbax_single(ck: Any, dst: Path, final: Path, kind: str, nnx_values: bool | None,
                     report: ConvertReport) -> None:
    prov = _provenance(ck)
    trees = _item_trees(ck, nnx_values, prov)
    infos = prov["items"]
    if set(trees) == {"model"} and not (infos.get("model") or {}).get("split"):
        tree = trees["model"]
    else:
        tree = trees
    try:
        _save_orbax_tree(dst, tree, kind)
    except CheckpointError:
        raise
    except Exception as e:
        raise _orbax_failure(final, "Orbax could not write it", e) from e
    report.written.append(str(final))
    report.steps.append(ck.step)
    report.items = sorted(trees)


def _to_orbax_manager(cks: list[Any], dst: Path, final: Path, nnx_values: bool | None, report: ConvertReport) -> None:
    ocp = _ocp()
    steps = [ck.step if ck.step is not None else 0 for ck in cks]
    if len(set(steps)) != len(steps):
        dup = next(n for n in steps if steps.count(n) > 1)
        raise CheckpointError(f"{final}: several checkpoints record step {dup}; an Orbax CheckpointManager "
                              "holds one per step")
    if any(n < 0 for n in steps):
        raise CheckpointError(f"{final}: step {min(steps)}: an Orbax CheckpointManager has no negative steps")
    # The manager writes metrics (<step>/metrics/metrics) only when it tracks the best step;
    # best_fn changes nothing else here (max_to_keep is None: every step is kept).
    options = ocp.CheckpointManagerOptions(best_fn=lambda metrics: 0.0) if any(ck.metrics for ck in cks) else None
    for ck in cks:   # every name checked before the manager writes anything
        _provenance(ck)
        for item in ck.items:
            check_name(item, f"{ck.where}: item")
    try:
        with ocp.CheckpointManager(dst, options=options) as mngr:
            for ck, step in zip(cks, steps):
                prov = _provenance(ck)
                trees = _item_trees(ck, nnx_values, prov)
                infos = prov["items"]
                args: dict[str, Any] = {}
                orbax_items: dict[str, Any] = {}
                for name, tree in trees.items():
                    info = infos.get(name) or {}
                    if info.get("split") and info.get("orbax_item"):
                        orbax_items.setdefault(info["orbax_item"], {})[name] = tree
                    else:
                        orbax_items[info.get("orbax_item") or name] = tree
                for name, tree in orbax_items.items():
                    handler = _handler_of(prov.get("handlers"), name)
                    pytree = "PyTreeCheckpointHandler" in handler or _has_str(tree)
                    args[name] = ocp.args.PyTreeSave(tree) if pytree else ocp.args.StandardSave(tree)
                for name, data in prov["json_items"].items():
                    if name not in args:
                        args[name] = ocp.args.JsonSave(data)
                metrics = ck.metrics or None
                mngr.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)
                mngr.wait_until_finished()
                report.written.append(str(final / str(step)))
                report.steps.append(step)
                report.items = sorted(set(report.items) | set(args))
    except CheckpointError:
        raise
    except Exception as e:
        raise _orbax_failure(final, "Orbax could not write it", e) from e


def to_orbax(src: os.PathLike | str, dst: os.PathLike | str, *, kind: str | None = None,
             nnx_values: bool | None = None) -> ConvertReport:
    """Convert a shardckpt checkpoint to Orbax, bit exact (bfloat16, PRNG keys, optax state).

    ``kind``: ``"standard"`` (default for a checkpoint) writes a ``StandardCheckpointer``
    directory at ``dst`` (the ``model`` item alone as the tree, several items as
    ``{"model": ..., "optimizer": ...}``); ``"pytree"`` the same with ``PyTreeCheckpointer``;
    ``"manager"`` (default for a shardckpt manager directory, or for a checkpoint converted
    from an Orbax step) a ``CheckpointManager`` root ``dst`` with ``dst/<step>/<item>``.
    A checkpoint converted from Orbax is written back in its original layout.
    ``nnx_values`` (default: as read from Orbax, else True) writes every leaf as
    ``{"value": leaf}``, the layout Orbax gives ``nnx.state(...)``, so
    ``StandardCheckpointer().restore(dst, nnx.state(abstract_model))`` works; False writes
    ``state.to_pure_dict()``'s layout.

    Paths may be relative or start with ``~``. Item names and keys are checked before they
    become Orbax paths; a failure raises a ``CheckpointError`` and leaves nothing at ``dst``
    and no ``.orbax-checkpoint-tmp`` directory beside it.
    """

    src, dst = _local_path(src), _local_path(dst)
    what = shardckpt_kind(src)
    if what is None:
        if _orbax_kind(src) is not None:
            raise CheckpointError(f"{src}: already an Orbax checkpoint")
        raise _neither(src)
    if kind not in (None, "standard", "pytree", "manager"):
        raise CheckpointError(f"kind={kind!r}: expected 'standard', 'pytree' or 'manager'")
    _check_dst(dst, src)
    with _quiet_orbax(), _as_our_errors(src):
        if what == "manager":
            cks = [open_checkpoint(p) for _, p in _shardckpt_steps(src)]
            kind = kind or "manager"
        else:
            cks = [open_checkpoint(src)]
            recorded = _provenance(cks[0]).get("kind")
            kind = kind or ("manager" if recorded in ("step", "manager") else recorded) or "standard"
        report = ConvertReport(str(src), str(dst), "to_orbax", kind)
        if kind != "manager" and len(cks) > 1:
            raise CheckpointError(f"{src}: {len(cks)} checkpoints; only kind='manager' holds several steps")
        with _staged(dst) as out:
            if kind == "manager":
                _to_orbax_manager(cks, out, dst, nnx_values, report)
            else:
                _to_orbax_single(cks[0], out, dst, kind, nnx_values, report)
    return report


def convert(src: os.PathLike | str, dst: os.PathLike | str, **kwargs: Any) -> ConvertReport:
    """``from_orbax`` when ``src`` is an Orbax checkpoint, ``to_orbax`` when it is ours."""
    if _orbax_kind(src) is not None:
        return from_orbax(src, dst, **{k: v for k, v in kwargs.items()
                                       if k in ("step", "model_config", "skip_unknown")})
    if shardckpt_kind(src) is not None:
        return to_orbax(src, dst, **{k: v for k, v in kwargs.items() if k in ("kind", "nnx_values")})
    raise _neither(_local_path(src))
