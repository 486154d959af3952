"""Hostile checkpoints (beyond tests/api/test_user_errors.py and tests/loading/test_original_layout.py): written by
someone who knows the format and keeps every checksum consistent. Paths leaving the
checkpoint through symlinks, FIFOs and directories in place of files, declared shapes of
10^12 elements, pickles inside shards, zip bombs, garbage and huge JSON and msgpack, and
hypothesis fuzzing of the manifest parser, the index parser and a full load of a mutated
checkpoint directory (ours and the legacy layout).

Always a ``CheckpointError`` subclass: never another exception, never a hang, nothing
executed, memory bounded. The memory bound is checked in a worker process whose address
space is limited to what it has plus 1 GiB: an attempt to allocate the declared terabytes
would surface as a ``MemoryError`` there.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import uuid
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt import CheckpointError, CheckpointManager, CorruptCheckpointError, StructureMismatchError
from shardckpt.format.index import load_index
from shardckpt.format.manifest import Manifest, seal_manifest
from shardckpt.format.shard import central_entry, crc32, end_records, local_header
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.loading.open import open_checkpoint
from shardckpt.testing import dump_index_v1, save_items
from tests.scenarios import probes
from tests.scenarios.reliability import count, forkserver, record_figures, tree_for

FIGURES: dict[str, int] = {}
SHARD = "model-00000-of-00001.npz"
HUGE = 10 ** 6                        # a [10^6, 10^6] float32 array: 4 TB, 10^12 elements


def _bump(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


class SideEffect:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- building hostile checkpoints -------------------------------------------------------------

def _base(tmp_path: Path, name: str = "ck", *, compress: bool = False, tree=None) -> Path:
    tree = tree if tree is not None else {"w": np.arange(16, dtype=np.float32)}
    return save_items(tmp_path / name, {"model": tree}, step=1, num_shards=1, compress=compress,
                           json_files={"config.json": {"model_config": None, "step": 1}})


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, m: dict) -> None:
    """Write ``m`` with a valid checksum, as a hostile writer would."""
    (path / "manifest.json").write_text(json.dumps(seal_manifest(m)))


def _reseal(path: Path, *names: str) -> None:
    """Record the current size and xxh3 of ``names`` in the manifest (``files`` or
    ``meta_files``), as a hostile writer would."""
    m = _manifest(path)
    for name in names:
        raw = (path / name).read_bytes()
        section = "files" if name in m["files"] else "meta_files"
        m[section][name] = {**m[section].get(name, {}), "size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}
    _write_manifest(path, m)


def _index(path: Path) -> dict:
    """The checkpoint's index in the version-1 row layout (which readers accept), for editing rows."""
    return msgpack.unpackb(dump_index_v1(Checkpoint(path).index()), raw=False)


def _write_index(path: Path, d: dict) -> None:
    (path / "index.msgpack").write_bytes(msgpack.packb(d, use_bin_type=True))
    _reseal(path, "index.msgpack")


def _declare(path: Path, key: str, shape: list[int], *, nbytes=None, data_offset=None, file_size=None,
             crc=0) -> None:
    """Make ``key`` a float32 array of ``shape`` in one chunk of the shard, consistently."""
    d = _index(path)
    row = d["items"]["model"][key][0]
    row[2] = [0] * len(shape)
    row[3] = shape
    row[4] = row[4] if data_offset is None else data_offset
    row[5] = int(np.prod(shape, dtype=object)) * 4 if nbytes is None else nbytes
    row[6] = crc
    d["items"]["model"][key] = [row]
    _write_index(path, d)
    m = _manifest(path)
    m["items"]["model"]["arrays"][key].update(shape=shape, stored_shape=shape)
    if file_size is not None:
        m["files"][SHARD]["size"] = file_size
    _write_manifest(path, m)


def _in_child(path: Path, how: str) -> dict:
    out = path.parent / f"probe-{uuid.uuid4().hex}.json"
    proc = forkserver().Process(target=probes.bounded_load, args=(str(path), how, str(out)))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"{how} of {path} hung")
    assert proc.exitcode == 0, f"worker crashed ({proc.exitcode})"
    return json.loads(out.read_text())


def _assert_refused_fast_and_small(path: Path, how: str, match: str) -> dict:
    r = _in_child(path, how)
    assert r["result"].startswith("shardckpt.errors."), r
    assert match in r["result"], r
    assert r["seconds"] < 10, r
    assert r["rss_growth"] < (64 << 20), r
    _bump("bounded_memory_probes")
    return r


# --- paths leaving the checkpoint, things that are not files ------------------------------------

@pytest.mark.parametrize("name", ["manifest.json", "index.msgpack", "config.json", SHARD])
def test_symlinked_file_refused(tmp_path, name):
    """Each file of the checkpoint replaced by a symlink to an identical file outside."""
    path = _base(tmp_path)
    outside = tmp_path / ("outside-" + name)
    os.rename(path / name, outside)
    os.symlink(outside, path / name)
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.")):
        ck = Checkpoint(path)
        ck.read_json("config.json")
        ck.read_arrays("model")
    _bump("symlinks")


def _load_with_timeout(path: Path, seconds: float = 20):
    box: dict = {}

    def run():
        try:
            ck = open_checkpoint(path)
            ck.read_json("config.json")
            box["value"] = ck.read_arrays("model")
        except BaseException as e:  # noqa: BLE001 - inspected below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return t, box


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("name", ["manifest.json", "index.msgpack", "config.json", SHARD])
def test_fifo_or_directory_in_place_of_a_file(tmp_path, name, kind):
    """A named pipe would block a reader that opens it: it must be refused unopened."""
    path = _base(tmp_path)
    (path / name).unlink()
    if kind == "fifo":
        os.mkfifo(path / name)
    else:
        (path / name).mkdir()
    t, box = _load_with_timeout(path)
    if t.is_alive():                       # unblock the reader before failing
        fd = os.open(path / name, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail(f"loading hung on a {kind} named {name}")
    assert isinstance(box.get("error"), CheckpointError), box
    assert name in str(box["error"])
    _bump("not_regular_files")


# --- declared sizes that do not match the files -------------------------------------------------

@pytest.mark.parametrize("how", ["read_arrays", "restore"])
@pytest.mark.parametrize("variant", ["inflated-file-size", "honest-file-size", "compressed-claim"])
def test_declared_terabyte_array_fails_fast_without_allocating(tmp_path, variant, how):
    """A [10^6, 10^6] float32 array (4 TB) declared over a 300-byte shard. The manifest may
    inflate the shard's size to match: the real size is checked before allocating."""
    path = _base(tmp_path)
    real = (path / SHARD).stat().st_size
    offset = _index(path)["items"]["model"]["w"][0][4]
    if variant == "inflated-file-size":
        _declare(path, "w", [HUGE, HUGE], file_size=offset + 4 * HUGE * HUGE)
        match = SHARD
    elif variant == "honest-file-size":
        _declare(path, "w", [HUGE, HUGE], file_size=real)
        match = "beyond the end"
    else:
        _declare(path, "w", [HUGE, HUGE], data_offset=-1, file_size=real)
        match = "claim more bytes"
    _assert_refused_fast_and_small(path, how, match)


def test_legacy_member_declaring_a_terabyte(tmp_path):
    """The guide's layout: a model.npz member whose .npy header declares [10^6, 10^6]."""
    path = tmp_path / "legacy"
    path.mkdir()
    header = {"descr": "<f4", "fortran_order": False, "shape": (HUGE, HUGE)}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    import zipfile
    with zipfile.ZipFile(path / "model.npz", "w") as zf:
        zf.writestr("w.npy", buf.getvalue() + b"\0" * 64)
    (path / "config.json").write_text(json.dumps({"model_config": None, "step": 1}))
    _assert_refused_fast_and_small(path, "read_arrays", "model.npz")


@pytest.mark.parametrize("shape", [[2] * 64, [1 << 62, 1 << 62], [-1], [1.5], ["1"], [True], [[1]]])
def test_implausible_shapes_refused_at_parse(tmp_path, shape):
    path = _base(tmp_path)
    m = _manifest(path)
    m["items"]["model"]["arrays"]["w"].update(shape=shape, stored_shape=shape)
    _write_manifest(path, m)
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        Checkpoint(path)
    _bump("hostile_manifests")


@pytest.mark.parametrize("dtype", ["O", "|O", "object", "V1000000000", "(1000000000,)f4", "S8", "U2",
                                   [["a", "<f4"]], {"names": ["a"], "formats": ["<f4"]}, "float32 ; import os",
                                   "np.float32", None, 7])
def test_hostile_dtypes_refused(tmp_path, dtype):
    path = _base(tmp_path)
    m = _manifest(path)
    m["items"]["model"]["arrays"]["w"].update(dtype=dtype)
    _write_manifest(path, m)
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        Checkpoint(path).read_arrays("model")
    _bump("hostile_manifests")


def test_unknown_prng_key_impl(tmp_path):
    import jax
    path = save_items(tmp_path / "ck", {"model": {"k": jax.random.key(0)}}, num_shards=1)
    m = _manifest(path)
    m["items"]["model"]["arrays"]["k"]["key_impl"] = "os.system"
    _write_manifest(path, m)
    with pytest.raises(CheckpointError, match="'k'"):
        Checkpoint(path).read_arrays("model")
    _bump("hostile_manifests")


# --- pickles and object arrays inside shards ----------------------------------------------------

def _pickle_member(marker: Path) -> bytes:
    """A .npy member holding an object array whose unpickling creates ``marker``."""
    arr = np.empty(16, dtype=object)
    arr[:] = [SideEffect(marker)] + ["x" * 32] * 15
    import io
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _write_zip(path: Path, name: str, member: bytes, *, compress: bool, declared_usize=None,
               stream: bytes | None = None) -> int:
    """A one-member zip written the way shard_io does; returns the member data offset
    (-1 when compressed). ``stream`` replaces the deflated payload (zip bombs);
    ``declared_usize`` replaces the declared uncompressed size."""
    bname = name.encode()
    usize = len(member) if declared_usize is None else declared_usize
    crc = zlib.crc32(member)
    if compress:
        payload = stream if stream is not None else zlib.compress(member, 9)[2:-4]
        method = 8
    else:
        payload, method = member, 0
    local = local_header(bname, crc, len(payload), usize, method, 0)
    cd = central_entry(bname, crc, len(payload), usize, method, 0)
    with open(path, "wb") as f:
        f.write(local + payload)
        cd_offset = f.tell()
        f.write(cd + end_records(1, cd_offset, len(cd)))
    return -1 if compress else len(local)


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_pickled_object_member_in_a_shard_is_never_unpickled(tmp_path, compress):
    """The shard's member holds an object array (a pickle that would create a marker file);
    index and manifest are consistent with it, the chunk CRC covers the pickle bytes. The
    loader never parses a member as a pickle: a refusal, or the raw bytes as float32."""
    marker = tmp_path / "PWNED"
    path = _base(tmp_path, compress=compress)
    member = _pickle_member(marker)
    header_len = member.index(b"\n") + 1
    offset = _write_zip(path / SHARD, "w.npy", member, compress=compress)
    raw = member[header_len:header_len + 64]
    _reseal(path, SHARD)
    d = _index(path)
    row = d["items"]["model"]["w"][0]
    row[4] = offset + header_len if offset >= 0 else -1
    row[6] = crc32(raw)
    _write_index(path, d)
    try:
        got = Checkpoint(path).read_arrays("model")
        assert got["w"].tobytes() == raw          # bytes, not objects
    except CheckpointError as e:
        assert compress and "object" in str(e), e
    assert not marker.exists(), "a pickle was executed"
    _bump("pickles_refused")


# --- zip bombs -----------------------------------------------------------------------------------

def _bomb_stream(prefix: bytes, zeros: int) -> bytes:
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    out = [comp.compress(prefix)]
    block = bytes(16 << 20)
    for _ in range(zeros // len(block)):
        out.append(comp.compress(block))
    out.append(comp.flush())
    return b"".join(out)


@pytest.mark.parametrize("variant", ["declared-huge", "undeclared-expansion"])
def test_zip_bomb_in_a_compressed_shard(tmp_path, variant):
    """A deflated member inflating to 512 MiB of zeros. Declared as such, it is refused
    before inflating; declared small (with a CRC for the declared bytes), only the declared
    bytes are inflated."""
    path = _base(tmp_path, compress=True, tree={"w": np.zeros(1024, np.float32)})
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1024,)})
    header = buf.getvalue()
    small = header + bytes(4096)
    stream = _bomb_stream(header, 512 << 20)
    declared = (512 << 20) + len(header) if variant == "declared-huge" else len(small)
    _write_zip(path / SHARD, "w.npy", small, compress=True, declared_usize=declared, stream=stream)
    _reseal(path, SHARD)
    assert (path / SHARD).stat().st_size < (4 << 20)
    if variant == "declared-huge":
        _assert_refused_fast_and_small(path, "read_arrays", "declares")
    else:
        r = _in_child(path, "read_arrays")
        assert r["result"] == "ok" and r["rss_growth"] < (64 << 20) and r["seconds"] < 10, r
        _bump("bounded_memory_probes")
    _bump("zip_bombs")


def test_zip_bomb_in_a_legacy_npz(tmp_path):
    path = tmp_path / "legacy"
    path.mkdir()
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (128 << 20,)})
    header = buf.getvalue()
    stream = _bomb_stream(header, 512 << 20)
    member = header + bytes(64)
    _write_zip(path / "model.npz", "w.npy", member, compress=True, declared_usize=(512 << 20) + len(header),
               stream=stream)
    (path / "config.json").write_text(json.dumps({"model_config": None, "step": 1}))
    r = _in_child(path, "read_arrays")
    assert r["result"].startswith("shardckpt.errors.") or r["result"] == "ok", r
    assert r["rss_growth"] < (64 << 20) or r["result"].startswith("shardckpt.errors."), r
    _bump("zip_bombs")


# --- garbage and huge JSON / msgpack --------------------------------------------------------------

INVALID_JSON = {"empty", "nul", "not-utf8", "deep", "deep-dict", "huge-int", "truncated"}
GARBAGE_JSON = {
    "empty": b"", "nul": b"\0" * 100, "not-utf8": b"\xff\xfe{\x00}", "bom": b"\xef\xbb\xbf{}",
    "null": b"null", "list": b"[]", "number": b"1e999", "nan": b'{"format": NaN}',
    "deep": b"[" * 200000 + b"]" * 200000, "deep-dict": b'{"a":' * 100000 + b"1" + b"}" * 100000,
    "huge-int": b'{"format": "shardckpt", "version": 1, "step": ' + b"9" * 100000 + b"}",
    "dup-keys": b'{"format": "shardckpt", "format": "x"}',
    "truncated": b'{"format": "shardckpt", "version": 1, "items": {',
}


@pytest.mark.parametrize("name, garbage", [(n, g) for n in ("manifest.json", "config.json") for g in sorted(GARBAGE_JSON)
                                           if n == "manifest.json" or g in INVALID_JSON])
def test_garbage_json(tmp_path, name, garbage):
    """Garbage in place of the manifest or (sealed) config.json. Valid JSON of the wrong
    shape is the manifest's problem only (a config.json of the wrong shape: see
    test_hostile_config_json)."""
    path = _base(tmp_path)
    (path / name).write_bytes(GARBAGE_JSON[garbage])
    if name != "manifest.json":
        _reseal(path, name)
    with pytest.raises(CheckpointError) as e:
        ck = Checkpoint(path)
        ck.read_json("config.json")
    assert isinstance(e.value, CorruptCheckpointError) and (name in str(e.value) or name == "manifest.json")
    _bump("garbage_inputs")


@pytest.mark.parametrize("name, size", [("manifest.json", 300 << 20), ("config.json", 100 << 20),
                                        ("index.msgpack", (2 << 30) + 1)])
def test_huge_metadata_refused_unread(tmp_path, name, size):
    """Sparse files larger than the caps: refused by their size, nothing read."""
    path = _base(tmp_path)
    with open(path / name, "r+b") as f:
        f.truncate(size)
    if name != "manifest.json":
        m = _manifest(path)
        m["meta_files"][name]["size"] = size
        _write_manifest(path, m)
    how = {"manifest.json": "open", "config.json": "read_json", "index.msgpack": "read_arrays"}[name]
    _assert_refused_fast_and_small(path, how, name if name != "manifest.json" else "manifest")


GARBAGE_MSGPACK = {
    "array32-claim": b"\xdd\xff\xff\xff\xff", "map32-claim": b"\xdf\xff\xff\xff\xff",
    "bin32-claim": b"\xc6\xff\xff\xff\xff", "deep": b"\x91" * 100000 + b"\xc0",
    "ext": msgpack.packb(msgpack.ExtType(5, b"x" * 10)), "int-keys": msgpack.packb({1: 2}),
    "bin-keys": msgpack.packb({b"files": []}, use_bin_type=True),
    "wrong-types": msgpack.packb({"version": 1, "files": "abc", "items": []}),
    "row-too-short": msgpack.packb({"version": 1, "files": [SHARD], "items": {"model": {"w": [[0, "w"]]}}}),
    "row-not-list": msgpack.packb({"version": 1, "files": [SHARD], "items": {"model": {"w": [7]}}}),
    "negative-file": msgpack.packb({"version": 1, "files": [SHARD],
                                    "items": {"model": {"w": [[-1, "w", [0], [16], 64, 64, 0]]}}}),
    "float-offset": msgpack.packb({"version": 1, "files": [SHARD],
                                   "items": {"model": {"w": [[0, "w", [0], [16], 64.5, 64, 0]]}}}),
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE_MSGPACK))
def test_garbage_index(tmp_path, garbage):
    path = _base(tmp_path)
    (path / "index.msgpack").write_bytes(GARBAGE_MSGPACK[garbage])
    _reseal(path, "index.msgpack")
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(path).read_arrays("model")
    _bump("garbage_inputs")


# --- a consistent checkpoint with a hostile config.json -------------------------------------------

@pytest.mark.parametrize("config", ["[1]", '"abc"', "null", '{"model_config": "abc"}', '{"model_config": [1]}',
                                    '{"model_config": {"no_such_field": 1}}', '{"model_config": {"vocab_size": -5}}',
                                    '{"model_config": {"vocab_size": "many"}}', '{"model_config": {}, "step": "x"}'])
def test_hostile_config_json(tmp_path, config):
    """``config.json`` is checksummed, but a hostile writer seals whatever it likes: loading
    the model it describes must fail with our error, not a TypeError from a constructor."""
    from shardckpt import load_model
    path = _base(tmp_path)
    (path / "config.json").write_text(config)
    _reseal(path, "config.json")
    for load in (lambda: load_model(path), lambda: CheckpointManager(tmp_path / "m").load(path)):
        with pytest.raises(CheckpointError):
            load()
    _bump("hostile_configs")


# --- hypothesis: parsers and a full load of mutated checkpoints ----------------------------------

FUZZ = settings(max_examples=count(80, 3000), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One checkpoint per layout to mutate: stored and deflated shards, two items."""
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for compress in (False, True):
        tree = tree_for(3, int(compress))
        path = save_items(root / f"ck-{compress}", {"model": {k: tree[k] for k in ("w_f32", "w_bf16", "w_u8")},
                                                         "opt": {"m": tree["w_i64"], "lr": 0.5}},
                               step=3, num_shards=2, compress=compress,
                               json_files={"config.json": {"model_config": None, "step": 3}}, metrics={"loss": 1.5})
        ck = Checkpoint(path)
        out[compress] = (path, {item: ck.read_arrays(item) for item in ck.items})
    return out


def _paths_in(d):
    if isinstance(d, dict):
        yield ()
        for k, v in d.items():
            for p in _paths_in(v):
                yield (k,) + p
    elif isinstance(d, list):
        yield ()
        for i, v in enumerate(d):
            for p in _paths_in(v):
                yield (i,) + p
    else:
        yield ()


def _replace(d, path, value):
    """``d`` (a copy) with the node at ``path`` replaced by ``value``."""
    if not path:
        return value
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return d


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_parser(pristine, data):
    """Random bytes, and the real manifest with a random node replaced by random JSON:
    ``Manifest.loads`` returns a manifest or raises CorruptCheckpointError."""
    path, _ = pristine[False]
    base = json.loads((path / "manifest.json").read_bytes())
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(max_size=400))
    else:
        paths = list(_paths_in(base))
        where = data.draw(st.sampled_from(paths))
        doc = _replace(json.loads(json.dumps(base)), where, data.draw(JSON))
        if isinstance(doc, dict) and data.draw(st.booleans()):
            doc = seal_manifest(doc)     # a valid checksum: the schema checks get the damage
        raw = json.dumps(doc).encode()
    try:
        Manifest.loads(raw, "fuzz")
    except CorruptCheckpointError:
        pass
    _bump("fuzz_manifest")


@FUZZ
@given(data=st.data())
def test_fuzz_index_parser(pristine, data):
    path, _ = pristine[True]
    manifest = Checkpoint(path).manifest
    raw = (path / "index.msgpack").read_bytes()       # version 2 (columns) or the version-1 rows
    base = msgpack.unpackb(raw if data.draw(st.booleans()) else dump_index_v1(load_index(raw, manifest, "ck")),
                           raw=False)
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        raw = data.draw(st.binary(max_size=400))
    elif choice == 1:
        where = data.draw(st.sampled_from(list(_paths_in(base))))
        try:
            raw = msgpack.packb(_replace(copy.deepcopy(base), where, data.draw(JSON)), use_bin_type=True)
        except (OverflowError, ValueError):     # integers msgpack cannot encode
            raw = b"\xc1"
    else:
        raw = bytearray(msgpack.packb(base, use_bin_type=True))
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    try:
        load_index(raw, manifest, "fuzz")
    except CorruptCheckpointError:
        pass
    _bump("fuzz_index")


MUTATION = st.tuples(st.sampled_from(["flip", "set", "cut", "grow", "insert", "delete"]),
                     st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(1, 64))


def _mutate(raw: bytes, op: str, where: float, byte: int, n: int) -> bytes:
    pos = int(where * len(raw)) if raw else 0
    if op == "flip" and raw:
        return raw[:pos] + bytes([raw[pos] ^ (1 << (byte % 8))]) + raw[pos + 1:]
    if op == "set" and raw:
        return raw[:pos] + bytes([byte]) * min(n, len(raw) - pos) + raw[pos + n:]
    if op == "cut":
        return raw[:pos]
    if op == "grow":
        return raw + bytes([byte]) * n
    if op == "insert":
        return raw[:pos] + bytes([byte]) * n + raw[pos:]
    return raw[:pos] + raw[pos + n:]


@FUZZ
@given(compress=st.booleans(), data=st.data())
def test_fuzz_load_of_a_mutated_checkpoint(pristine, tmp_path_factory, compress, data):
    """Mutate 1-3 files of a real checkpoint (manifest, index, shards, config) with flips,
    overwrites, cuts, growth, insertions and deletions, then load everything in it: the
    arrays are exactly the saved ones or a CheckpointError is raised, never anything else."""
    src, want = pristine[compress]
    path = tmp_path_factory.mktemp("mut") / "ck"
    shutil.copytree(src, path)
    names = sorted(n for n in os.listdir(path) if n != "structure.json")
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        raw = (path / name).read_bytes()
        for mutation in data.draw(st.lists(MUTATION, min_size=1, max_size=3)):
            raw = _mutate(raw, *mutation)
        (path / name).write_bytes(raw)
    try:
        ck = Checkpoint(path)
        ck.read_json("config.json")
        got = {item: ck.read_arrays(item, verify=True) for item in ck.items}
    except (CorruptCheckpointError, StructureMismatchError, CheckpointError):
        _bump("fuzz_load_refused")
    else:
        assert set(got) == set(want)
        for item in want:
            assert set(got[item]) == set(want[item])
            for k in want[item]:
                assert got[item][k].dtype == want[item][k].dtype and got[item][k].shape == want[item][k].shape
                assert got[item][k].tobytes() == want[item][k].tobytes(), (item, k)
    _bump("fuzz_load")
    shutil.rmtree(path.parent)


@FUZZ
@given(data=st.data())
def test_fuzz_legacy_npz(tmp_path_factory, data):
    """The legacy reader on a mutated model.npz (stored or deflated)."""
    path = tmp_path_factory.mktemp("legacy")
    tree = tree_for(4)
    arrays = {"a": tree["w_f32"][:4], "b": tree["w_i64"][:10], "c": tree["w_u8"]}
    (np.savez_compressed if data.draw(st.booleans()) else np.savez)(path / "model.npz", **arrays)
    raw = (path / "model.npz").read_bytes()
    for mutation in data.draw(st.lists(MUTATION, min_size=1, max_size=3)):
        raw = _mutate(raw, *mutation)
    (path / "model.npz").write_bytes(raw)
    (path / "config.json").write_text("{}")
    try:
        got = open_checkpoint(path).read_arrays("model")
    except CheckpointError:
        _bump("fuzz_legacy_refused")
    else:
        for k, v in got.items():
            assert k in arrays and v.shape == arrays[k].shape   # no checksums in that layout
    _bump("fuzz_legacy")
    shutil.rmtree(path)


def test_zz_record_figures():
    record_figures("hostile_input", **FIGURES)


def test_a_zip_directory_claiming_a_newer_zip_version_is_our_error(tmp_path):
    """The fuzz test's find: a central-directory entry needing "zip file version 8.4" made
    ``zipfile`` raise NotImplementedError from the archive's open, which escaped the load."""
    p = Path(save_items(tmp_path / "c", {"model": {"w": np.arange(64.0)}}, compress=True))
    shard = next(f for f in p.iterdir() if f.suffix == ".npz")
    raw = bytearray(shard.read_bytes())
    at = raw.find(b"PK\x01\x02")
    assert at >= 0
    raw[at + 6:at + 8] = (84).to_bytes(2, "little")          # version needed to extract: 8.4
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}.*zip file version"):
        Checkpoint(p).read_arrays("model", verify=True)
