"""Read-only views of checkpoints for the ``shardckpt`` command: what a checkpoint holds
(``inspect``), what a manager directory holds (``ls``), what a ``gc`` would remove and how
two checkpoints differ (``diff``).

Every function returns plain JSON-ready data (the CLI prints it as tables or ``--json``)
and never changes anything on disk: in particular nothing here constructs a
``CheckpointManager``, whose constructor removes leftovers.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import replace
from typing import Any

import jax
import numpy as np

from shardckpt.catalog import Catalog
from shardckpt.errors import CheckpointError
from shardckpt.loading.legacy import LEGACY_FILES, PICKLE_META
from shardckpt.loading.open import STEP_CHECKPOINT, layout_of, open_checkpoint
from shardckpt.progress import count_progress
from shardckpt.store.registry import open_store, resolve
from shardckpt.tree import decode_scalar


def _shape(shape) -> list[int]:
    return [int(d) for d in shape]


# --- inspect ---------------------------------------------------------------------------------

def describe(path: os.PathLike | str) -> dict[str, Any]:
    """Everything ``inspect`` shows about one checkpoint (ours or the legacy layout).

    Raises ``CheckpointError`` when ``path`` cannot be opened at all; smaller troubles
    (an unreadable chunk index, a config that is not JSON) go into ``warnings``."""
    ck = open_checkpoint(path)
    warnings: list[str] = []
    out: dict[str, Any] = {"path": ck.where, "layout": "legacy" if ck.legacy else "shardckpt",
                           "step": ck.step, "warnings": warnings}
    index: dict = {}
    if not ck.legacy:
        m = ck.manifest
        out.update(created=_field(m.created), versions={str(k): _field(v) for k, v in m.writers.items()},
                   host_count=m.host_count)
        try:
            index = ck.index()
        except CheckpointError as e:
            warnings.append(str(e))
    items = {}
    for item in ck.items:
        try:
            rec = ck.item_record(item)
        except CheckpointError as e:
            rec = getattr(ck, "_records", {}).get(item)   # legacy optimizer beside a pickle
            warnings.append(str(e))
            if rec is None:
                continue
        arrays = []
        for key, spec in rec.arrays.items():
            chunks = index.get(item, {}).get(key)
            arrays.append({"key": key, "dtype": spec.dtype, "shape": _shape(spec.shape),
                           "nbytes": spec.stored_nbytes if spec.stored_dtype else 0,
                           "chunks": None if chunks is None else len(chunks),
                           "files": sorted({f for f, _ in chunks}) if chunks else []})
        scalars = {}
        for key, r in rec.scalars.items():
            try:
                scalars[key] = decode_scalar(key, r)
            except CheckpointError:
                scalars[key] = repr(r)
        items[item] = {"arrays": arrays, "scalars": scalars,
                       "nbytes": sum(a["nbytes"] for a in arrays)}
    out["items"] = items
    files = []
    if ck.legacy:
        present = {e.name: e for e in ck.store.list(ck.name)}
        for fname in [*LEGACY_FILES.values(), PICKLE_META, "config.json", "metrics.json", "extra.json"]:
            e = present.get(fname)
            if e is not None and not e.is_dir and not e.is_link:
                files.append({"name": fname, "size": e.size, "item": None, "writer": {}})
        out["files"] = files
        out["meta_files"] = []
    else:
        for fname, rec in sorted(ck.manifest.files.items()):
            files.append({"name": fname, "size": rec.size, "item": rec.item, "xxh3_64": rec.xxh3_64,
                          "writer": _plain(rec.writer)})
        out["files"] = files
        out["meta_files"] = [{"name": n, "size": r.size, "xxh3_64": r.xxh3_64}
                             for n, r in sorted(ck.manifest.meta_files.items())]
    out["total_bytes"] = sum(f["size"] for f in files) + sum(f["size"] for f in out["meta_files"])
    out["writers"] = _writers(files)
    for name, key in (("config.json", "config"), ("metrics.json", "metrics_file"), ("extra.json", "extra")):
        try:
            out[key] = _plain(ck.read_json(name, None))
        except CheckpointError as e:
            out[key] = None
            warnings.append(str(e))
    out["metrics"] = _plain(ck.metrics)
    return out


def _writers(files: list[dict]) -> list[dict]:
    """Distinct writers (backend, name, node, pid, host) with the shard count of each. A
    hostile manifest may put anything in a writer record: each field comes out as a short
    string (or None), the pid as an int when it is one."""
    seen: dict[tuple, dict] = {}
    for f in files:
        w = f.get("writer") or {}
        if not isinstance(w, dict) or not w:
            continue
        fields = {k: _field(w.get(k)) for k in ("backend", "writer", "node_id", "host")}
        pid = w.get("pid")
        fields["pid"] = pid if isinstance(pid, int) and not isinstance(pid, bool) else _field(pid)
        ident = tuple(str(fields[k]) for k in ("backend", "writer", "node_id", "host", "pid"))
        row = seen.setdefault(ident, {**fields, "shards": 0, "bytes": 0})
        row["shards"] += 1
        row["bytes"] += f["size"]
    return list(seen.values())


MAX_FIELD_CHARS = 200


def _field(v: Any) -> str | None:
    """A writer field as text: None stays None, a string is cut to ``MAX_FIELD_CHARS``,
    anything else (a number, a list, a dict) is its compact JSON, cut likewise."""
    if v is None:
        return None
    if not isinstance(v, str):
        try:
            v = json.dumps(_plain(v), separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            v = f"<{type(v).__name__}>"
    return v if len(v) <= MAX_FIELD_CHARS else v[:MAX_FIELD_CHARS] + "…"


MAX_PLAIN_DEPTH = 32


def _plain(v: Any, depth: int = 0) -> Any:
    """JSON-safe copy of manifest data, which came from JSON but may be hostile: non-finite
    floats become "nan"/"inf", anything nested deeper than ``MAX_PLAIN_DEPTH`` becomes the
    string "<nested too deep>" (JSON allows ~1,000 levels; printing them would recurse)."""
    if isinstance(v, (dict, list, tuple)) and depth >= MAX_PLAIN_DEPTH:
        return "<nested too deep>"
    if isinstance(v, dict):
        return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


# --- ls ------------------------------------------------------------------------------------

def _info_dict(i) -> dict:
    return {"step": i.step, "name": i.name, "path": str(i.path), "created": i.created,
            "metrics": _plain(i.metrics), "bytes": i.nbytes, "files": i.files, "items": list(i.items),
            "legacy": i.legacy, "foreign": list(i.foreign), "latest": False, "best": False}


def _leftover_dict(lo, catalog) -> dict:
    return {"name": lo.name, "path": str(catalog.store.location(lo.name)), "kind": lo.kind,
            "checkpoint": lo.checkpoint, "host": lo.host, "pid": lo.pid, "owner_alive": lo.owner_alive,
            "age_s": lo.age_s, "action": lo.action, "reason": lo.reason}


def scan(directory: Any, prefix: str = "step") -> tuple[list[dict], list[dict]]:
    """(committed checkpoints oldest first, step directories that are not checkpoints), as
    the Catalog lists them for the manager."""
    catalog = Catalog(open_store(directory), prefix)
    infos, invalid = catalog.scan()
    return ([_info_dict(i) for i in infos],
            [{"name": b.name, "path": str(b.path), "problem": b.problem} for b in invalid])


def leftovers(directory: Any, prefix: str = "step", *, now: float | None = None) -> list[dict]:
    """What dead saves left, with what cleanup does to each ("remove", "restore" or
    "keep": the owner still runs, or the save may still be running)."""
    catalog = Catalog(open_store(directory), prefix)
    return [_leftover_dict(lo, catalog) for lo in catalog.leftovers(now)]


def list_dir(directory: Any, prefix: str = "step", best_metric: str | None = None,
             best_mode: str = "min") -> dict[str, Any]:
    """What ``ls`` shows: checkpoints (with latest/best marks), unreadable step
    directories and leftovers."""
    store = open_store(directory)
    catalog = Catalog(store, prefix)
    layout = layout_of(store, "")
    if layout.kind == "checkpoint":          # one checkpoint: show it, as the listing of its parent would
        parent, name = resolve(directory)
        one, problem = Catalog(parent, prefix).info(name, -1)
        found, bad = ([replace(one, step=one_step(parent, name, one))] if one else []), []
    else:
        found, bad = catalog.scan()
    infos = [_info_dict(i) for i in found]
    if infos:
        infos[-1]["latest"] = True
    ranked = Catalog.ranked_best(found, best_metric, best_mode) if best_metric else []
    if ranked:
        next(i for i in infos if i["step"] == ranked[0].step)["best"] = True
    return {"directory": str(directory), "prefix": prefix, "best_metric": best_metric,
            "best_mode": best_mode, "checkpoints": infos, "layout": layout.kind, "orbax": layout.orbax,
            "invalid": [{"name": b.name, "path": str(b.path), "problem": b.problem} for b in bad],
            "leftovers": [_leftover_dict(lo, catalog) for lo in catalog.leftovers()],
            "total_bytes": sum(i["bytes"] for i in infos)}


def one_step(store, name: str, info) -> int:
    """The step a lone checkpoint is shown as: its directory's number, else its manifest's."""
    m = STEP_CHECKPOINT.fullmatch(name)
    if m:
        return int(m.group(2))
    try:
        step = open_checkpoint(store.where(name)).step
    except CheckpointError:
        step = None
    return step if isinstance(step, int) else -1


def gc_plan(directory: Any, prefix: str, max_to_keep: int | None, best_metric: str | None,
            best_mode: str, best_to_keep: int) -> dict[str, Any]:
    """What ``gc`` does, decided once: the leftovers to remove or restore and the steps to
    delete. ``gc --dry-run`` prints this plan; ``gc`` carries out exactly this plan."""
    catalog = Catalog(open_store(directory), prefix)
    infos, _ = catalog.scan()
    kept, doomed = Catalog.retention_plan(infos, max_to_keep, best_metric, best_mode, best_to_keep)
    planned = catalog.leftovers()
    return {"catalog": catalog, "leftover_objs": planned, "doomed": doomed,
            "leftovers": [_leftover_dict(lo, catalog) for lo in planned if lo.action != "keep"],
            "kept_leftovers": [_leftover_dict(lo, catalog) for lo in planned if lo.action == "keep"],
            "deleted_steps": [i.step for i in doomed], "kept_steps": [i.step for i in kept],
            "protected": [{"step": i.step, "name": i.name, "legacy": i.legacy, "foreign": list(i.foreign)}
                          for i in infos if i.protected],
            "names": {i.step: i.name for i in infos}}


def run_gc(plan: dict[str, Any]) -> dict[str, Any]:
    """Carry out ``gc_plan``'s plan; returns what was done (leftovers someone else removed
    meanwhile, or steps another process deleted first, are reported as not done)."""
    catalog = plan["catalog"]
    failed: list = []
    todo = [lo for lo in plan["leftover_objs"] if lo.action != "keep"]
    done, deleted = [], []
    with count_progress(f"gc {catalog.store.where()}", len(todo) + len(plan["doomed"])) as step:
        for lo in todo:
            done += catalog.carry_out([lo], failed)
            step()
        for info in plan["doomed"]:
            try:
                if catalog.delete(info):
                    deleted.append(info.step)
            except CheckpointError as e:
                failed.append((info, str(e)))
            step()
    done_leftovers = [_leftover_dict(lo, catalog) for lo in done]
    return {"leftovers": done_leftovers, "deleted_steps": deleted,
            "failed": [{"name": getattr(x, "name", ""), "error": why} for x, why in failed]}


def format_time(created: str) -> str:
    """The manifest's UTC ISO time as local time, to the second."""
    try:
        t = datetime.datetime.fromisoformat(created)
    except (TypeError, ValueError):
        return created or "?"
    if t.tzinfo is not None:
        t = t.astimezone()
    return t.strftime("%Y-%m-%d %H:%M:%S")


# --- diff ----------------------------------------------------------------------------------

DIFF_BATCH_BYTES = 256 << 20     # arrays read per round from each side


def _raw(x: Any) -> np.ndarray:
    """Host array of a value read from a checkpoint (typed PRNG keys as their key data)."""
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.ascontiguousarray(np.asarray(x))


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8).reshape(-1) if a.size else np.zeros(0, np.uint8)


def compare_arrays(a: Any, b: Any) -> dict[str, Any]:
    """Bit equality, the number of elements whose bits differ and the largest absolute
    difference (None where the dtype has no numeric meaning) of two host arrays of one
    shape and dtype."""
    a, b = _raw(a), _raw(b)
    if np.array_equal(_bits(a), _bits(b)):
        return {"equal_bits": True, "differing": 0, "max_abs_diff": 0.0}
    n = a.size
    ea = a.reshape(-1).view(np.uint8).reshape(n, -1)
    eb = b.reshape(-1).view(np.uint8).reshape(n, -1)
    differing = int(np.any(ea != eb, axis=1).sum())
    try:
        wide = np.complex128 if a.dtype.kind == "c" else np.float64
        fa, fb = a.astype(wide).reshape(-1), b.astype(wide).reshape(-1)
    except (TypeError, ValueError):   # raw bytes (a legacy V2 array, ...): no numeric distance
        return {"equal_bits": False, "differing": differing, "max_abs_diff": None}
    with np.errstate(invalid="ignore", over="ignore"):
        same = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
        dist = np.abs(fa - fb)
    # Equal values with other bits (0.0 / -0.0, NaN payloads) are 0 apart; a NaN against a
    # number, or infinities of opposite sign, infinitely far.
    dist = np.where(same, 0.0, np.where(np.isnan(dist), np.inf, dist))
    return {"equal_bits": False, "differing": differing, "max_abs_diff": float(dist.max())}


def diff(path_a: os.PathLike | str, path_b: os.PathLike | str, *, atol: float = 0.0,
         verify: bool = True) -> dict[str, Any]:
    """Which arrays (and scalar leaves) of two checkpoints differ, item by item.

    Each compared key gets a status: ``equal`` (same bits), ``close`` (max abs diff <=
    ``atol`` > 0), ``differs``, ``shape``/``dtype`` (not comparable). ``identical`` is True
    when every key of both is ``equal`` or ``close`` and no key or item is on one side only.
    """
    a, b = open_checkpoint(path_a), open_checkpoint(path_b)
    result: dict[str, Any] = {"a": str(path_a), "b": str(path_b), "atol": atol, "items": {},
                              "only_in_a_items": [i for i in a.items if i not in b.items],
                              "only_in_b_items": [i for i in b.items if i not in a.items]}
    for item in [i for i in a.items if i in b.items]:
        ra, rb = a.item_record(item), b.item_record(item)
        rows: list[dict] = []
        common = []
        for key, sa in ra.arrays.items():
            sb = rb.arrays.get(key)
            if sb is None:
                if key in rb.scalars:
                    rows.append({"key": key, "status": "dtype", "a": sa.dtype,
                                 "b": f"scalar {rb.scalars[key].get('type')}"})
                continue
            if sa.dtype != sb.dtype:
                rows.append({"key": key, "status": "dtype", "a": sa.dtype, "b": sb.dtype})
            elif sa.shape != sb.shape:
                rows.append({"key": key, "status": "shape", "a": _shape(sa.shape), "b": _shape(sb.shape)})
            else:
                common.append(key)
        for batch in _batches(common, ra.arrays):
            va = a.read_arrays(item, batch, verify=verify)
            vb = b.read_arrays(item, batch, verify=verify)
            for key in batch:
                c = compare_arrays(va.pop(key), vb.pop(key))
                mad = c["max_abs_diff"]
                if c["equal_bits"]:
                    status = "equal"
                elif atol > 0 and mad is not None and mad <= atol:
                    status = "close"
                else:
                    status = "differs"
                rows.append({"key": key, "status": status, "dtype": ra.arrays[key].dtype,
                             "shape": _shape(ra.arrays[key].shape), **c})
        for key, va in ra.scalars.items():
            if key in rb.arrays:
                rows.append({"key": key, "status": "dtype", "a": f"scalar {va.get('type')}",
                             "b": rb.arrays[key].dtype})
            elif key in rb.scalars:
                same = va == rb.scalars[key]
                rows.append({"key": key, "status": "equal" if same else "differs", "scalar": True,
                             "a": _plain(va.get("value")), "b": _plain(rb.scalars[key].get("value"))})
        keys_a = set(ra.arrays) | set(ra.scalars)
        keys_b = set(rb.arrays) | set(rb.scalars)
        order = {k: n for n, k in enumerate([*ra.arrays, *ra.scalars])}
        rows.sort(key=lambda r: order.get(r["key"], 0))
        result["items"][item] = {"keys": rows, "only_in_a": sorted(keys_a - keys_b),
                                 "only_in_b": sorted(keys_b - keys_a)}
    result["identical"] = not (result["only_in_a_items"] or result["only_in_b_items"]) and all(
        not it["only_in_a"] and not it["only_in_b"] and all(r["status"] in ("equal", "close") for r in it["keys"])
        for it in result["items"].values())
    return result


def _batches(keys: list[str], specs: dict) -> list[list[str]]:
    out, cur, size = [], [], 0
    for k in keys:
        n = specs[k].stored_nbytes
        if cur and size + n > DIFF_BATCH_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        out.append(cur)
    return out
