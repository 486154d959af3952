"""Orbax conversion with hostile or damaged input never escapes its directories (#17.6).

Every source here is written by orbax-checkpoint itself (its ``CheckpointManager`` and
checkpointers, with and without OCDBT), then edited the way a hostile or damaged directory
would be: item names and tree keys that are paths, symlinks and FIFOs inside, ``.zarray``
shapes and chunks of 2**40 elements, JSON nested 100,000 deep, steps that fail half way.
The other direction uses shardckpt checkpoints whose manifests are correctly sealed but
name items and keys that would become paths. Each case checks the error is ours, and that
nothing was written or left anywhere: not at the destination, not beside it, not at the
place the name points to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xxhash

from shardckpt import CheckpointManager
from shardckpt import convert as cv
from shardckpt.errors import CheckpointError
from shardckpt.format.manifest import seal_manifest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import dump_index_v1, save_items
from shardckpt.tools.cli import main

ocp = pytest.importorskip("orbax.checkpoint")
ROOT = Path(__file__).resolve().parents[2]
W = np.arange(4, dtype=np.float32)


# --- sources written by Orbax ---------------------------------------------------------------------

def orbax_manager(root: Path, steps=(1,), *, ocdbt: bool = True, step_prefix: str | None = None) -> Path:
    handler = ocp.StandardCheckpointHandler(use_ocdbt=ocdbt)
    options = ocp.CheckpointManagerOptions(step_prefix=step_prefix) if step_prefix else None
    with ocp.CheckpointManager(root.absolute(), options=options, item_handlers={"model": handler}) as mngr:
        for n in steps:
            mngr.save(n, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": W + n})))
        mngr.wait_until_finished()
    return root


def orbax_tree(path: Path, *, ocdbt: bool = False, tree=None) -> Path:
    """A StandardCheckpointer directory; without OCDBT every array is ``<name>/.zarray`` plus
    chunk files, the layout in which names and chunks are paths."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=ocdbt)) as ck:
        ck.save(path.absolute(), args=ocp.args.StandardSave({"w": W} if tree is None else tree))
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (type and bytes of files; links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("dir",) if p.is_dir() else ("other",)
    return out


def refused(tmp_path: Path, fn, match: str | None = None) -> str:
    """``fn()`` raises our error and changes nothing under ``tmp_path``."""
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        fn()
    assert snapshot(tmp_path) == before, "a refused conversion wrote or left something"
    return str(info.value)


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# --- item names and tree keys that are paths --------------------------------------------------------

BAD_NAMES = ["../x", "../../beside", "/ABS/evil", "a/b", "..", ".", "", "x\\y", "nul\u0000"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_item_names_from_checkpoint_metadata_are_refused(tmp_path, bad):
    """An item name of ``_CHECKPOINT_METADATA`` becomes a path: refused before Orbax reads
    it, for a step and for a whole manager, even where the name points to a real Orbax tree
    (``../../beside`` from ``root/1/`` is ``tmp_path/beside``)."""
    orbax_tree(tmp_path / "beside", ocdbt=True)
    root = orbax_manager(tmp_path / "root")
    bad = bad.replace("/ABS", str(tmp_path))
    edit_json(root / "1" / "_CHECKPOINT_METADATA",
              lambda m: {**m, "item_handlers": {bad: m["item_handlers"]["model"]}})
    for src in (root / "1", root):
        msg = refused(tmp_path, lambda: cv.from_orbax(src, tmp_path / "out"), "item name")
        assert "_CHECKPOINT_METADATA" in msg


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "../../x", "/ABS/evil", "x\\y"])
def test_tree_keys_that_are_paths_are_refused(tmp_path, bad):
    """Without OCDBT Orbax turns each tree key into a directory of the checkpoint: a key of
    ``_METADATA`` that is not a plain name is refused before any array is opened."""
    src = orbax_tree(tmp_path / "o")
    bad = bad.replace("/ABS", str(tmp_path))

    def change(m):
        entry = m["tree_metadata"].pop(next(iter(m["tree_metadata"])))
        entry["key_metadata"][0]["key"] = bad
        m["tree_metadata"][repr((bad,))] = entry
        return m
    edit_json(src / "_METADATA", change)
    refused(tmp_path, lambda: cv.from_orbax(src, tmp_path / "out"), "tree key")


# --- symlinks and special files inside the source ----------------------------------------------------

def _link_chunk(src: Path, outside: Path) -> None:
    chunk = src / "w" / "0"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(outside)


def _link_array_dir(src: Path, outside: Path) -> None:
    (src / "w").rename(outside)
    (src / "w").symlink_to(outside, target_is_directory=True)


def _link_metadata(src: Path, outside: Path) -> None:
    (src / "_METADATA").rename(outside)
    (src / "_METADATA").symlink_to(outside)


def _fifo(src: Path, outside: Path) -> None:
    os.mkfifo(src / "w" / "1")


@pytest.mark.parametrize("attack", [_link_chunk, _link_array_dir, _link_metadata, _fifo])
def test_links_and_special_files_inside_are_refused(tmp_path, attack):
    """A zarr chunk (or an array directory, or metadata) symlinked out of the source would
    make the converted array hold the outside file's bytes; a FIFO would block the reader.
    All refused, naming the entry, before Orbax reads a byte."""
    src = orbax_tree(tmp_path / "o")
    attack(src, tmp_path / "outside")
    msg = refused(tmp_path, lambda: cv.from_orbax(src, tmp_path / "out"))
    assert str(src) in msg
    # in a manager step too (every step directory is checked whole)
    root = orbax_manager(tmp_path / "root", ocdbt=False)
    attack(root / "1" / "model", tmp_path / "outside2")
    refused(tmp_path, lambda: cv.from_orbax(root, tmp_path / "out"), "symlink|FIFO")


# --- declared sizes: refused before TensorStore allocates ---------------------------------------------

HUGE = [{"shape": [2 ** 40]},                          # 4 TiB of float32, one tiny chunk on disk
        {"shape": [2 ** 40], "chunks": [2 ** 40]},
        {"chunks": [2 ** 40]},                         # shape (4,), one chunk of 4 TiB: std::bad_alloc
        {"shape": [2 ** 20, 2 ** 20], "chunks": [1, 4]},
        {"chunks": [2 ** 30]},                         # 4 GiB buffer for 16 bytes of data
        {"dtype": "|V1000000000"}]                     # 4 elements of 1 GB each


def test_huge_declared_shapes_and_chunks_are_refused_before_allocation(tmp_path):
    """Run in a child process under a 12 GiB address-space limit: a regression would abort
    that process (TensorStore's ``std::bad_alloc``), not the test run."""
    script = textwrap.dedent(f"""
        import json, shutil, sys
        from pathlib import Path
        import numpy as np
        import orbax.checkpoint as ocp
        from shardckpt import convert as cv
        from shardckpt.errors import CheckpointError
        out = []
        for n, change in enumerate(json.loads(sys.argv[1])):
            src = Path({str(tmp_path)!r}) / f"o{{n}}"
            with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ck:
                ck.save(src, args=ocp.args.StandardSave({{"w": np.arange(4, dtype=np.float32)}}))
            z = json.loads((src / "w" / ".zarray").read_text())
            z.update(change)
            (src / "w" / ".zarray").write_text(json.dumps(z))
            try:
                cv.from_orbax(src, src.with_name(f"out{{n}}"))
                out.append("converted")
            except CheckpointError as e:
                out.append(str(e))
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", f"import resource; resource.setrlimit(resource.RLIMIT_AS, "
                           f"(12 << 30, 12 << 30)); exec({script!r})", json.dumps(HUGE)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(HUGE)
    for change, msg in zip(HUGE, results):
        assert "refusing it" in msg and "declares" in msg, (change, msg)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_a_real_array_of_zeros_beyond_the_slack_still_converts(tmp_path):
    """The bound is what the bytes on disk can hold compressed (zstd at most 32768 times,
    plus 64 MiB): 80 MiB of zeros, which Orbax stores in a few KiB, is not refused."""
    zeros = np.zeros(20 << 20, np.float32)
    src = orbax_tree(tmp_path / "o", ocdbt=True, tree={"z": zeros})
    on_disk = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert zeros.nbytes > (64 << 20) and on_disk < zeros.nbytes // 1000
    cv.from_orbax(src, tmp_path / "out")
    got = open_checkpoint(tmp_path / "out").read_arrays("model")["z"]
    assert got.shape == zeros.shape and not np.asarray(got).any()


# --- JSON nested 100,000 deep ----------------------------------------------------------------------

def _deep(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


DEEP_PLACES = {
    "whole file": lambda m: None,
    "item_handlers": lambda m: {**m, "item_handlers": {**m["item_handlers"], "deep": "DEEP"}},
    "metrics": lambda m: {**m, "metrics": "DEEP"},
    "custom_metadata": lambda m: {**m, "custom_metadata": {"x": "DEEP"}},
}


def _nest_deeply(root: Path, where: str) -> None:
    p = root / "1" / "_CHECKPOINT_METADATA"
    if where == "_METADATA":
        p = root / "1" / "model" / "_METADATA"
        p.write_text(p.read_text()[:-1] + ', "x": ' + _deep() + "}")
        return
    changed = DEEP_PLACES[where](json.loads(p.read_text()))
    p.write_text(_deep() if changed is None else json.dumps(changed).replace('"DEEP"', _deep()))


@pytest.mark.parametrize("where", [*DEEP_PLACES, "_METADATA"])
def test_deeply_nested_metadata_is_our_error_everywhere(tmp_path, where):
    """No raw ``RecursionError`` from ``orbax_kind``, from opening (a directory without a
    manifest asks what it is), from the manager or from the conversion."""
    root = orbax_manager(tmp_path / "root")
    _nest_deeply(root, where)
    assert cv.orbax_kind(root) == "manager" and cv.orbax_kind(root / "1") == "step"
    with pytest.raises(cv.OrbaxCheckpointError):
        open_checkpoint(root / "1")
    with pytest.raises(cv.OrbaxCheckpointError):
        CheckpointManager(root).latest_step
    for src in (root / "1", root):
        refused(tmp_path, lambda: cv.from_orbax(src, tmp_path / "out"), "deeper than 64 levels")


def test_deep_metadata_with_a_raised_recursion_limit_never_crashes(tmp_path):
    """A program that raised ``sys.setrecursionlimit`` would let ``json.loads`` recurse
    100,000 levels in C (SIGSEGV): the depth is measured on the bytes first."""
    for n, where in enumerate([*DEEP_PLACES, "_METADATA"]):
        _nest_deeply(orbax_manager(tmp_path / f"root{n}"), where)
    script = textwrap.dedent(f"""
        import sys
        sys.setrecursionlimit(1_000_000)
        from pathlib import Path
        from shardckpt import convert as cv
        from shardckpt.errors import CheckpointError
        from shardckpt.loading.open import open_checkpoint
        for n in range({len(DEEP_PLACES) + 1}):
            root = Path({str(tmp_path)!r}) / f"root{{n}}"
            assert cv.orbax_kind(root / "1") == "step"
            for fn in (lambda: open_checkpoint(root / "1"), lambda: cv.from_orbax(root, root.with_name("out"))):
                try:
                    fn()
                except CheckpointError:
                    pass
        print("survived")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


@pytest.mark.parametrize("name", ["_sharding", "array_metadatas/process_0", "_strings.json", "_METADATA"])
def test_deep_files_orbax_parses_itself_are_refused_first(tmp_path, name):
    """The JSON files Orbax reads with ``json.loads`` (or TensorStore's json driver) on its
    restore path, in a tree of jax arrays and a string (which Orbax writes all of):
    measured before Orbax parses them."""
    import jax.numpy as jnp
    src = tmp_path / "o"
    with ocp.PyTreeCheckpointer() as ck:
        ck.save(src.absolute(), args=ocp.args.PyTreeSave({"w": jnp.arange(4.0), "name": "run-1"}))
    assert (src / name).is_file(), sorted(p.name for p in src.iterdir())
    (src / name).write_text(_deep())
    refused(tmp_path, lambda: cv.from_orbax(src, tmp_path / "out"), "deeper than 64 levels")


def test_deep_zarr_metadata_never_reaches_tensorstore(tmp_path):
    """TensorStore parses ``.zarray`` with a recursive C++ parser: one nested 100,000 deep
    crashed the process (SIGSEGV) at the default recursion limit, as a plain file (Orbax
    without OCDBT) and as a key inside an OCDBT database. A child process, so that a
    regression fails this test rather than ending the run."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        import numpy as np
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from shardckpt import convert as cv
        from shardckpt.errors import CheckpointError
        deep = b"[" * 100_000 + b"]" * 100_000
        for ocdbt in (False, True):
            src = Path({str(tmp_path)!r}) / f"o{{ocdbt}}"
            with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=ocdbt)) as ck:
                ck.save(src, args=ocp.args.StandardSave({{"w": np.arange(4, dtype=np.float32)}}))
            if ocdbt:
                kv = ts.KvStore.open({{"driver": "ocdbt", "base": {{"driver": "file", "path": f"{{src}}/"}}}}).result()
                kv.write(b"w/.zarray", deep).result()
            else:
                (src / "w" / ".zarray").write_bytes(deep)
            try:
                cv.from_orbax(src, src.with_name(f"out{{ocdbt}}"))
                print("converted")
            except CheckpointError as e:
                print("refused:", e)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("refused", "converted"))]
    assert len(lines) == 2 and all("zarr metadata nests JSON deeper than 64 levels" in ln for ln in lines), lines
    assert "OCDBT key 'w/.zarray'" in lines[1]


# --- a conversion that fails half way ----------------------------------------------------------------

def _damage_chunk(tree_dir: Path) -> None:
    """Truncate the array data of an Orbax tree (OCDBT's data files, or zarr chunks)."""
    files = [p for p in tree_dir.rglob("*") if p.is_file() and (p.parent.name == "d" or p.name.isdigit())]
    assert files, list(tree_dir.rglob("*"))
    for p in files:
        p.write_bytes(p.read_bytes()[:5])


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "zarr"])
def test_failed_manager_conversion_leaves_nothing_and_reruns(tmp_path, ocdbt):
    """Step 2 of 3 is damaged: the conversion of the whole manager fails with our error,
    leaves nothing at DST (not even steps 1's checkpoint), nothing beside it and none of
    the parent directories it created; with the damaged step removed the same command
    succeeds."""
    root = orbax_manager(tmp_path / "root", (1, 2, 3), ocdbt=ocdbt)
    _damage_chunk(root / "2" / "model")
    dst = tmp_path / "new" / "parents" / "ckpts"
    refused(tmp_path, lambda: cv.from_orbax(root, dst), "Orbax could not read|cannot read its OCDBT database")
    shutil.rmtree(root / "2")
    report = cv.from_orbax(root, dst)
    assert report.steps == [1, 3] and CheckpointManager(dst).all_steps() == [1, 3]
    assert np.array_equal(open_checkpoint(dst / "step_3").read_arrays("model")["w"], W + 3)


def test_failed_to_orbax_manager_leaves_no_orbax_tmp(tmp_path):
    """shardckpt -> Orbax with a damaged second step: nothing at DST, no
    ``<dst>.orbax-checkpoint-tmp`` or hidden directory beside it, no raw Orbax error."""
    for n in (1, 2):
        save_items(tmp_path / "ours" / f"step_{n}", {"model": {"w": W + n}}, step=n)
    shard = next((tmp_path / "ours" / "step_2").glob("model-*.npz"))
    raw = bytearray(shard.read_bytes())
    raw[raw.find((W + 2).tobytes()) + 5] ^= 0xFF   # inside the array's data: its CRC fails
    shard.write_bytes(bytes(raw))
    refused(tmp_path, lambda: cv.to_orbax(tmp_path / "ours", tmp_path / "orbax"), "CRC|checksum|corrupt|damaged")
    shutil.rmtree(tmp_path / "ours" / "step_2")
    cv.to_orbax(tmp_path / "ours", tmp_path / "orbax")
    with ocp.CheckpointManager((tmp_path / "orbax").absolute()) as mngr:
        assert mngr.all_steps() == [1]


# --- shardckpt -> Orbax from a hostile but correctly sealed manifest ------------------------------

def _seal(path: Path, m: dict, index: dict, structure: dict) -> None:
    (path / "index.msgpack").write_bytes(dump_index_v1(index))
    (path / "structure.json").write_text(json.dumps(structure))
    for name in ("index.msgpack", "structure.json"):
        raw = (path / name).read_bytes()
        m["meta_files"][name] = {**m["meta_files"][name], "size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))


def hostile_checkpoint(path: Path, *, item: str | None = None, key: str | None = None) -> Path:
    """A checkpoint whose item (or key) is renamed in every record, manifest sealed: it
    opens and reads, as a hostile writer would make it."""
    save_items(path, {"model": {"w": W}}, step=3)
    m = json.loads((path / "manifest.json").read_text())
    index = Checkpoint(path).index()
    structure = json.loads((path / "structure.json").read_text())
    if key is not None:
        for d in (m["items"]["model"]["arrays"], m["items"]["model"].get("digests", {}), index["model"],
                  structure["model"]):
            if "w" in d:
                d[key] = d.pop("w")
    if item is not None:
        for d in (m["items"], index, structure):
            d[item] = d.pop("model")
        for f in m["files"].values():
            f["item"] = item
    _seal(path, m, index, structure)
    return path


@pytest.mark.parametrize("kind", ["standard", "pytree", "manager"])
@pytest.mark.parametrize("item,key", [("../evil", None), ("/ABS/evil", None), ("a/b", None), ("..", None),
                                      (None, "../../evil"), (None, "/ABS/evil2"), (None, "a/../../b"),
                                      (None, ".."), (None, "x\\y")])
def test_to_orbax_refuses_hostile_names_of_a_sealed_manifest(tmp_path, kind, item, key):
    item = item.replace("/ABS", str(tmp_path)) if item else item
    key = key.replace("/ABS", str(tmp_path)) if key else key
    src = hostile_checkpoint(tmp_path / "ours", item=item, key=key)
    ck = open_checkpoint(src)   # it does open: the names are checked where they become paths
    assert ck.items == [item or "model"]
    refused(tmp_path, lambda: cv.to_orbax(src, tmp_path / "orbax", kind=kind), "not allowed|not a plain name")


@pytest.mark.parametrize("field,value", [("orbax_item", "../evil"), ("orbax_item", "/abs"),
                                         ("json_items", {"../evil": {"a": 1}}), ("kind", "../x"),
                                         ("sequences", "not a list")])
def test_to_orbax_refuses_a_hostile_provenance_record(tmp_path, field, value):
    """``orbax.json`` (what a converted checkpoint records of its Orbax layout) names Orbax
    items, which become directories: checked like the manifest's names."""
    prov = {"kind": "step", "items": {"model": {"orbax_item": "model"}}, "json_items": {}}
    if field in ("orbax_item", "sequences"):
        prov["items"]["model"][field] = value
    else:
        prov[field] = value
    save_items(tmp_path / "ours", {"model": {"w": W}}, step=3, json_files={"orbax.json": prov})
    refused(tmp_path, lambda: cv.to_orbax(tmp_path / "ours", tmp_path / "orbax"))


# --- the command: one line, our exit code, nothing left ------------------------------------------

def test_cli_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    """Relative paths as the guide writes them; a failing conversion in each direction
    prints one line on stderr (no Orbax traceback or log, captured at the file descriptor)
    and exits 1."""
    monkeypatch.chdir(tmp_path)
    root = orbax_manager(tmp_path / "root", (1, 2))
    _damage_chunk(root / "2" / "model")
    hostile_checkpoint(tmp_path / "ours", key="../../evil")
    before = snapshot(tmp_path)
    for argv in (["convert", "./root", "./ckpts"], ["convert", "./ours", "./orbax_back"],
                 ["convert", "root/2", "one"], ["convert", "./ours", "./orbax_back", "--orbax-kind", "manager"]):
        assert main(argv) == 1, argv
        out, err = capfd.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("shardckpt convert: "), (argv, err[:3000])
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before
