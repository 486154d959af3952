"""``shardckpt export`` / ``export_safetensors`` (#18.8, #17.6): the format is an option with
a default, the file gets the mode the checkpoint's files get, RNG state stays out of the
weights unless asked, a key safetensors reserves is refused before anything is written,
and paths are taken as everywhere else (relative, ``~``)."""

from __future__ import annotations

import os
import stat

import jax
import numpy as np
import pytest
from conftest import bits_of
from flax import nnx

from shardckpt import LMModel, ModelConfig, save_model
from shardckpt.convert import export_safetensors
from shardckpt.errors import CheckpointError
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import save_items
from shardckpt.tools.cli import main

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def dropout_checkpoint(tmp_path):
    """An LMModel with dropout: typed PRNG keys and uint32 counts under ``*.rngs.*``."""
    model = LMModel(ModelConfig(dropout=0.1), rngs=nnx.Rngs(0))
    save_model(tmp_path / "ck", model)
    return tmp_path / "ck", model


def test_format_is_an_option_with_a_default(dropout_checkpoint, tmp_path, capsys):
    ck, model = dropout_checkpoint
    for n, extra in enumerate(([], ["--format", "safetensors"], ["--safetensors"])):
        out = tmp_path / f"m{n}.safetensors"
        assert main(["export", str(ck), str(out), *extra]) == 0, extra
        assert set(safetensors_numpy.load_file(str(out))) == set(open_checkpoint(ck).read_arrays("model")) - {
            k for k in bits_of(model) if ".rngs." in k}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:   # argparse: a usage error
        main(["export", str(ck), str(tmp_path / "x.npz"), "--format", "npz"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_rng_state_is_left_out_unless_asked(dropout_checkpoint, tmp_path, capsys):
    ck, model = dropout_checkpoint
    rng_keys = sorted(k for k in bits_of(model) if ".rngs." in k)
    counts = [k for k in rng_keys if k.endswith(".rngs.count")]
    assert counts and any(k.endswith(".rngs.key") for k in rng_keys)
    assert main(["export", str(ck), str(tmp_path / "w.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {len(rng_keys)} RNG state arrays" in printed and "--include-rngs" in printed
    weights = safetensors_numpy.load_file(str(tmp_path / "w.safetensors"))
    assert not any(".rngs." in k for k in weights) and "embed.embedding" in weights

    assert main(["export", str(ck), str(tmp_path / "r.safetensors"), "--include-rngs"]) == 0
    printed = capsys.readouterr().out
    assert "typed PRNG key arrays (safetensors has no key dtype)" in printed
    with_rngs = safetensors_numpy.load_file(str(tmp_path / "r.safetensors"))
    assert set(with_rngs) == set(weights) | set(counts)   # counts kept; typed keys have no dtype
    assert all(with_rngs[k].dtype == np.uint32 for k in counts)


def test_raw_uint32_keys_and_an_optimizer_count(tmp_path):
    """Raw ``uint32`` keys of an ``nnx.Rngs`` (no typed dtype to recognise them by) are RNG
    state by their key; an optimizer's ``count`` is not."""
    tree = {"w": np.ones((2, 2), np.float32),
            "drop": {"rngs": {"count": np.array(3, np.uint32), "key": np.array([0, 42], np.uint32)}},
            "rngs": {"default": {"count": np.array(1, np.uint32), "key": jax.random.key(1)}},
            "opt_state": {"count": np.array(7, np.int32)}}
    save_items(tmp_path / "ck", {"model": tree})
    report = export_safetensors(tmp_path / "ck", tmp_path / "a.safetensors")
    assert set(safetensors_numpy.load_file(str(tmp_path / "a.safetensors"))) == {"w", "opt_state.count"}
    assert any("4 RNG state arrays" in n for n in report.notes)
    export_safetensors(tmp_path / "ck", tmp_path / "b.safetensors", include_rngs=True)
    assert set(safetensors_numpy.load_file(str(tmp_path / "b.safetensors"))) == {
        "w", "opt_state.count", "drop.rngs.count", "drop.rngs.key", "rngs.default.count"}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_file_gets_the_mode_of_the_checkpoint_files(tmp_path, umask):
    """safetensors itself writes 0o600 files; the export gets what a shard gets."""
    old = os.umask(umask)
    try:
        save_items(tmp_path / "ck", {"model": {"w": np.ones(3, np.float32)}})
        out = tmp_path / "w.safetensors"
        export_safetensors(tmp_path / "ck", out)
        shard = next((tmp_path / "ck").glob("model-*.npz"))
        assert _mode(out) == _mode(shard) == 0o644 & ~umask
        export_safetensors(tmp_path / "ck", out, overwrite=True)   # replacing keeps the rule
        assert _mode(out) == 0o644 & ~umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("how", ["cli", "python"])
@pytest.mark.parametrize("leaf", [np.ones(2, np.float32), np.array(1.5, np.float32), np.zeros((), np.uint8)])
def test_an_array_keyed_metadata_is_refused_and_nothing_written(tmp_path, capsys, how, leaf):
    """safetensors reserves ``__metadata__`` for its header (its writer accepts such a
    tensor and every reader then fails on the file): refused with our error, no file, and
    an existing file under ``--overwrite`` untouched."""
    save_items(tmp_path / "ck", {"model": {"__metadata__": leaf, "w": np.ones(2, np.float32)}})
    out = tmp_path / "w.safetensors"
    for existing in (None, b"the user's file"):
        if existing is not None:
            out.write_bytes(existing)
        before = sorted(os.listdir(tmp_path))
        if how == "cli":
            assert main(["export", str(tmp_path / "ck"), str(out), "--overwrite"]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "__metadata__" in err
        else:
            with pytest.raises(CheckpointError, match="__metadata__.*nothing was written"):
                export_safetensors(tmp_path / "ck", out, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == before
        assert (out.read_bytes() if out.exists() else None) == existing


def test_relative_and_home_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    save_items("ck", {"model": {"w": np.arange(3, dtype=np.float32)}})
    assert main(["export", "./ck", "rel.safetensors"]) == 0
    assert main(["export", "ck", "~/home.safetensors"]) == 0
    export_safetensors("./ck", "~/py.safetensors")
    for p in (tmp_path / "rel.safetensors", tmp_path / "home" / "home.safetensors", tmp_path / "home" / "py.safetensors"):
        assert np.array_equal(safetensors_numpy.load_file(str(p))["w"], np.arange(3, dtype=np.float32))
    assert not (tmp_path / "~").exists()
    capsys.readouterr()
    assert main(["export", "ck", "rel.safetensors"]) == 2   # exists: a usage error
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "nope", "x.safetensors"]) == 2
    assert main(["export", "ck", "s3://bucket/x.safetensors"]) == 2
