"""Metrics and JSON metadata of a save, checked before anything is written.

A metric a checkpoint could not hold, or that retention could not rank, fails the save
before any byte is written (``check_metrics``); what the manifest stores is strict JSON
(``plain_metrics``: NaN and infinities as strings); metadata files (``config.json``...) are
serialised by ``json_bytes``, with NumPy and JAX scalars and arrays as their values.
"""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from shardckpt.errors import CheckpointError
from shardckpt.format.manifest import laid_out


def json_bytes(obj: Any, name: str) -> bytes:
    """A metadata file's bytes: JSON laid out like the manifest (``laid_out``: the C
    encoder, one member a line down a few levels), NumPy and JAX values as their values."""
    try:
        return laid_out(obj, _JSON_FILE_ENCODE).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: value is not JSON-serialisable ({e})") from e


def _json_default(o: Any):
    """NumPy and JAX scalars and arrays as their values, paths as strings."""
    if isinstance(o, (np.generic, jax.Array)) and np.ndim(o) == 0:
        return np.asarray(o).item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


_JSON_FILE_ENCODE = json.JSONEncoder(separators=(", ", ": "), default=_json_default, allow_nan=True).encode


MAX_METRIC_DEPTH = 32


def check_metrics(metrics: Any, where: str = "metrics") -> None:
    """Refuse, before anything is written, metrics that a checkpoint could not hold or that
    its readers could not rank: a dict with string keys whose values are JSON values
    (numbers, strings, booleans, None, lists and dicts with string keys; NumPy / JAX
    scalars and arrays as their values), numbers within float range, nesting at most
    ``MAX_METRIC_DEPTH`` deep. NaN and infinities are accepted (a diverged loss must not
    fail a save): they are stored as "nan" / "inf"."""
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{where}: expected a dict of name -> value, got {type(metrics).__name__}")
    stack: list[tuple[Any, str, int]] = []
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: metric name {k!r:.80} is a {type(k).__name__}; names must be strings")
        stack.append((v, k, 1))
    while stack:
        v, name, depth = stack.pop()
        if depth > MAX_METRIC_DEPTH:
            raise CheckpointError(f"{where}: metric {name[:200]!r} is nested more than {MAX_METRIC_DEPTH} deep")
        if isinstance(v, (np.generic, jax.Array, np.ndarray)):
            try:
                v = np.asarray(v)
                if v.dtype.kind not in "biufU":
                    raise TypeError(f"dtype {v.dtype}")
                v = v.tolist() if v.ndim else v.item()
            except Exception as e:  # a typed PRNG key, a deleted buffer, ...
                raise CheckpointError(f"{where}: metric {name[:200]!r} is not JSON-serialisable ({e})") from e
        if v is None or isinstance(v, (bool, str)):
            continue
        if isinstance(v, int):
            try:
                float(v)
            except OverflowError:
                raise CheckpointError(f"{where}: metric {name[:200]!r} is an integer of {v.bit_length()} bits, "
                                      "outside float range (readers rank metrics as floats)") from None
            continue
        if isinstance(v, float):
            continue
        if isinstance(v, (list, tuple)):
            stack.extend((x, f"{name}[{i}]", depth + 1) for i, x in enumerate(v))
            continue
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise CheckpointError(f"{where}: metric {name[:200]!r} has the key {k!r:.80}; keys must be strings")
                stack.append((x, f"{name}.{k}", depth + 1))
            continue
        raise CheckpointError(f"{where}: metric {name[:200]!r} is a {type(v).__name__}, not JSON-serialisable "
                              "(use numbers, strings, booleans, lists or dicts)")


def plain_metrics(metrics: dict) -> dict:
    """The metrics as the manifest stores them (strict JSON). ``check_metrics`` ran on
    every save's metrics; metrics carried over from a previous version are as it read them
    (a hostile one is made safe here: anything unstorable becomes its bounded repr)."""
    out = {}
    for k, v in metrics.items():
        try:
            check_metrics({str(k): v})
            out[str(k)] = _finite_json(json.loads(json_bytes(v, "metrics")))
        except (CheckpointError, RecursionError, ValueError):
            out[str(k)] = _short_repr(v)
    return out


def _short_repr(v: Any) -> str:
    try:
        return reprlib.repr(v)
    except Exception:  # noqa: BLE001
        return f"<{type(v).__name__}>"


def _finite_json(v: Any) -> Any:
    """The manifest is strict JSON: a NaN or infinite metric (a diverged loss) is kept as
    its repr string ("nan", "inf") instead of failing the save."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {k: _finite_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite_json(x) for x in v]
    return v
