"""The on-disk format: shard names, plain-numpy readability, alignment, compression, the
manifest and metadata files, balanced shards, and items combined into one checkpoint."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import xxhash
from conftest import assert_bit_equal, flat_state, hidden_entries, raw_bits, train_steps

from shardckpt import CheckpointManager, load_model, load_optimizer, save_model, save_optimizer
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items


def _shards(path: Path, item: str = "model") -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith(f"{item}-") and n.endswith(".npz"))


def _member_data_start(zf_path: Path, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(start of the member's bytes, start of the .npy array data) in the file."""
    with open(zf_path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        assert local[:4] == b"PK\x03\x04"
        n, m = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + n + m
    with zipfile.ZipFile(zf_path) as zf, zf.open(info) as member:
        version = np.lib.format.read_magic(member)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(member)
        header_len = member.tell()
    return start, start + header_len


@pytest.mark.parametrize("num_shards", [1, 3])
def test_shard_names_and_plain_numpy(tmp_path, model, num_shards):
    path = save_model(tmp_path / "ck", model, num_shards=num_shards)
    names = _shards(path)
    assert names == [f"model-{i:05d}-of-{num_shards:05d}.npz" for i in range(num_shards)]
    # Every member opens with plain numpy, no pickle, and together they are the model.
    flat = {k: np.asarray(raw_bits(v)) for k, v in flat_state(model).items()}
    index = Checkpoint(path).index()["model"]
    seen = set()
    for name in names:
        with np.load(path / name, allow_pickle=False) as z:
            for member in z.files:
                arr = z[member]
                (key, chunk), = [(k, c) for k, rows in index.items() for f, c in rows
                                 if f == name and c.member == member]
                box = tuple(slice(o, o + s) for o, s in zip(chunk.offset, chunk.shape))
                assert arr.tobytes() == flat[key][box].tobytes(), member
                seen.add((key, chunk.offset))
    assert {k for k, _ in seen} == set(flat)
    if num_shards == 1:   # nothing split: members are named by their key
        with np.load(path / names[0], allow_pickle=False) as z:
            assert sorted(z.files) == sorted(flat)
            np.testing.assert_array_equal(z["embed.embedding"], np.asarray(model.embed.embedding[...]))


def test_exotic_dtypes_are_plain_unsigned_members(tmp_path):
    tree = {"bf16": jnp.arange(6, dtype=jnp.bfloat16), "f8": jnp.ones(3, jnp.float8_e4m3fn),
            "key": jax.random.key(0), "i4": np.arange(-3, 4).astype(jnp.int4)}
    path = save_items(tmp_path / "ck", {"state": tree}, num_shards=1)
    with np.load(path / "state-00000-of-00001.npz", allow_pickle=False) as z:
        assert z["bf16"].dtype == np.uint16 and z["bf16"].tobytes() == np.asarray(tree["bf16"]).tobytes()
        assert z["f8"].dtype == np.uint8
        assert z["key"].dtype == np.uint32 and z["key"].tolist() == jax.random.key_data(tree["key"]).tolist()
        assert z["i4"].dtype == np.uint8
    arrays = json.loads((path / "manifest.json").read_text())["items"]["state"]["arrays"]
    assert arrays["bf16"]["dtype"] == "bfloat16" and arrays["bf16"]["stored_dtype"] == "uint16"
    assert arrays["f8"]["dtype"] == "float8_e4m3fn"
    assert arrays["key"]["key_impl"] and arrays["key"]["shape"] == [] and arrays["key"]["stored_shape"] == [2]
    assert arrays["i4"]["dtype"] == "int4"


def test_members_stored_and_aligned(tmp_path, model, optimizer):
    path = save_model(tmp_path / "ck", model, num_shards=3)
    save_optimizer(path, optimizer, num_shards=2)
    index = Checkpoint(path).index()
    offsets = {(f, c.member): c.data_offset for rows in list(index["model"].values()) + list(index["optimizer"].values())
               for f, c in rows}
    files = _shards(path, "model") + _shards(path, "optimizer")
    assert len(files) == 5
    for name in files:
        with zipfile.ZipFile(path / name) as zf:
            assert zf.testzip() is None           # every member's CRC-32 checks out
            for info in zf.infolist():
                assert info.compress_type == zipfile.ZIP_STORED, info.filename
                start, data = _member_data_start(path / name, info)
                assert start % 64 == 0, (name, info.filename, start)
                assert data % 64 == 0, (name, info.filename, data)
                assert offsets[(name, info.filename[:-4])] == data


def test_compress_deflates_and_round_trips(tmp_path, model, optimizer):
    train_steps(model, optimizer, 1)
    path = save_model(tmp_path / "ck", model, compress=True, num_shards=2)
    save_optimizer(path, optimizer, compress=True)
    for name in _shards(path, "model") + _shards(path, "optimizer"):
        with zipfile.ZipFile(path / name) as zf:
            assert zf.testzip() is None
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        with np.load(path / name, allow_pickle=False) as z:
            assert all(z[m].size >= 0 for m in z.files)
    loaded, _ = load_model(path)
    assert_bit_equal(loaded, model)
    assert_bit_equal(load_optimizer(path, loaded, optax.adamw(1e-3)), optimizer)


def test_compress_highly_compressible_data(tmp_path):
    """Zeros deflate ~1000:1; the loader must not take that for bytes beyond the file."""
    tree = {"zeros": np.zeros((512, 256), np.float32), "ones": jnp.ones((300, 7), jnp.bfloat16),
            "tiny": np.arange(3)}
    path = save_items(tmp_path / "ck", {"state": tree}, compress=True, num_shards=2)
    assert sum(p.stat().st_size for p in path.glob("*.npz")) < tree["zeros"].nbytes // 20
    restored, report = Checkpoint(path).restore("state", tree)
    assert report.complete
    assert_bit_equal(restored, tree)


def test_manifest_contents(tmp_path, model, optimizer):
    mgr = CheckpointManager(tmp_path, num_shards=2)
    path = mgr.save(7, model, optimizer, metrics={"loss": 0.25})
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "shardckpt" and m["version"] == 1 and m["step"] == 7
    assert m["created"] and m["writers"]["shardckpt"] and m["writers"]["jax"] == jax.__version__
    assert m["metrics"] == {"loss": 0.25}
    assert set(m["items"]) == {"model", "optimizer"}
    arrays = m["items"]["model"]["arrays"]
    for key, value in flat_state(model).items():
        assert arrays[key]["dtype"] == str(value.dtype)
        assert arrays[key]["shape"] == list(value.shape)
    assert m["items"]["optimizer"]["arrays"]["step"]["dtype"] == "uint32"
    listed = set(m["files"]) | set(m["meta_files"]) | {"manifest.json"}
    assert listed == set(os.listdir(path))   # nothing unlisted, nothing missing
    for name, rec in {**m["files"], **m["meta_files"]}.items():
        data = (path / name).read_bytes()
        assert rec["size"] == len(data), name
        assert rec["xxh3_64"] == xxhash.xxh3_64(data).hexdigest(), name
    assert {m["files"][f]["item"] for f in _shards(path, "model")} == {"model"}
    assert {m["files"][f]["item"] for f in _shards(path, "optimizer")} == {"optimizer"}
    assert m["index"] in m["meta_files"]


def test_metadata_files(tmp_path, model, optimizer):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(7, model, optimizer, train_config={"lr": 1e-3, "warmup": 10},
                    metrics={"loss": jnp.float32(0.5), "acc": np.float64(0.75), "epoch": 3},
                    extra={"run": "abc", "nested": {"xs": [1, 2, 3]}, "arr": np.arange(3)})
    assert json.loads((path / "config.json").read_text()) == {
        "model_config": model.config.to_dict(), "step": 7, "train_config": {"lr": 1e-3, "warmup": 10}}
    assert json.loads((path / "metrics.json").read_text()) == {"loss": 0.5, "acc": 0.75, "epoch": 3}
    assert json.loads((path / "extra.json").read_text()) == {"run": "abc", "nested": {"xs": [1, 2, 3]},
                                                            "arr": [0, 1, 2]}
    structure = json.loads((path / "structure.json").read_text())
    assert set(structure) == {"model", "optimizer"}
    assert structure["model"]["embed.embedding"] == {"shape": [256, 64], "dtype": "float32"}
    assert structure["optimizer"]["opt_state.0.mu.embed.embedding"] == {"shape": [256, 64], "dtype": "float32"}
    assert set(structure["model"]) == set(flat_state(model))


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_balanced_shards(tmp_path, model, num_shards):
    path = save_model(tmp_path / "ck", model, num_shards=num_shards)
    assert len(_shards(path)) == num_shards
    load = {name: 0 for name in _shards(path)}
    chunk_sizes = []
    for rows in Checkpoint(path).index()["model"].values():
        for fname, chunk in rows:
            load[fname] += chunk.nbytes
            chunk_sizes.append(chunk.nbytes)
    total = sum(load.values())
    assert total == sum(np.asarray(v).nbytes for v in flat_state(model).values())
    mean = total / num_shards
    assert max(load.values()) - mean <= max(chunk_sizes), (load, max(chunk_sizes))
    loaded, _ = load_model(path)
    assert_bit_equal(loaded, model)


def test_large_array_split_along_axis0(tmp_path):
    big = np.arange(1000 * 33, dtype=np.float32).reshape(1000, 33)
    path = save_items(tmp_path / "ck", {"state": {"big": big, "small": np.ones(3)}}, num_shards=4)
    rows = Checkpoint(path).index()["state"]["big"]
    assert len(rows) >= 4 and len({f for f, _ in rows}) == 4
    assert all(c.offset[1] == 0 and c.shape[1] == 33 for _, c in rows)
    restored, _ = Checkpoint(path).restore("state", {"big": np.zeros_like(big), "small": np.zeros(3)})
    np.testing.assert_array_equal(restored["big"], big)


def test_save_model_then_save_optimizer_is_one_checkpoint(tmp_path, model, optimizer):
    train_steps(model, optimizer, 1)
    path = tmp_path / "ck"
    save_model(path, model, step=5)
    model_files = {n: (path / n).read_bytes() for n in _shards(path)}
    save_optimizer(path, optimizer)
    ck = Checkpoint(path)
    assert sorted(ck.items) == ["model", "optimizer"]
    assert {n: (path / n).read_bytes() for n in _shards(path)} == model_files
    assert json.loads((path / "config.json").read_text())["step"] == 5
    assert hidden_entries(tmp_path) == []
    loaded, _ = load_model(path)
    assert_bit_equal(loaded, model)
    assert_bit_equal(load_optimizer(path, loaded, optax.adamw(1e-3)), optimizer)
    # And the other way round / repeated: each call keeps the other item.
    train_steps(model, optimizer, 1)
    save_model(path, model, step=6)
    assert sorted(Checkpoint(path).items) == ["model", "optimizer"]
    loaded, _ = load_model(path)
    assert_bit_equal(loaded, model)
    other = tmp_path / "other"
    save_optimizer(other, optimizer)
    save_model(other, model)
    assert sorted(Checkpoint(other).items) == ["model", "optimizer"]


def test_save_optimizer_keeps_step_and_metrics_of_the_checkpoint(tmp_path, model, optimizer):
    """Adding an item to a manager's checkpoint must not drop what the manager lists it by."""
    mgr = CheckpointManager(tmp_path, best_metric="loss")
    path = mgr.save(5, model, metrics={"loss": 0.5})
    save_optimizer(path, optimizer)
    ck = Checkpoint(path)
    assert ck.step == 5
    assert ck.metrics == {"loss": 0.5}
    assert CheckpointManager(tmp_path, best_metric="loss").checkpoints[0].metrics == {"loss": 0.5}


def test_shards_are_byte_reproducible(tmp_path, model):
    a = save_model(tmp_path / "a", model, num_shards=3)
    b = save_model(tmp_path / "b", model, num_shards=3)
    for name in _shards(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
