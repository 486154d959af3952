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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from shardckpt.api.core import save_checkpoint
from shardckpt.errors import CheckpointError, CheckpointNotFoundError
from shardckpt.format.names import NAME
from shardckpt.loading.open import ORBAX_STEP_DIR, ORBAX_TMP, is_orbax_tree, layout_of, open_checkpoint, orbax_kind, small_json, step_checkpoints
from shardckpt.store.local import LocalStore
from shardckpt.store.registry import resolve
from shardckpt.tree import key_of

#: The JSON file in a converted shardckpt checkpoint that records where it came from, so
#: ``to_orbax`` can write the original Orbax layout back.
PROVENANCE = "orbax.json"
_TREE_HANDLERS = ("StandardCheckpointHandler", "PyTreeCheckpointHandler")
_JSON_HANDLERS = ("JsonCheckpointHandler",)
_METRICS_ITEM = "metrics"   # orbax.checkpoint.checkpoint_manager.METRIC_ITEM_NAME


def _local(path: os.PathLike | str) -> tuple[LocalStore, str]:
    store, name = resolve(path)
    if not isinstance(store, LocalStore):
        raise CheckpointError(f"{path}: Orbax conversion works on local directories (convert a local copy)")
    return store, name


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
    store, name = _local(p)
    return small_json(store, name)


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


def _check_dst(dst: Path) -> None:
    """Never write over something we did not write: DST must be missing or an empty directory."""
    if os.path.lexists(dst):
        if not dst.is_dir() or dst.is_symlink():
            raise CheckpointError(f"{dst}: exists and is not a directory; refusing to overwrite it")
        if any(os.scandir(dst)):
            raise CheckpointError(f"{dst}: exists and is not empty; refusing to overwrite it "
                                  "(choose a new destination)")


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise CheckpointError("converting Orbax checkpoints needs orbax-checkpoint: "
                              "pip install 'shardckpt[orbax]'") from e
    return ocp


def _key_impls(tree_dir: Path) -> dict[str, str]:
    """param name -> PRNG key implementation, from ``array_metadatas/process_*``."""
    out: dict[str, str] = {}
    d = tree_dir / "array_metadatas"
    if not _is_dir(d):
        return out
    for f in sorted(d.iterdir()):
        data = _read_json(f) if f.name.startswith("process_") else None
        for rec in (data or {}).get("array_metadatas", []):
            meta = rec.get("array_metadata", {}) if isinstance(rec, dict) else {}
            ext = meta.get("ext_metadata")
            if isinstance(ext, dict) and ext.get("random_key_impl"):
                out[str(meta.get("param_name"))] = str(ext["random_key_impl"])
    return out


def _path_names(path: tuple) -> list[str]:
    return [key_of((p,)) for p in path]


def read_orbax_tree(tree_dir: os.PathLike | str) -> Any:
    """The pytree of one Orbax tree directory as host values, without a target: arrays as
    numpy arrays in their saved dtype (bfloat16 included), typed PRNG keys re-wrapped as
    ``jax.random`` key arrays, scalars as Python numbers, strings as ``str``."""
    ocp = _ocp()
    from orbax.checkpoint import metadata as om

    tree_dir = Path(tree_dir)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(tree_dir)
        tree = meta.tree if hasattr(meta, "tree") else meta
        leaf_types = (om.ArrayMetadata, om.ScalarMetadata, om.StringMetadata)

        def restore_arg(m):
            if isinstance(m, om.ArrayMetadata):
                return ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype)
            if isinstance(m, om.StringMetadata):
                return ocp.RestoreArgs(restore_type=str)
            return ocp.RestoreArgs()

        args = jax.tree.map(restore_arg, tree, is_leaf=lambda x: isinstance(x, leaf_types))
        restored = handler.restore(tree_dir, args=ocp.args.PyTreeRestore(restore_args=args))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{tree_dir}: Orbax could not read this tree: {type(e).__name__}: {e}") from e
    finally:
        handler.close()
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


def _orbax_step_items(step_dir: Path) -> tuple[dict[str, Path], dict[str, Any], dict[str, str]]:
    """(tree items, json items, other items by handler) of one CheckpointManager step."""
    meta = _read_json(step_dir / "_CHECKPOINT_METADATA") or {}
    handlers = meta.get("item_handlers")
    trees: dict[str, Path] = {}
    jsons: dict[str, Any] = {}
    other: dict[str, str] = {}
    names = sorted(handlers) if isinstance(handlers, dict) else sorted(
        e.name for e in os.scandir(step_dir) if e.is_dir(follow_symlinks=False) and ORBAX_TMP not in e.name)
    for name in names:
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
            data = _read_json(d / "metadata") if _is_file(d / "metadata") else _read_json(d / name)
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


def _convert_one_from_orbax(src: Path, kind: str, dst: Path, step: int | None, model_config: Any,
                            skip_unknown: bool, report: ConvertReport) -> None:

    meta = _read_json(src / "_CHECKPOINT_METADATA") or {}
    provenance: dict[str, Any] = {"source": str(src.absolute()), "kind": kind, "items": {},
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
        add(None, read_orbax_tree(src))
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
            add(name, read_orbax_tree(d))
        if isinstance(jsons.get(_METRICS_ITEM), dict):   # CheckpointManager(best_fn=...) metrics
            meta = {**meta, "metrics": jsons.pop(_METRICS_ITEM)}
        provenance["json_items"] = _jsonable(jsons)
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else None
    config = {"model_config": _jsonable(model_config), "step": step, "train_config": None}
    save_checkpoint(dst, items, step=step, metrics=metrics or None,
                    json_files={"config.json": config, PROVENANCE: provenance})
    report.written.append(str(dst))
    report.steps.append(step)
    report.items = sorted(set(report.items) | set(items))


def _orbax_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for e in os.scandir(root):
        m = ORBAX_STEP_DIR.fullmatch(e.name)
        if m and e.is_dir(follow_symlinks=False) and ORBAX_TMP not in e.name \
                and _orbax_kind(e.path) in ("step", "standard", "pytree"):
            out.append((int(m.group(2)), Path(e.path)))
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
    """
    src, dst = Path(src), Path(dst)
    kind = _orbax_kind(src)
    if kind is None:
        raise _neither(src)
    _check_dst(dst)
    report = ConvertReport(str(src), str(dst), "from_orbax", kind)
    if kind == "manager":
        steps = _orbax_steps(src)
        if not steps:
            raise CheckpointError(f"{src}: an Orbax CheckpointManager directory without committed steps")
        for n, d in steps:
            _convert_one_from_orbax(d, _orbax_kind(d) or "step", dst / f"step_{n}", n, model_config,
                                    skip_unknown, report)
        return report
    if step is None and kind == "step":
        m = ORBAX_STEP_DIR.fullmatch(src.absolute().name)
        step = int(m.group(2)) if m else None
    _convert_one_from_orbax(src, kind, dst, step, model_config, skip_unknown, report)
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


def _nest(flat: dict[str, Any], sequences: list[str], nnx_values: bool) -> Any:
    root: dict = {}
    for key, value in flat.items():
        parts = key.split(".") if key else [""]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"key {key!r} clashes with another key")
        node[parts[-1]] = {"value": value} if nnx_values else value
    seqs = set(sequences)

    def lists(node: Any, prefix: str) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: lists(v, f"{prefix}{k}.") for k, v in node.items()}
        if prefix[:-1] in seqs and all(k.isdigit() for k in out):
            return [out[k] for k in sorted(out, key=int)]
        return out
    return lists(root, "")


def _item_trees(ck: Any, nnx_values: bool | None, prov: dict) -> dict[str, Any]:
    trees = {}
    for item in ck.items:
        rec = ck.item_record(item)
        flat = {k: _host_value(v) for k, v in ck.read_arrays(item).items()}
        for k, s in rec.scalars.items():
            value = _scalar_value(s)
            if value is not None:   # Orbax has no None leaves
                flat[k] = value
        info = (prov.get("items") or {}).get(item) or {}
        wrap = nnx_values if nnx_values is not None else info.get("nnx_values", True)
        trees[item] = _nest(dict(sorted(flat.items())), info.get("sequences", []), bool(wrap))
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
    try:
        prov = ck.read_json(PROVENANCE)
    except CheckpointError:
        return {}
    return prov if isinstance(prov, dict) else {}


def _to_orbax_single(ck: Any, dst: Path, kind: str, nnx_values: bool | None, report: ConvertReport) -> None:
    prov = _provenance(ck)
    trees = _item_trees(ck, nnx_values, prov)
    infos = prov.get("items") or {}
    if set(trees) == {"model"} and not infos.get("model", {}).get("split"):
        tree = trees["model"]
    else:
        tree = trees
    _save_orbax_tree(dst, tree, kind)
    report.written.append(str(dst))
    report.steps.append(ck.step)
    report.items = sorted(trees)


def _to_orbax_manager(cks: list[Any], dst: Path, nnx_values: bool | None, report: ConvertReport) -> None:
    ocp = _ocp()
    # The manager writes metrics (<step>/metrics/metrics) only when it tracks the best step;
    # best_fn changes nothing else here (max_to_keep is None: every step is kept).
    options = ocp.CheckpointManagerOptions(best_fn=lambda metrics: 0.0) if any(ck.metrics for ck in cks) else None
    with ocp.CheckpointManager(dst, options=options) as mngr:
        for ck in cks:
            prov = _provenance(ck)
            trees = _item_trees(ck, nnx_values, prov)
            infos = prov.get("items") or {}
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
            for name, data in (prov.get("json_items") or {}).items():
                if name not in args:
                    args[name] = ocp.args.JsonSave(data)
            step = ck.step if ck.step is not None else 0
            metrics = ck.metrics or None
            mngr.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)
            mngr.wait_until_finished()
            report.written.append(str(dst / str(step)))
            report.steps.append(step)
            report.items = sorted(set(report.items) | set(args))


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
    """

    src, dst = Path(src), Path(dst)
    what = shardckpt_kind(src)
    if what is None:
        if _orbax_kind(src) is not None:
            raise CheckpointError(f"{src}: already an Orbax checkpoint")
        raise _neither(src)
    if kind not in (None, "standard", "pytree", "manager"):
        raise CheckpointError(f"kind={kind!r}: expected 'standard', 'pytree' or 'manager'")
    _check_dst(dst)
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
    if dst.is_dir():
        dst.rmdir()   # empty (checked): Orbax creates it itself
    if kind == "manager":
        _to_orbax_manager(cks, dst, nnx_values, report)
    else:
        _to_orbax_single(cks[0], dst, kind, nnx_values, report)
    return report


def convert(src: os.PathLike | str, dst: os.PathLike | str, **kwargs: Any) -> ConvertReport:
    """``from_orbax`` when ``src`` is an Orbax checkpoint, ``to_orbax`` when it is ours."""
    if _orbax_kind(src) is not None:
        return from_orbax(src, dst, **{k: v for k, v in kwargs.items()
                                       if k in ("step", "model_config", "skip_unknown")})
    if shardckpt_kind(src) is not None:
        return to_orbax(src, dst, **{k: v for k, v in kwargs.items() if k in ("kind", "nnx_values")})
    raise _neither(Path(src))
