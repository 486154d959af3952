"""Corruption, beyond tests/api/test_user_errors.py: every single-bit flip and every truncation of
every file of a checkpoint, missing files, files swapped between or within checkpoints,
another checkpoint's index or manifest, stray files.

The property checked everywhere: a load either returns exactly what was saved, bit for bit,
or raises ``CorruptCheckpointError`` (``CheckpointNotFoundError`` without a manifest) naming
the file at fault. Never wrong data with ``verify=True`` (the default), never another
exception. ``verify=False`` skips the chunk checksums, not the structural checks.

Default counts sample the byte positions; ``SHARDCKPT_STRESS=1`` flips a bit of every byte
of every file and cuts every file at every length.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import msgpack
import pytest
import xxhash

from shardckpt import CheckpointManager, CheckpointNotFoundError, CorruptCheckpointError, StructureMismatchError
from shardckpt.format.manifest import seal_manifest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import dump_index_v1, save_items
from tests.scenarios.reliability import STRESS, digest, record_figures, tree_for

FIGURES: dict[str, int] = {}


def _bump(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


def _small_tree(step: int, version: int) -> dict:
    """~3 KB in three dtypes: zip headers are a good share of each shard's bytes."""
    full = tree_for(step, version)
    return {"w_f32": full["w_f32"][:8], "w_bf16": full["w_bf16"][:4, :5], "w_u8": full["w_u8"][:3]}


def _save(path: Path, step=1, version=0, *, compress=False, num_shards=2, scalars=False,
          small=False) -> Path:
    tree = dict(_small_tree(step, version) if small else tree_for(step, version))
    if scalars:
        tree["lr"] = 0.125
        tree["name"] = "run-a"
    return save_items(path, {"model": tree}, step=step, compress=compress, num_shards=num_shards,
                           json_files={"config.json": {"model_config": None, "step": step}},
                           metrics={"loss": 0.5})


def _load(path: Path, *, verify: bool = True) -> tuple[str, dict]:
    """(digest of the arrays, the scalar leaves, config.json) as a load sees them."""
    ck = Checkpoint(path)
    arrays = ck.read_arrays("model", verify=verify)
    return digest(arrays), {"scalars": ck.manifest.items["model"].scalars,
                            "config": ck.read_json("config.json")}


def _expect_exact_or_named(path: Path, want: tuple, name: str, *, verify: bool = True) -> str:
    """Load ``path``: exactly ``want``, or an error naming ``name``. Returns which."""
    try:
        got = _load(path, verify=verify)
    except CheckpointNotFoundError as e:
        assert name == "manifest.json", f"{name}: {e}"
        return "refused"
    except StructureMismatchError as e:
        # A flipped item name in a legacy manifest (no checksum of its own): it then
        # honestly lacks the item asked for.
        assert name == "manifest.json", f"{name}: {e}"
        return "refused"
    except CorruptCheckpointError as e:
        # a damaged manifest is named by the checkpoint's path (it *is* the manifest)
        assert name in str(e) or (name == "manifest.json" and str(path) in str(e)), f"{name}: {e}"
        return "refused"
    assert got[0] == want[0], f"damage in {name} changed the arrays loaded"
    if got != want:
        # Only possible through a legacy manifest without a checksum of its own: a
        # flipped scalar value, or a flipped name in "meta_files" that unlists config.json
        # (see docs/reliability.md).
        assert name == "manifest.json", f"damage in {name} changed what was loaded"
        return "undetected-metadata"
    return "harmless"


def _flip(file: Path, offset: int, bit: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def _positions(size: int, rng: random.Random, sample: int) -> list[int]:
    if STRESS or size <= sample:
        return list(range(size))
    return sorted(rng.sample(range(size), sample))


@pytest.mark.stress
@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_every_bit_flip_is_refused_or_harmless(tmp_path, compress):
    """Flip one bit of one byte of one file, for (a sample of) every byte of every file:
    the load is exact (the byte was a zip header or padding, which the reader does not
    use) or refused naming the file. Shard data, the index and metadata are always caught."""
    path = _save(tmp_path / "ck", compress=compress, small=True)
    want = _load(path)
    rng = random.Random(1)
    names = sorted(os.listdir(path))
    pristine = {n: (path / n).read_bytes() for n in names}
    outcome: dict[str, dict[str, int]] = {}
    for name in names:
        if name == "structure.json":
            continue        # for humans; never read by a load (checked by verify)
        size = len(pristine[name])
        for pos in _positions(size, rng, 60):
            for bit in [rng.randrange(8)]:
                _flip(path / name, pos, bit)
                result = _expect_exact_or_named(path, want, name)
                (path / name).write_bytes(pristine[name])
                outcome.setdefault(name.split("-")[0] if name.endswith(".npz") else name, {}).setdefault(result, 0)
                outcome[name.split("-")[0] if name.endswith(".npz") else name][result] += 1
    # bytes that a load reads are covered by a checksum: never harmless when they change
    assert outcome["index.msgpack"].get("harmless", 0) == 0
    assert outcome["config.json"].get("harmless", 0) == 0
    assert outcome["model"].get("refused", 0) > 0
    total = sum(sum(v.values()) for v in outcome.values())
    _bump("bit_flips", total)
    _bump("bit_flips_refused", sum(v.get("refused", 0) for v in outcome.values()))
    record_figures(f"bit_flips_{'deflated' if compress else 'stored'}", flips=total, by_file=outcome)


@pytest.mark.stress
def test_every_truncation_is_refused(tmp_path):
    path = _save(tmp_path / "ck", small=True)
    want = _load(path)
    rng = random.Random(2)
    cuts = 0
    for name in sorted(os.listdir(path)):
        if name == "structure.json":
            continue
        data = (path / name).read_bytes()
        for length in _positions(len(data), rng, 25):
            (path / name).write_bytes(data[:length])
            assert _expect_exact_or_named(path, want, name) == "refused", (name, length)
            cuts += 1
        (path / name).write_bytes(data)
        # and one byte too many
        (path / name).write_bytes(data + b"\0")
        result = _expect_exact_or_named(path, want, name)
        assert result == "refused" or name == "manifest.json", name
        (path / name).write_bytes(data)
        cuts += 1
    _bump("truncations", cuts)


def test_every_missing_file(tmp_path):
    path = _save(tmp_path / "ck")
    want = _load(path)
    for name in sorted(os.listdir(path)):
        data = (path / name).read_bytes()
        (path / name).unlink()
        if name == "structure.json":
            assert _load(path) == want      # never read by a load
        else:
            assert _expect_exact_or_named(path, want, name) == "refused"
        (path / name).write_bytes(data)
        _bump("missing_files")


def test_shards_swapped_between_checkpoints(tmp_path):
    """Two checkpoints of the same structure have shards of the same names and sizes: a
    shard copied from one into the other is caught by the chunk checksums."""
    a, b = _save(tmp_path / "a", version=1), _save(tmp_path / "b", version=2)
    shards = sorted(n for n in os.listdir(a) if n.endswith(".npz"))
    assert all((a / n).stat().st_size == (b / n).stat().st_size for n in shards)
    for name in shards:
        original = (a / name).read_bytes()
        shutil.copyfile(b / name, a / name)
        with pytest.raises(CorruptCheckpointError, match=name):
            _load(a)
        # verify=False trusts the bytes of the right size: the other run's values load
        got, _ = _load(a, verify=False)
        assert got != digest(tree_for(1, 1))
        (a / name).write_bytes(original)
        _bump("swaps")
    assert _load(a)[0] == digest(tree_for(1, 1))


def test_shards_swapped_within_a_checkpoint(tmp_path):
    path = _save(tmp_path / "ck", num_shards=4)
    shards = sorted(n for n in os.listdir(path) if n.endswith(".npz"))
    for x, y in zip(shards, shards[1:]):
        os.rename(path / x, path / "swap")
        os.rename(path / y, path / x)
        os.rename(path / "swap", path / y)
        with pytest.raises(CorruptCheckpointError) as e:
            _load(path, verify=False)   # sizes differ, or else the data offsets do not fit
        assert x in str(e.value) or y in str(e.value)
        os.rename(path / x, path / "swap")
        os.rename(path / y, path / x)
        os.rename(path / "swap", path / y)
        _bump("swaps")
    _load(path)


@pytest.mark.parametrize("what", ["index.msgpack", "config.json", "manifest.json"])
def test_metadata_from_another_checkpoint(tmp_path, what):
    """Another save's index, config or manifest copied in: refused naming the file (a
    foreign manifest names the index, whose checksum it does not match)."""
    a, b = _save(tmp_path / "a", version=1), _save(tmp_path / "b", step=2, version=2)
    shutil.copyfile(b / what, a / what)
    named = "index.msgpack" if what == "manifest.json" else what
    with pytest.raises(CorruptCheckpointError, match=named.replace(".", r"\.")):
        _load(a)
    _bump("foreign_metadata")


def test_index_resealed_with_wrong_crc(tmp_path):
    """A consistent (re-sealed) index whose CRC for one chunk is wrong: the chunk is refused
    with verify=True, and read as stored with verify=False."""
    path = _save(tmp_path / "ck")
    d = msgpack.unpackb(dump_index_v1(Checkpoint(path).index()), raw=False)    # rows (version 1)
    key = "w_f32"
    d["items"]["model"][key][0][6] ^= 1
    raw = msgpack.packb(d, use_bin_type=True)
    (path / "index.msgpack").write_bytes(raw)
    m = json.loads((path / "manifest.json").read_text())
    m["meta_files"]["index.msgpack"] = {"size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    with pytest.raises(CorruptCheckpointError, match=key):
        _load(path)
    assert _load(path, verify=False)[0] == digest(tree_for(1))


def test_stray_files_are_never_read(tmp_path):
    """Files the manifest does not list (a user's notes, a pickle, an extra shard) are
    ignored: never opened, never a reason to refuse, never loaded."""
    path = _save(tmp_path / "ck")
    want = _load(path)
    (path / "notes.txt").write_text("hello")
    (path / "model-00002-of-00002.npz").write_bytes(b"PK\x03\x04 not a real shard")
    (path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    (path / "sub").mkdir()
    os.symlink("/etc/passwd", path / "link")
    assert _load(path) == want
    mgr = CheckpointManager(tmp_path, max_to_keep=None)
    assert Checkpoint(path).step == 1 and mgr.all_steps() == []   # "ck" is not a step name
    _bump("stray_files", 5)


def test_flip_in_a_manifest_scalar_is_detected(tmp_path):
    """The manifest carries a checksum of its own (more variants in test_validation.py)."""
    path = _save(tmp_path / "ck", scalars=True)
    text = (path / "manifest.json").read_text()
    assert '"value": 0.125' in text
    (path / "manifest.json").write_text(text.replace('"value": 0.125', '"value": 0.135'))
    with pytest.raises(CorruptCheckpointError):
        _load(path)


def test_zz_record_figures():
    record_figures("corruption", **FIGURES)
