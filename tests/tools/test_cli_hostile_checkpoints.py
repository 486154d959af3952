"""The ``shardckpt`` command on hostile checkpoints (issue #11.12).

Manifests, indexes and JSON files are written by hand here, bypassing our writer, with
their checksums recomputed the way the writer computes them (xxh3-64 of the file, recorded
in the manifest; the manifest itself carries no checksum, see docs/reliability.md), so
that the loader accepts them and what they carry reaches the printing code:

- metrics nested 700 deep (lists and dicts) crash neither ``ls`` (for the whole directory)
  nor ``inspect``;
- writer records whose fields are numbers, lists or dicts crash nothing;
- terminal escape sequences (ESC, CSI, OSC, BEL, C1 controls, bidi overrides, lone
  surrogates, ...) in array keys, item names, scalar values, metric names and values,
  config values, writer fields, leftover and stray file names never reach the terminal:
  every printed string is shown with visible ``\\xNN`` / ``\\uNNNN`` escapes, while
  ``--json`` output stays exact JSON (the same strings, JSON-escaped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from shardckpt.format import limits
from shardckpt.format.index import dump_index
from shardckpt.format.manifest import INDEX, seal_manifest
from shardckpt.loading.checkpoint import Checkpoint
from shardckpt.testing import save_items
from shardckpt.tools import cli

PAYLOADS = {
    "CSI clear": "\x1b[2J\x1b[H",
    "SGR red": "\x1b[31mred\x1b[0m",
    "OSC title": "\x1b]0;pwned\x07",
    "OSC 8 link": "\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\",
    "BEL": "ding\x07",
    "C1 CSI": "\x9b31m",
    "C1 NEL": "a\x85b",
    "bidi override": "abc\u202edcba",
    "bidi isolate": "x\u2067y\u2069",
    "backspace and CR": "safe\x08\x08\x08\rEVIL",
    "DEL": "a\x7fb",
    "newline": "line1\nline2",
    "lone surrogate": "\ud800",
    "rich markup": "[bold red]x[/]",
    "emoji code": ":warning:",
}

# Everything clean() escapes, except LF (which clean(newlines=True) keeps in config dumps).
UNSAFE = re.compile(cli.UNSAFE_KEEP_NL.pattern)


def seal(path: Path, manifest: dict, *, index: bytes | None = None, meta: dict[str, bytes] | None = None) -> None:
    """Write ``manifest`` (and a new index / metadata files, their sizes and xxh3-64
    recorded in it as the writer records them) into the checkpoint at ``path``."""
    for name, data in {**({INDEX: index} if index is not None else {}), **(meta or {})}.items():
        (path / name).write_bytes(data)
        manifest["meta_files"][name] = {"size": len(data), "xxh3_64": xxhash.xxh3_64(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))   # as a hostile writer would


def base_checkpoint(path: Path) -> Path:
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "name": "hi", "b": np.ones(3, np.int32)}
    return Path(save_items(path, {"model": tree}, step=5, metrics={"loss": 0.5},
                                json_files={"config.json": {"model_config": {"hidden": 4}, "step": 5}},
                                num_shards=2))


def hostile_checkpoint(path: Path, payload: str) -> Path:
    """A checkpoint whose every printable string field carries ``payload``."""
    p = base_checkpoint(path)
    ck = Checkpoint(p)
    manifest = json.loads((p / "manifest.json").read_text())
    # msgpack (the index) cannot hold a lone surrogate: keys and items keep their names then
    tag = payload if payload.encode("utf-8", "replace").decode() == payload else ""
    item = f"model{tag}"
    index = {}
    for it, by_key in ck.index().items():
        index[item if it == "model" else it] = {f"{k}{tag}": rows for k, rows in by_key.items()}
    rec = manifest["items"].pop("model")
    rec["arrays"] = {f"{k}{tag}": v for k, v in rec["arrays"].items()}
    rec["digests"] = {f"{k}{tag}": v for k, v in rec.get("digests", {}).items()}   # keyed as the arrays are
    rec["scalars"] = {f"{k}{tag}": {"type": "str", "value": payload} for k in rec["scalars"]}
    manifest["items"][item] = rec
    for f in manifest["files"].values():
        f["item"] = item
        f["writer"] = {"backend": payload, "writer": payload, "node_id": payload, "host": payload, "pid": payload}
    manifest["metrics"] = {f"loss{payload}": 0.5, "note": payload, "list": [payload, {payload: payload}]}
    manifest["writers"] = {payload: payload}
    manifest["created"] = payload
    config = json.dumps({"model_config": {payload: payload}, "step": 5, "note": payload}).encode()
    seal(p, manifest, index=dump_index(index), meta={"config.json": config})
    return p


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_terminal_safe(text: str, payload: str) -> None:
    bad = sorted({hex(ord(c)) for c in UNSAFE.findall(text)})
    assert not bad, f"unescaped {bad} reached the terminal:\n{text!r:.2000}"
    if "\n" in payload:
        assert "line1\nline2" not in text


@pytest.mark.parametrize("payload", list(PAYLOADS), ids=list(PAYLOADS))
def test_escapes_never_reach_the_terminal(tmp_path, capsys, payload):
    payload = PAYLOADS[payload]
    run = tmp_path / "run"
    p = hostile_checkpoint(run / "step_5", payload)
    # a leftover whose host part, and a stray file whose name, carry the payload
    leftover = run / f".step_6.tmp-{payload.replace('/', '_')}-123-abcdef"
    try:
        leftover.mkdir()
    except (OSError, UnicodeEncodeError):
        leftover = None
    try:
        (p / f"stray{payload}").write_bytes(b"x")
    except (OSError, UnicodeEncodeError):
        pass
    commands = [["ls", str(run)], ["ls", str(run), "--best-metric", f"loss{payload}"],
                ["inspect", str(p)], ["verify", str(p)], ["verify", str(run)],
                ["diff", str(p), str(p), "--no-verify", "--all"], ["gc", str(run), "--dry-run"]]
    for argv in commands:
        rc, out, err = run_main(capsys, argv)
        assert rc in (0, 1), (argv, rc, err)
        assert_terminal_safe(out + err, payload)
    # --json stays exact: the payload comes back byte for byte
    rc, out, _ = run_main(capsys, ["inspect", str(p), "--no-verify", "--json"])
    data = json.loads(out)
    assert data["metrics"]["note"] == payload and f"loss{payload}" in data["metrics"]
    tag = "" if payload == "\ud800" else payload
    assert {a["key"] for a in data["items"][f"model{tag}"]["arrays"]} == {f"w{tag}", f"b{tag}"}
    assert data["config"]["note"] == payload
    assert all(w["host"] == payload and w["node_id"] == payload for w in data["writers"])
    rc, out, _ = run_main(capsys, ["ls", str(run), "--json"])
    data = json.loads(out)
    assert data["checkpoints"][0]["metrics"]["note"] == payload
    if leftover is not None:
        assert any(lo["name"] == leftover.name for lo in data["leftovers"])


def deep_json(kind: str, depth: int) -> str:
    """JSON text nested ``depth`` deep (built as text: json.dumps itself would recurse)."""
    opens = ["[" if kind == "list" or (kind == "mixed" and i % 2) else '{"k":' for i in range(depth)]
    return "".join(opens) + "1.0" + "".join("]" if o == "[" else "}" for o in reversed(opens))


@pytest.mark.parametrize("kind", ["list", "dict", "mixed"])
@pytest.mark.parametrize("depth", [33, 700, 900])
def test_deeply_nested_metrics_and_config(tmp_path, capsys, kind, depth):
    run = tmp_path / "run"
    good = base_checkpoint(run / "step_4")
    p = base_checkpoint(run / "step_5")
    deep = deep_json(kind, depth)
    manifest = json.loads((p / "manifest.json").read_text())
    manifest["metrics"]["deep"] = json.loads(deep)
    config = json.dumps({"model_config": {"hidden": 4}, "deep": "__DEEP__"}).replace('"__DEEP__"', deep).encode()
    seal(p, manifest, meta={"config.json": config, "extra.json": config})      # a sealed, hostile manifest
    refused = depth > limits.MAX_JSON_DEPTH         # the loader refuses manifests nested deeper than this
    for argv in (["ls", str(run)], ["ls", str(run), "--best-metric", "deep"], ["inspect", str(p)],
                 ["verify", str(run)], ["diff", str(good), str(p)]):
        rc, out, err = run_main(capsys, argv)
        assert rc in (0, 1) and "Traceback" not in err, (argv, err)
        assert "step" in out or "identical" in out or "different" in out or "OK" in out or \
            (refused and "deeper than" in out + err), (argv, out, err)
    rc, out, _ = run_main(capsys, ["ls", str(run), "--json"])
    listing = json.loads(out)
    assert rc == 0 and [c["step"] for c in listing["checkpoints"]] == ([4] if refused else [4, 5])
    if refused:
        assert [b["name"] for b in listing["invalid"]] == ["step_5"]
    rc, out, err = run_main(capsys, ["inspect", str(p), "--json"])
    if refused:
        assert rc == 1 and "deeper than" in err
    else:
        assert rc == 0 and "nested too deep" in json.dumps(json.loads(out)["metrics"])


WRITER_FIELDS = {
    "int node_id": {"node_id": 12345, "writer": "w", "host": "h", "pid": 1},
    "list node_id": {"node_id": [1, 2, 3], "writer": "w"},
    "dict node_id": {"node_id": {"a": {"b": 1}}},
    "int writer and host": {"writer": 7, "host": 8, "backend": 9},
    "float pid": {"pid": 1.5, "host": None},
    "list pid": {"pid": [1], "node_id": ""},
    "nested deep": {"node_id": json.loads("[" * 50 + "]" * 50)},   # deeper than the display cap (32)
    "huge int": {"node_id": 10**300, "pid": 10**300},
    "bool": {"node_id": True, "writer": False},
    "long": {"node_id": "x" * 100_000},
}


@pytest.mark.parametrize("case", list(WRITER_FIELDS), ids=list(WRITER_FIELDS))
def test_writer_fields_of_any_type(tmp_path, capsys, case):
    p = base_checkpoint(tmp_path / "c")
    manifest = json.loads((p / "manifest.json").read_text())
    for f in manifest["files"].values():
        f["writer"] = WRITER_FIELDS[case]
    seal(p, manifest)
    rc, out, err = run_main(capsys, ["inspect", str(p)])
    assert rc == 0, err
    assert "shard files" in out and len(out) < 50_000
    rc, out, _ = run_main(capsys, ["inspect", str(p), "--json"])
    assert rc == 0 and json.loads(out)["writers"]


def test_writer_record_that_is_not_a_dict(tmp_path, capsys):
    p = base_checkpoint(tmp_path / "c")
    manifest = json.loads((p / "manifest.json").read_text())
    for f, v in zip(manifest["files"].values(), ([1, 2], "abc")):
        f["writer"] = v
    seal(p, manifest)
    rc, out, err = run_main(capsys, ["inspect", str(p)])
    assert rc == 1 and "writer" in err and "Traceback" not in err   # refused by the manifest schema


def test_hostile_command_line_paths_are_escaped(tmp_path, capsys):
    for payload in ("\x1b[2J", "\x9b", "\u202e"):
        for argv in (["ls", str(tmp_path / f"no{payload}")], ["inspect", str(tmp_path / f"no{payload}")],
                     ["verify", str(tmp_path / f"no{payload}")]):
            rc, out, err = run_main(capsys, argv)
            assert rc == 2
            assert_terminal_safe(out + err, payload)


def test_subprocess_output_is_clean_at_80_columns(tmp_path):
    """The installed command, piped (not a tty) at COLUMNS=80."""
    p = hostile_checkpoint(tmp_path / "run" / "step_5", "\x1b]0;pwned\x07\x9b31m\u202e")
    env = dict(os.environ, COLUMNS="80", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "shardckpt.tools.cli", "inspect", str(p)], check=False, capture_output=True,
                       env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode("utf-8")
    assert_terminal_safe(text, "")
    assert "\\x1b]0;pwned\\x07" in text.replace("\n", "").replace("│", "").replace(" ", "")
