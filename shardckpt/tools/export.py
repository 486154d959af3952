"""Export of a checkpoint's model weights as one safetensors file (``shardckpt export``)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from shardckpt.errors import CheckpointError
from shardckpt.loading.open import open_checkpoint
from shardckpt.tools.convert import ConvertReport

#: numpy dtype name -> safetensors dtype (https://github.com/huggingface/safetensors)
_ST_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
              "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
              "float64": "F64", "int64": "I64", "uint64": "U64", "float8_e5m2": "F8_E5M2",
              "float8_e4m3fn": "F8_E4M3"}


def export_safetensors(src: os.PathLike | str, out: os.PathLike | str, *, item: str = "model",
                       overwrite: bool = False) -> ConvertReport:
    """Write the arrays of ``item`` of a shardckpt checkpoint as one safetensors file.

    Keys are the dotted keys (``layers.0.attn.q_proj.kernel``), dtypes the real ones
    (bfloat16 stays bfloat16). PRNG keys, scalar leaves and dtypes safetensors has no name
    for are skipped, each with a note. An existing ``out`` is refused unless ``overwrite``.
    The file is written beside ``out`` and renamed into place.
    """
    try:
        from safetensors.numpy import save_file
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise CheckpointError("export --safetensors needs safetensors: pip install 'shardckpt[export]'") from e
    src, out = Path(src), Path(out)
    ck = open_checkpoint(src)       # an Orbax directory or anything else: our error, saying what it is
    if os.path.lexists(out) and not overwrite:
        raise CheckpointError(f"{out}: exists; refusing to overwrite it")
    report = ConvertReport(str(src), str(out), "export", "safetensors", items=[item])
    rec = ck.item_record(item)
    tensors: dict[str, np.ndarray] = {}
    for key, value in ck.read_arrays(item).items():
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            report.notes.append(f"skipped {key}: a PRNG key ({value.dtype}), not a weight")
            continue
        arr = np.require(np.asarray(value), requirements="C")   # ascontiguousarray makes 0-d 1-d
        if arr.dtype.name not in _ST_DTYPES:
            report.notes.append(f"skipped {key}: safetensors has no dtype {arr.dtype.name}")
            continue
        tensors[key] = arr
    for key in rec.scalars:
        report.notes.append(f"skipped {key}: a non-array leaf")
    meta = {"format": "np", "source": "shardckpt", "item": item}
    if ck.step is not None:
        meta["step"] = str(ck.step)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    report.written.append(str(out))
    report.steps.append(ck.step)
    return report
