"""Every user-caused failure is a CheckpointError subclass whose message names the path,
file, key or option at fault; damaged or hostile checkpoints are refused; failed saves
leave nothing behind and harm nothing already saved."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import jax
import msgpack
import numpy as np
import optax
import pytest
import xxhash
from conftest import assert_bit_equal, bits_of, hidden_entries, raw_bits, train_steps, tree_of_files
from flax import nnx

from shardckpt import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LMModel,
    ModelConfig,
    SaveAbortedError,
    StructureMismatchError,
    load_model,
    load_optimizer,
    save_model,
    save_optimizer,
)
from shardckpt.executors.threads import ThreadExecutor
from shardckpt.format.manifest import seal_manifest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import dump_index_v1, save_items

KEY = "embed.embedding"


@pytest.fixture
def saved(tmp_path, model):
    path = tmp_path / "ck"
    save_model(path, model, num_shards=2)
    return path


def _shard_of(path: Path, key: str = KEY):
    """(file name, chunk record) of the first chunk holding ``key``."""
    return Checkpoint(path).index()["model"][key][0]


def _flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m = fn(m) or m
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))   # as a hostile writer would


def _edit_index(path: Path, fn) -> None:
    """Rewrite the chunk index and re-seal it in the manifest, as a hostile writer would."""
    d = msgpack.unpackb(dump_index_v1(Checkpoint(path).index()), raw=False)    # rows (version 1)
    d = fn(d) or d
    raw = msgpack.packb(d, use_bin_type=True)
    (path / "index.msgpack").write_bytes(raw)

    def seal(m):
        m["meta_files"]["index.msgpack"] = {"size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    _edit_manifest(path, seal)


# --- not found -----------------------------------------------------------------------------

def test_nonexistent_path(tmp_path, model):
    missing = tmp_path / "nope"
    for call in (lambda: load_model(missing), lambda: load_optimizer(missing, model, optax.adamw(1e-3)),
                 lambda: Checkpoint(missing), lambda: CheckpointManager(tmp_path / "m").load(missing)):
        with pytest.raises(CheckpointNotFoundError, match="nope") as e:
            call()
        assert isinstance(e.value, FileNotFoundError)   # also a FileNotFoundError


@pytest.mark.parametrize("content", [None, "notes.txt", "manifest-removed"])
def test_directory_without_manifest(tmp_path, model, content):
    path = tmp_path / "ck"
    if content == "manifest-removed":
        save_model(path, model)
        (path / "manifest.json").unlink()
    else:
        path.mkdir()
        if content:
            (path / content).write_text("hello")
    with pytest.raises(CheckpointNotFoundError, match="manifest.json"):
        load_model(path)
    with pytest.raises(CheckpointNotFoundError, match="ck"):
        CheckpointManager(tmp_path / "m").load(path)


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="f"):
        load_model(tmp_path / "f")


# --- damaged shards ------------------------------------------------------------------------

def test_flipped_byte_in_data_is_detected(saved, model):
    fname, chunk = _shard_of(saved)
    _flip(saved / fname, chunk.data_offset + chunk.nbytes // 2)

    with pytest.raises(CorruptCheckpointError, match=fname) as e:
        load_model(saved)
    assert KEY in str(e.value)
    with pytest.raises(CorruptCheckpointError, match=fname):
        CheckpointManager(saved.parent / "m").load(saved)
    target = nnx.state(LMModel(model.config, rngs=nnx.Rngs(1)))
    with pytest.raises(CorruptCheckpointError, match=fname):
        Checkpoint(saved).restore("model", target)

    # verify=False reads the bytes as they are: no error, exactly one value differs.
    restored, report = Checkpoint(saved).restore("model", target, verify=False)
    assert report.complete
    got, want = raw_bits(restored["embed"]["embedding"]), raw_bits(model.embed.embedding)
    assert (got != want).sum() == 1
    loaded, _ = load_model(saved, verify=False)
    assert (raw_bits(loaded.embed.embedding) != want).sum() == 1
    state = CheckpointManager(saved.parent / "m", verify=False).load(saved)
    assert (raw_bits(state.model.embed.embedding) != want).sum() == 1


def test_flipped_byte_in_compressed_member(tmp_path, model):
    path = tmp_path / "ck"
    save_model(path, model, compress=True, num_shards=2)
    fname, chunk = _shard_of(path)
    with zipfile.ZipFile(path / fname) as zf:
        info = zf.getinfo(chunk.member + ".npy")
    assert info.compress_type == zipfile.ZIP_DEFLATED
    with open(path / fname, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), "<u2")
    _flip(path / fname, info.header_offset + 30 + int(n) + int(m) + info.compress_size // 2)
    with pytest.raises(CorruptCheckpointError, match=fname):
        load_model(path)


def test_truncated_shard(saved):
    fname, _ = _shard_of(saved)
    size = (saved / fname).stat().st_size
    os.truncate(saved / fname, size // 2)
    with pytest.raises(CorruptCheckpointError, match=fname):
        load_model(saved)


def test_missing_shard(saved):
    fname, _ = _shard_of(saved)
    (saved / fname).unlink()
    with pytest.raises(CorruptCheckpointError, match=fname):
        load_model(saved)


def test_shard_replaced_by_symlink(saved, tmp_path):
    fname, _ = _shard_of(saved)
    outside = tmp_path / "outside.npz"
    os.rename(saved / fname, outside)
    os.symlink(outside, saved / fname)
    with pytest.raises(CorruptCheckpointError, match=fname):
        load_model(saved)


def test_tampered_config_json(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_config"]["n_layers"] = 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        load_model(saved)


# --- hostile manifests ---------------------------------------------------------------------

def _rename_file(old_to_new):
    def fn(m):
        for section in ("files", "meta_files"):
            m[section] = {old_to_new(k): v for k, v in m[section].items()}
    return fn


@pytest.mark.parametrize("tamper, word", [
    (lambda m: "{not json", "JSON"),
    (lambda m: {**m, "version": 2}, "version"),
    (lambda m: {**m, "version": "1"}, "version"),
    (lambda m: {**m, "format": "orbax"}, "manifest"),
    (lambda m: [m], "manifest"),
    (lambda m: {**m, "step": -5}, "step"),
    (lambda m: {**m, "items": {"model": {"arrays": {KEY: {"dtype": "object", "shape": [1], "stored_dtype": "object", "stored_shape": [1]}}}}}, KEY),
    (lambda m: {**m, "items": {"model": {"arrays": {KEY: {"dtype": "float32", "shape": [-1], "stored_dtype": "float32", "stored_shape": [-1]}}}}}, KEY),
    (lambda m: {**m, "items": {"model": {"arrays": {KEY: {"dtype": "bfloat16", "shape": [2], "stored_dtype": "float64", "stored_shape": [2]}}}}}, KEY),
])
def test_malformed_manifest(saved, tamper, word):
    m = json.loads((saved / "manifest.json").read_text())
    out = tamper(m)
    (saved / "manifest.json").write_text(out if isinstance(out, str) else json.dumps(
        seal_manifest(out) if isinstance(out, dict) else out))
    with pytest.raises(CorruptCheckpointError, match=word):
        load_model(saved)
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(saved)
    mgr = CheckpointManager(saved.parent)      # the manager does not list it
    assert mgr.all_steps() == []


@pytest.mark.parametrize("bad", ["../{}", "/tmp/{}", "sub/{}", "..", ".", "", "{}\x00", ".hidden"])
def test_file_names_outside_the_checkpoint(saved, bad):
    fname, _ = _shard_of(saved)
    new = bad.format(fname) if "{}" in bad else bad
    _edit_manifest(saved, _rename_file(lambda k: new if k == fname else k))
    with pytest.raises(CorruptCheckpointError, match="file name"):
        load_model(saved)


@pytest.mark.parametrize("section", ["meta_files", "index"])
def test_meta_and_index_names_outside_the_checkpoint(saved, section):
    def fn(m):
        if section == "index":
            m["index"] = "../index.msgpack"
        else:
            m["meta_files"]["/etc/passwd"] = m["meta_files"].pop("config.json")
    _edit_manifest(saved, fn)
    with pytest.raises(CorruptCheckpointError, match="file name"):
        load_model(saved)


def test_index_naming_a_file_outside(saved, tmp_path):
    """A consistent (re-sealed) index that points at a file outside is refused."""
    def fn(d):
        d["files"] = ["../" + f for f in d["files"]]
    _edit_index(saved, fn)
    with pytest.raises(CorruptCheckpointError, match="file name"):
        load_model(saved)


def test_index_chunks_that_overlap_or_leave_gaps(saved):
    def fn(d):
        rows = d["items"]["model"][KEY]
        rows[0][3][0] -= 1         # chunk one row short: the array is not covered
    _edit_index(saved, fn)
    with pytest.raises(CorruptCheckpointError, match=KEY):
        load_model(saved)


def test_index_offset_beyond_the_file(saved):
    def fn(d):
        d["items"]["model"][KEY][0][4] = 1 << 40
    _edit_index(saved, fn)
    with pytest.raises(CorruptCheckpointError, match=KEY):
        load_model(saved)


def test_huge_claimed_shape_is_checked_against_the_file_before_allocating(saved):
    """A hostile manifest claims a 256 TiB array (consistent with itself). The loader must
    compare the claimed file sizes with the real files before it allocates anything."""
    fname, chunk = _shard_of(saved)
    rows = 1 << 40
    nbytes = rows * 64 * 4

    def index_fn(d):
        d["items"]["model"][KEY] = [[d["files"].index(fname), chunk.member, [0, 0], [rows, 64],
                                     chunk.data_offset, nbytes, 0]]
    _edit_index(saved, index_fn)

    def manifest_fn(m):
        spec = m["items"]["model"]["arrays"][KEY]
        spec["shape"] = spec["stored_shape"] = [rows, 64]
        m["files"][fname]["size"] = chunk.data_offset + nbytes
    _edit_manifest(saved, manifest_fn)

    ck = Checkpoint(saved)
    with pytest.raises(CorruptCheckpointError, match=fname):
        ck.read_arrays("model", [KEY])
    target = {"embed": {"embedding": jax.ShapeDtypeStruct((rows, 64), np.float32)}}
    with pytest.raises(CorruptCheckpointError, match=fname):
        ck.restore("model", target, strict=False)


def test_chunks_claiming_more_bytes_than_the_file_holds(saved):
    """Many chunks pointing at the same bytes would make a small file fill a huge array."""
    fname, chunk = _shard_of(saved)
    copies = 1024                 # 1024 x 64 KiB = 64 MiB claimed from a file of ~250 KiB
    per = chunk.shape[0]

    def index_fn(d):
        row = d["items"]["model"][KEY][0]
        d["items"]["model"][KEY] = [[row[0], row[1], [i * per, 0], row[3], row[4], row[5], row[6]]
                                    for i in range(copies)]
    _edit_index(saved, index_fn)

    def manifest_fn(m):
        spec = m["items"]["model"]["arrays"][KEY]
        spec["shape"] = spec["stored_shape"] = [per * copies, 64]
    _edit_manifest(saved, manifest_fn)
    with pytest.raises(CorruptCheckpointError, match=fname):
        Checkpoint(saved).read_arrays("model", [KEY])


# --- wrong target --------------------------------------------------------------------------

def test_model_of_another_config(saved):
    with pytest.raises(StructureMismatchError, match=KEY):
        load_model(saved, model=LMModel(ModelConfig(hidden_size=32), rngs=nnx.Rngs(0)))
    with pytest.raises(StructureMismatchError, match=r"layers\.2\."):
        load_model(saved, model=LMModel(ModelConfig(n_layers=3), rngs=nnx.Rngs(0)))
    with pytest.raises(StructureMismatchError, match="lm_head"):
        load_model(saved, model=LMModel(ModelConfig(tie_embeddings=False), rngs=nnx.Rngs(0)))
    with pytest.raises(StructureMismatchError, match=KEY):
        CheckpointManager(saved.parent / "m").load(saved, model=LMModel(ModelConfig(vocab_size=128), rngs=nnx.Rngs(0)))


def test_fewer_layers_than_saved(saved):
    with pytest.raises(StructureMismatchError, match=r"layers\.1\."):
        load_model(saved, model=LMModel(ModelConfig(n_layers=1), rngs=nnx.Rngs(0)))


def test_optimizer_for_a_missing_item(saved, model):
    with pytest.raises(StructureMismatchError, match="optimizer"):
        load_optimizer(saved, model, optax.adamw(1e-3))


def test_optimizer_of_another_model(tmp_path, model, optimizer):
    save_optimizer(tmp_path / "ck", optimizer)
    other = LMModel(ModelConfig(hidden_size=32), rngs=nnx.Rngs(0))
    with pytest.raises(StructureMismatchError, match=r"opt_state\.0\.mu\.embed\.embedding"):
        load_optimizer(tmp_path / "ck", other, optax.adamw(1e-3), strict=True)


# --- saves that must not happen ------------------------------------------------------------

def test_save_into_foreign_directory_refused(tmp_path, model, optimizer):
    user = tmp_path / "my_project"
    user.mkdir()
    (user / "train.py").write_text("print('hi')")
    (user / "data").mkdir()
    (user / "data" / "x.bin").write_bytes(b"\x00\x01")
    before = tree_of_files(user)
    for call in (lambda: save_model(user, model), lambda: save_optimizer(user, optimizer),
                 lambda: save_items(user, {"state": {"a": np.ones(2)}})):
        with pytest.raises(CheckpointError, match="my_project"):
            call()
    assert tree_of_files(user) == before
    assert sorted(os.listdir(user)) == ["data", "train.py"]
    assert hidden_entries(tmp_path) == []


def test_save_onto_a_file_refused(tmp_path, model):
    (tmp_path / "ck").write_text("precious")
    with pytest.raises(CheckpointError, match="ck"):
        save_model(tmp_path / "ck", model)
    assert (tmp_path / "ck").read_text() == "precious"


@pytest.mark.parametrize("bad_leaf", [object(), np.array([object()], dtype=object), {1, 2}],
                         ids=["object", "object-array", "set"])
def test_unsupported_leaf_fails_cleanly(tmp_path, bad_leaf):
    path = tmp_path / "ck"
    save_items(path, {"state": {"a": np.arange(4)}}, step=1)
    before = tree_of_files(path)
    with pytest.raises(CheckpointError, match="bad"):
        save_items(path, {"state": {"a": np.arange(5), "bad": bad_leaf}}, step=2)
    assert tree_of_files(path) == before
    assert hidden_entries(tmp_path) == []
    restored, _ = Checkpoint(path).restore("state", {"a": np.zeros(4, np.int64)})
    np.testing.assert_array_equal(restored["a"], np.arange(4))


def test_failure_after_shards_were_written(tmp_path, model, optimizer):
    """Non-JSON ``extra`` fails the save after every shard is on disk: the earlier
    checkpoint of that step survives, nothing is left behind."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, model, optimizer, extra={"v": 1})
    saved = bits_of(model)
    before = tree_of_files(tmp_path / "step_5")
    train_steps(model, optimizer, 1)
    with pytest.raises(CheckpointError, match="extra.json"):
        mgr.save(5, model, optimizer, extra={"v": 2, "bad": object()})
    assert tree_of_files(tmp_path / "step_5") == before
    assert hidden_entries(tmp_path) == []
    state = mgr.load_latest(should_load_optimizer=False)
    assert state.extra == {"v": 1}
    assert_bit_equal(state.model, saved)


class _FailingExecutor(ThreadExecutor):
    """Writes every shard for real, then fails as a full disk would on the last one."""

    def write_shards(self, staging, plans, *, compress, progress=None, deadline=None, writer=None):
        super().write_shards(staging, plans, compress=compress, progress=progress)
        assert any(Path(staging.tmp).iterdir())
        raise OSError(28, "No space left on device")


def test_writer_failure_aborts_the_save(tmp_path, model):
    path = tmp_path / "ck"
    save_model(path, model)
    before = tree_of_files(path)
    with pytest.raises(SaveAbortedError, match="No space left"):
        save_items(path, {"model": nnx.state(LMModel(model.config, rngs=nnx.Rngs(9)))},
                        executor=_FailingExecutor(2), num_shards=3)
    assert tree_of_files(path) == before
    assert hidden_entries(tmp_path) == []
    with pytest.raises(SaveAbortedError):
        save_items(tmp_path / "new", {"state": {"a": np.ones(3)}}, executor=_FailingExecutor(1))
    assert not (tmp_path / "new").exists()
    assert hidden_entries(tmp_path) == []


def test_abstract_values_cannot_be_saved(tmp_path, model):
    abstract = nnx.eval_shape(lambda: LMModel(model.config, rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match=KEY):
        save_model(tmp_path / "ck", abstract)
    assert not (tmp_path / "ck").exists() and hidden_entries(tmp_path) == []


def test_bad_backend_named(tmp_path, model):
    with pytest.raises(CheckpointError, match="backend"):
        save_model(tmp_path / "ck", model, backend="carrier-pigeon")
