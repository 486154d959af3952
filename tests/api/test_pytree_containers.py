"""Pytrees without a target come back as saved; one cast rule; a depth limit (#18.7, #17.12f).

``save`` records which nodes of a plain pytree are lists and tuples and where None leaves
and empty containers sit (``tree-<item>.json``, a metadata file covered by the manifest),
so ``restore(path)`` gives back the saved structure. The record is validated against the
saved keys; a checkpoint without one (older writers, ``nnx.State`` items) still comes
back as nested dicts; a hostile record is refused in time and memory linear in its size.
Trees deeper than ``MAX_TREE_DEPTH`` are refused on save and on load with our error,
never ``RecursionError``, and the interpreter stays usable.
"""

from __future__ import annotations

import collections
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import xxhash
from flax import nnx

from shardckpt import CheckpointError, CheckpointManager, CorruptCheckpointError, restore, save
from shardckpt.format.manifest import seal_manifest
from shardckpt.testing import save_items
from shardckpt.tree import MAX_TREE_DEPTH, lossless_cast

Point = collections.namedtuple("Point", "x y")


def _same(a, b) -> bool:
    """Equal structure (container types included) and equal leaves."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return sorted(a) == sorted(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return a == b


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


TREES = {
    "list-at-the-root": [jnp.arange(3.0), jnp.ones((2, 2), jnp.bfloat16)],
    "tuple-at-the-root": (jnp.arange(2), 5, "name"),
    "nested": {"layers": [{"w": jnp.ones(2), "b": (jnp.zeros(1), None)}, {"w": jnp.ones(2), "b": (jnp.ones(1), 3)}],
               "opt": (jnp.zeros(()), [jnp.ones(1), [jnp.ones(1) * 2, ()]]), "flag": True},
    "none-leaves": {"a": None, "b": [None, jnp.ones(1), None], "c": {"d": None}, "e": (None,)},
    "empty-containers": {"l": [], "t": (), "d": {}, "deep": {"x": [{}, []]}, "w": jnp.ones(1)},
    "eleven-long-list": {"l": [jnp.full((1,), i) for i in range(11)]},   # "10" sorts before "2"
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_restore_without_a_target_gives_the_saved_containers(tmp_path, name):
    tree = TREES[name]
    save(tmp_path / "c", tree)
    back = restore(tmp_path / "c")
    assert _same(back, _host(tree)), (back, tree)
    as_jax = restore(tmp_path / "c", as_jax=True)
    assert jax.tree.structure(as_jax) == jax.tree.structure(tree)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(as_jax) if hasattr(x, "shape"))
    # the same under the manager, as an extra item and as a pytree model=
    mgr = CheckpointManager(tmp_path / "m")
    mgr.save(1, {"w": jnp.ones(1)}, items={"extra": tree})
    assert _same(mgr.load_latest(model={"w": jnp.zeros(1)}).items["extra"], _host(tree))


def test_other_pytree_nodes_come_back_as_dicts_by_their_field_names(tmp_path):
    """A namedtuple or an optax state has no container kind to record: dicts by field name,
    as before; the tuples around them stay tuples."""
    tree = {"p": Point(jnp.ones(1), 2), "opt": optax.adam(1e-3).init({"w": jnp.ones(2)})}
    save(tmp_path / "c", tree)
    back = restore(tmp_path / "c")
    assert set(back["p"]) == {"x", "y"} and back["p"]["y"] == 2
    assert isinstance(back["opt"], tuple) and set(back["opt"][0]) == {"count", "mu", "nu"}
    # a target gives the types back
    again = restore(tmp_path / "c", jax.eval_shape(lambda: tree))
    assert isinstance(again["p"], Point) and type(again["opt"]) is type(tree["opt"])


def test_a_checkpoint_without_the_record_still_loads_as_dicts(tmp_path):
    """What older writers (and save_items, the test hook) write: no tree-state.json."""
    save_items(tmp_path / "old", {"state": {"l": [np.ones(1), np.zeros(1)]}})
    assert not (tmp_path / "old" / "tree-state.json").exists()
    assert restore(tmp_path / "old")["l"].keys() == {"0", "1"}
    # an nnx.State item is its own record (nested dicts by its keys), none is written
    state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    save(tmp_path / "nnx", state)
    assert not (tmp_path / "nnx" / "tree-state.json").exists()
    assert set(restore(tmp_path / "nnx")) == {"kernel", "bias"}


def test_select_without_a_target_keeps_the_list_positions(tmp_path):
    save(tmp_path / "c", {"l": [jnp.ones(1), jnp.zeros(1), jnp.ones(1) * 2], "o": [jnp.ones(1)], "n": None})
    back = restore(tmp_path / "c", select=lambda k: k in ("l.0", "l.2"))
    assert isinstance(back["l"], list) and back["l"][1] is None and float(back["l"][2][0]) == 2
    assert "o" not in back and "n" not in back


# --- a record that does not fit -----------------------------------------------------------

def _with_record(tmp_path, record, *, name="c") -> object:
    """A checkpoint whose tree-state.json is ``record``, resealed as a hostile writer would."""
    path = save(tmp_path / name, {"l": [jnp.ones(1), jnp.zeros(1)], "w": jnp.ones(2)})
    raw = json.dumps(record).encode()
    (path / "tree-state.json").write_bytes(raw)
    m = json.loads((path / "manifest.json").read_text())
    m.pop("checksum")
    m["meta_files"]["tree-state.json"] = {"size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    return path


def _honest_record(tmp_path) -> dict:
    save(tmp_path / "honest", {"l": [jnp.ones(1), jnp.zeros(1)], "w": jnp.ones(2)})
    return json.loads((tmp_path / "honest" / "tree-state.json").read_text())


HOSTILE = {
    "nodes-not-a-list": lambda r: {**r, "nodes": {"a": 1}},
    "huge-list-length": lambda r: {**r, "nodes": [[["l"], "list", 10 ** 12]]},
    "negative-length": lambda r: {**r, "nodes": [[["l"], "list", -1]]},
    "bool-length": lambda r: {**r, "nodes": [[["l"], "list", True]]},
    "path-too-deep": lambda r: {**r, "nodes": [[["x"] * (MAX_TREE_DEPTH + 1), "none"]]},
    "path-part-not-a-str": lambda r: {**r, "nodes": [[["l", 0], "none"]]},
    "unknown-kind": lambda r: {**r, "nodes": [[["l"], "set", 2]]},
    "none-with-a-length": lambda r: {**r, "nodes": [[["l"], "none", 2]]},
    "list-that-does-not-fit": lambda r: {**r, "nodes": [[["w"], "list", 2]]},
    "shorter-list": lambda r: {**r, "nodes": [[["l"], "list", 1]]},
    "none-on-a-saved-key": lambda r: {**r, "nodes": [[["w"], "none"]]},
    "none-under-a-leaf": lambda r: {**r, "nodes": [[["w", "x"], "none"]]},
    "empty-root-with-keys": lambda r: {**r, "nodes": [[[], "dict", 0]]},
    "entry-not-a-list": lambda r: {**r, "nodes": ["l"]},
}


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_a_hostile_record_is_refused(tmp_path, how):
    path = _with_record(tmp_path, HOSTILE[how](_honest_record(tmp_path)))
    with pytest.raises(CorruptCheckpointError, match="tree-state.json"):
        restore(path)
    # with a target the record is not used: the arrays load
    assert float(restore(path, {"l": [jnp.zeros(1), jnp.zeros(1)], "w": jnp.zeros(2)})["w"][1]) == 1.0


@pytest.mark.parametrize("how", ["other-keys", "keys-not-an-int", "newer-version", "other-format", "not-an-object"])
def test_a_record_that_is_not_this_items_is_ignored(tmp_path, how):
    """A record of another version of the item (a digest of other keys), a newer format
    version or another file: the plain nested dicts, as without a record."""
    record = _honest_record(tmp_path)
    record = {"other-keys": {**record, "digest": "0" * 16}, "keys-not-an-int": {**record, "keys": "3"},
              "newer-version": {**record, "version": 2},
              "other-format": {**record, "format": "something"}, "not-an-object": [1, 2]}[how]
    back = restore(_with_record(tmp_path, record))
    assert set(back["l"]) == {"0", "1"}


# --- one cast rule --------------------------------------------------------------------------

CASTS = [  # (saved, target, lossless)
    (jnp.bfloat16, jnp.float32, True), (jnp.float16, jnp.float32, True), (jnp.float32, jnp.float64, True),
    (jnp.int8, jnp.int32, True), (jnp.uint8, jnp.int16, True), (jnp.bool_, jnp.int8, True),
    (jnp.int8, jnp.float16, True),
    (jnp.float32, jnp.float16, False), (jnp.float32, jnp.bfloat16, False), (jnp.bfloat16, jnp.float16, False),
    (jnp.float16, jnp.bfloat16, False), (jnp.float32, jnp.int32, False), (jnp.int32, jnp.float32, False),
    (jnp.int32, jnp.int8, False), (jnp.int8, jnp.uint8, False), (jnp.int32, jnp.bool_, False),
    (jnp.complex64, jnp.float32, False), (jnp.float32, jnp.complex64, True),
]


@pytest.mark.parametrize("src, dst, lossless", CASTS, ids=[f"{np.dtype(a).name}-{np.dtype(b).name}" for a, b, _ in CASTS])
def test_one_cast_rule_lossless_silent_lossy_warned(tmp_path, src, dst, lossless):
    assert lossless_cast(src, dst) is lossless
    value = (np.arange(6) * 7 + 1).astype(np.float32)
    save(tmp_path / "c", {"a": jnp.asarray(value, src), "b": jnp.asarray(value, src)})
    target = {"a": np.zeros(6, dst), "b": np.zeros(6, dst)}      # NumPy targets: float64 without jax's x64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = restore(tmp_path / "c", target)
    assert got["a"].dtype == np.dtype(dst)
    lossy = [w for w in caught if "lossy cast" in str(w.message)]
    if lossless:
        assert not lossy, [str(w.message) for w in caught]
        np.testing.assert_array_equal(np.asarray(got["a"]).astype(np.complex128),
                                      np.asarray(jnp.asarray(value, src)).astype(np.complex128))
    else:
        assert len(lossy) == 1, [str(w.message) for w in caught]      # once per dtype pair, both keys
        msg = str(lossy[0].message)
        assert f"{np.dtype(src).name} values restored into {np.dtype(dst).name} targets" in msg and "a, b" in msg
        assert "43" not in msg            # keys, never values


def test_a_lossy_cast_into_a_module_warns_the_same(tmp_path):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    save(tmp_path / "c", model)
    half = nnx.Linear(3, 2, param_dtype=jnp.float16, rngs=nnx.Rngs(1))
    with pytest.warns(UserWarning, match="float32 values restored into float16 targets .*bias, kernel"):
        restore(tmp_path / "c", half)
    assert half.kernel[...].dtype == jnp.float16


# --- depth -------------------------------------------------------------------------------

def _deep(depth: int, kinds=("dict",)):
    leaf = jnp.ones(2)
    for i in range(depth):
        kind = kinds[i % len(kinds)]
        leaf = {"a": leaf} if kind == "dict" else [leaf] if kind == "list" else (leaf,)
    return leaf


@pytest.mark.parametrize("kinds", [("dict",), ("list",), ("tuple",), ("dict", "list", "tuple")],
                         ids=["dicts", "lists", "tuples", "mixed"])
def test_a_990_deep_pytree_is_refused_by_our_error_on_save_and_load(tmp_path, kinds):
    deep = _deep(990, kinds)
    for call in (lambda: save(tmp_path / "deep", deep), lambda: save(tmp_path / "deep2", {"x": 1}, items={"d": deep}),
                 lambda: CheckpointManager(tmp_path / "m").save(1, deep)):
        with pytest.raises(CheckpointError, match=f"more than {MAX_TREE_DEPTH} levels deep"):
            call()
    assert not (tmp_path / "deep").exists() and CheckpointManager(tmp_path / "m").all_steps() == []
    save(tmp_path / "ok", {"w": jnp.ones(2)})
    with pytest.raises(CheckpointError, match=f"more than {MAX_TREE_DEPTH} levels deep"):
        restore(tmp_path / "ok", deep)                                 # a target that deep
    with pytest.raises(CheckpointError, match=f"more than {MAX_TREE_DEPTH} levels deep"):
        restore(tmp_path / "ok", item=deep)                            # Orbax's spelling, described, not dumped
    # the interpreter is healthy afterwards (a caught RecursionError inside jax's flatten
    # would leave its recursion count wrong, and this would fail)
    assert float(jnp.ones(3).sum()) == 3.0
    save(tmp_path / "after", {"l": [jnp.ones(2)]})
    assert restore(tmp_path / "after")["l"][0].shape == (2,)


def test_the_deepest_allowed_tree_round_trips(tmp_path):
    deep = _deep(MAX_TREE_DEPTH - 1, ("dict", "list"))     # leaf path: MAX_TREE_DEPTH parts... minus one container
    deep = {"top": deep}
    save(tmp_path / "c", deep)
    back = restore(tmp_path / "c")
    node, depth = back, 0
    while not isinstance(node, np.ndarray):
        node = node["a"] if isinstance(node, dict) and "a" in node else node["top"] if isinstance(node, dict) else node[0]
        depth += 1
    assert depth == MAX_TREE_DEPTH
    again = restore(tmp_path / "c", jax.eval_shape(lambda: deep))
    assert jax.tree.structure(again) == jax.tree.structure(deep)
    with pytest.raises(CheckpointError, match="levels deep"):
        save(tmp_path / "d", {"more": deep})


def test_a_checkpoint_with_keys_deeper_than_the_limit_is_refused_on_load(tmp_path):
    """Our writer never writes such keys; a hostile manifest can: refused before they are
    nested into dicts."""
    path = save(tmp_path / "c", {"w": jnp.ones(2)})
    m = json.loads((path / "manifest.json").read_text())
    m.pop("checksum")
    deep_key = ".".join(["a"] * (MAX_TREE_DEPTH + 5))
    m["items"]["state"]["scalars"][deep_key] = {"type": "int", "value": 1}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    (path / "tree-state.json").unlink(missing_ok=True)
    m = json.loads((path / "manifest.json").read_text())
    m.pop("checksum")
    m["meta_files"].pop("tree-state.json", None)
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    with pytest.raises(CorruptCheckpointError, match=f"{MAX_TREE_DEPTH + 5} parts"):
        restore(path)
    assert float(restore(path, {"w": jnp.zeros(2)}, strict=False)["w"][0]) == 1.0
