"""Export of a checkpoint's model weights as one safetensors file (``shardckpt export``)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import jax
import numpy as np

from shardckpt.errors import CheckpointError
from shardckpt.loading.open import open_checkpoint
from shardckpt.store.registry import is_uri, local_root
from shardckpt.tools.convert import ConvertReport, fsync_dir

#: numpy dtype name -> safetensors dtype (https://github.com/huggingface/safetensors)
_ST_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
              "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
              "float64": "F64", "int64": "I64", "uint64": "U64", "float8_e5m2": "F8_E5M2",
              "float8_e4m3fn": "F8_E4M3"}

#: The formats ``shardckpt export --format`` writes.
FORMATS = ("safetensors",)

#: The header key safetensors reserves for its string metadata: an array of that name would
#: make the file unreadable (safetensors' own writer accepts it), so it is refused.
_RESERVED_KEY = "__metadata__"
_FILE_MODE = 0o644   # before the umask, as the checkpoint's own files (store/local.py)
_LISTED = 8          # keys named in one note; the rest are counted


def is_rng_state(key: str) -> bool:
    """An ``nnx.Rngs`` stream's state (``<path>.rngs.count``, ``<path>.rngs.key``, and
    ``rngs.<stream>.count`` / ``.key`` of a module holding an ``nnx.Rngs``): not a weight."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] in ("count", "key") and "rngs" in parts[:-1]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def export_safetensors(src: os.PathLike | str, out: os.PathLike | str, *, item: str = "model",
                       overwrite: bool = False, include_rngs: bool = False) -> ConvertReport:
    """Write the arrays of ``item`` of a shardckpt checkpoint as one safetensors file.

    Keys are the dotted keys (``layers.0.attn.q_proj.kernel``), dtypes the real ones
    (bfloat16 stays bfloat16). Left out, each with a note: RNG state (``nnx.Rngs`` streams'
    ``count`` and ``key``, and every typed PRNG key array) unless ``include_rngs`` (which
    keeps the numeric ones: counts and raw ``uint32`` keys; typed keys have no safetensors
    dtype), scalar leaves and dtypes safetensors has no name for. An array keyed
    ``__metadata__`` (the name safetensors reserves for its header) is refused, before
    anything is written: no reader could open the file. An existing ``out`` is refused unless
    ``overwrite``. The file is written in a private directory beside ``out`` with the
    permissions of the checkpoint's own files (0o644 before the umask), then renamed into
    place: a failure leaves ``out`` as it was. Paths may be relative or start with ``~``.
    """
    try:
        from safetensors.numpy import save_file
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise CheckpointError("export --format safetensors needs safetensors: pip install 'shardckpt[export]'") from e
    ck = open_checkpoint(src)       # an Orbax directory or anything else: our error, saying what it is
    if is_uri(out):
        raise CheckpointError(f"{out}: export writes a local file (copy it to the store afterwards)")
    try:
        out = local_root(out)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{out!r:.80}: not a local path ({e})") from e
    _check_out(out, overwrite)
    report = ConvertReport(ck.where, str(out), "export", "safetensors", items=[item])
    rec = ck.item_record(item)
    if _RESERVED_KEY in rec.arrays:
        raise CheckpointError(f"{ck.where}: item {item!r}: an array keyed {_RESERVED_KEY!r}, the name safetensors "
                              "reserves for its metadata header; no safetensors reader could open the file, so "
                              "nothing was written (rename that leaf, or export another --item)")
    tensors: dict[str, np.ndarray] = {}
    rngs: list[str] = []
    keys: list[str] = []
    for key, value in ck.read_arrays(item).items():
        typed_key = jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
        if typed_key and include_rngs:
            keys.append(key)
            continue
        if (typed_key or is_rng_state(key)) and not include_rngs:
            rngs.append(key)
            continue
        arr = np.require(np.asarray(value), requirements="C")   # ascontiguousarray makes 0-d 1-d
        if arr.dtype.name not in _ST_DTYPES:
            report.notes.append(f"skipped {key}: safetensors has no dtype {arr.dtype.name}")
            continue
        tensors[key] = arr
    if rngs:
        report.notes.append(f"skipped {len(rngs)} RNG state arrays (PRNG keys and counts, not weights; "
                            f"--include-rngs keeps the numeric ones): {_listed(rngs)}")
    if keys:
        report.notes.append(f"skipped {len(keys)} typed PRNG key arrays (safetensors has no key dtype): "
                            f"{_listed(keys)}")
    for key in rec.scalars:
        report.notes.append(f"skipped {key}: a non-array leaf")
    meta = {"format": "np", "source": "shardckpt", "item": item}
    if ck.step is not None:
        meta["step"] = str(ck.step)
    _write_file(out, lambda path: save_file(tensors, path, metadata=meta))
    report.written.append(str(out))
    report.steps.append(ck.step)
    return report


def _check_out(out: Path, overwrite: bool) -> None:
    if os.path.isdir(out) and not os.path.islink(out):
        raise CheckpointError(f"{out}: a directory; name the file to write")
    if os.path.lexists(out) and not overwrite:
        raise CheckpointError(f"{out}: exists; refusing to overwrite it")
    if not os.path.isdir(out.parent):
        raise CheckpointError(f"{out}: its directory {out.parent} does not exist")


def _write_file(out: Path, write) -> None:
    """``write(path)`` a new file, then rename it onto ``out``. The path is in a private
    directory beside ``out`` (``mkdtemp``), so the writer neither follows nor replaces
    anything it did not create; the file gets the mode a checkpoint file gets (0o644 less
    the umask, measured on a file created here first: safetensors itself leaves 0o600). On
    any failure that directory is removed and ``out`` is untouched."""
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{out.name[:100]}.tmp-", dir=out.parent)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write beside it ({e.strerror or e})") from e
    try:
        tmp = os.path.join(tmp_dir, "export")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)   # 0o644 less the umask, as a shard file gets
        finally:
            os.close(fd)
        write(tmp)   # safetensors writes a file of its own (0o600) and renames it over tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.isdir(out) and not os.path.islink(out):   # appeared meanwhile
            raise CheckpointError(f"{out}: a directory; name the file to write")
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write it ({e.strerror or e})") from e
    except Exception as e:   # the writer's own errors (safetensors: SafetensorError)
        raise CheckpointError(f"{out}: cannot write it ({type(e).__name__}: {e!s:.200})") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
