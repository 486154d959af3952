"""The ``shardckpt`` command.

    shardckpt ls DIR          committed checkpoints of a manager directory
    shardckpt inspect PATH    arrays, dtypes, shapes, shards and who wrote them
    shardckpt verify PATH...  checksums and structure (exit 1 if anything is wrong)
    shardckpt diff A B        which arrays differ and by how much (exit 1 if any)
    shardckpt gc DIR          remove leftovers of dead saves, apply retention
    shardckpt convert SRC DST Orbax -> shardckpt or shardckpt -> Orbax (direction from SRC)
    shardckpt export SRC OUT  model weights as one .safetensors file (--format safetensors)
    shardckpt demo            train, save through Ray, get killed, resume bit-exactly

Exit codes: 0 all good, 1 a problem was found (a damaged checkpoint, a difference),
2 a usage error (bad arguments, a path that does not exist). ``--json`` prints one JSON
document on stdout instead of tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from shardckpt.release import __version__

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: exit code 2."""


# --- output helpers ------------------------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    kw: dict[str, Any] = {}
    if not stream.isatty():
        kw["width"] = 10_000   # pipes and logs (COLUMNS=80 or not): no table cell is wrapped
    # emoji=False: a key named ":warning:" is printed as written
    return Console(file=stream, highlight=False, soft_wrap=False, emoji=False, **kw)


# What must never reach a terminal from a checkpoint (whose names, metrics, config and
# writer records are untrusted): C0 controls (ESC starts CSI/OSC sequences, BEL, BS, CR),
# DEL, C1 controls (U+009B is a one-character CSI), bidi embeddings/overrides/isolates and
# marks (they reorder what is shown), line/paragraph separators, BOM, and lone surrogates
# (which cannot even be encoded to UTF-8).
UNSAFE_REST = r"\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
UNSAFE = re.compile(rf"[\x00-\x1f{UNSAFE_REST}]")
UNSAFE_KEEP_NL = re.compile(rf"[\x00-\x09\x0b-\x1f{UNSAFE_REST}]")


def _escape_char(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(x: Any, *, newlines: bool = False) -> str:
    """``str(x)`` safe to print on a terminal: every control, bidi or invisible formatting
    character shown as a visible ``\\xNN`` / ``\\uNNNN`` escape (``newlines``: keep LF)."""
    return (UNSAFE_KEEP_NL if newlines else UNSAFE).sub(_escape_char, str(x))


def _e(x: Any, *, newlines: bool = False) -> str:
    """Text for a rich console: ``clean``, then rich markup escaped."""
    from rich.markup import escape
    return escape(clean(x, newlines=newlines))


def _jsonable(v: Any) -> Any:
    """Strict JSON: non-finite floats become their repr string ("inf", "nan")."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _jsonable(v.item())
    return repr(v)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")
    sys.stdout.flush()


def _show(con, title: str, table) -> None:
    """A table under a bold heading line (a rich title would wrap to the table's width)."""
    con.print(f"[bold]{title}[/bold]")
    con.print(table)


def _table(columns: list[tuple[str, str]], rows: list[list[str]]):
    """A rich table that never cuts a value: ``columns`` are (header, kind) with kind
    "num" (right-aligned, kept whole: as wide as its widest cell), "short" (kept whole) or
    "text" (folded onto more lines when the terminal or pipe is narrow, never cut)."""
    from rich.table import Table
    from rich.text import Text
    table = Table()
    for n, (header, kind) in enumerate(columns):
        widest = max([len(header), *(len(Text.from_markup(r[n]).plain) for r in rows)])
        if kind == "text":
            table.add_column(header, overflow="fold")
        else:
            table.add_column(header, justify="right" if kind == "num" else "left", overflow="fold",
                             min_width=min(widest, 40))
    for r in rows:
        table.add_row(*r)
    return table


def _size(n: int | None) -> str:
    from shardckpt.progress import size_text  # no jax behind it
    return size_text(n)


MAX_VALUE_CHARS = 120


def _fmt_value(v: Any) -> str:
    """A metric or scalar value as shown in a table: floats to 6 digits, integers too long
    to read in scientific notation (10**400 is "1.00000e+400", never cut), anything
    nested as compact JSON cut at ``MAX_VALUE_CHARS``."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**16:
        digits = str(abs(v))
        return f"{'-' if v < 0 else ''}{digits[0]}.{digits[1:6]}e+{len(digits) - 1}"
    if isinstance(v, (dict, list)):
        try:
            text = json.dumps(_jsonable(v), separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            text = f"<{type(v).__name__}>"
    else:
        text = str(v)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return _fmt_value(metrics)
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items()) or "-"


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _location(p: str):
    """(store, name) of a checkpoint argument: a path or a URI (``s3://b/run/step_7``)."""
    from shardckpt.errors import CheckpointError
    from shardckpt.store.registry import resolve
    try:
        return resolve(p)
    except (CheckpointError, ValueError, ImportError) as e:
        raise UsageError(f"{p}: {e}") from e


def _existing_dir(p: str):
    """A directory argument (a path or a URI): its location as the store names it (a Path
    on a local disk, the URI elsewhere), once its store opens and holds a directory there."""
    from shardckpt.errors import CheckpointError
    from shardckpt.store.registry import open_store
    try:
        store = open_store(p)
    except (CheckpointError, ValueError, ImportError) as e:
        raise UsageError(f"{p}: {e}") from e
    if store.has_directories and not store.is_dir(""):
        parent, name = _location(p)
        raise UsageError(f"{p}: not a directory" if parent.size(name) is not None else f"{p}: no such directory")
    return store.location("")


def _existing_path(p: str) -> str:
    """A checkpoint argument (a path or a URI) that names something."""
    from shardckpt.loading.open import layout_of
    store, name = _location(p)
    if layout_of(store, name).kind == "missing":
        raise UsageError(f"{p}: no such file or directory")
    return p


def _check_prefix(prefix: str) -> None:
    from shardckpt.errors import CheckpointError
    from shardckpt.format.names import check_name
    try:
        check_name(prefix, "--prefix")
    except CheckpointError as e:
        raise UsageError(str(e)) from None


# --- ls --------------------------------------------------------------------------------------

def cmd_ls(args) -> int:
    from shardckpt.tools.inspect import format_time, list_dir

    _check_prefix(args.prefix)
    directory = _existing_dir(args.dir)
    data = list_dir(directory, args.prefix, args.best_metric, args.best_mode)
    if args.json:
        _print_json(data)
        return EXIT_OK
    con = _console()
    infos = data["checkpoints"]
    if not infos and data["layout"] == "orbax":
        from shardckpt.loading.open import orbax_hint
        con.print(_e(orbax_hint(str(directory), data["orbax"])))
    elif not infos:
        con.print(f"{_e(directory)}: no committed checkpoints named {_e(args.prefix)}_<step>")
    else:
        best = f"best {args.best_metric} ({args.best_mode})" if args.best_metric else None
        rows = []
        for i in infos:
            marks = [m for m, on in (("latest", i["latest"]), ("best", i["best"])) if on]
            rows.append([str(i["step"]), _e(format_time(i["created"])), _e(_fmt_metrics(i["metrics"])),
                         _size(i["bytes"]), str(i["files"]), _e(",".join(i["items"])), ", ".join(marks)])
        table = _table([("step", "num"), ("created", "short"), ("metrics", "text"), ("size", "num"),
                        ("shards", "num"), ("items", "text"), ("marks", "short")], rows)
        _show(con, f"{_e(directory)}: {len(infos)} checkpoints, {_size(data['total_bytes'])}", table)
        if best and not any(i["best"] for i in infos):
            con.print(f"no checkpoint has a finite metric {_e(repr(args.best_metric))}: none marked best")
    for bad in data["invalid"]:
        con.print(f"[yellow]not a checkpoint[/yellow]: {_e(bad['name'])}: {_e(bad['problem'])}")
    if data["leftovers"]:
        rows = [[_e(lo["name"]), _e(lo["kind"]), _e(lo["host"]), _e(lo["pid"]),
                 "alive" if lo["owner_alive"] else "dead", f"{lo['age_s']:.0f}s", _e(lo["action"])]
                for lo in data["leftovers"]]
        table = _table([("name", "text"), ("kind", "short"), ("host", "text"), ("pid", "num"),
                        ("owner", "short"), ("age", "num"), ("gc would", "short")], rows)
        _show(con, "leftovers of unfinished saves and deletes (shardckpt gc removes dead ones)", table)
    return EXIT_OK


# --- inspect ---------------------------------------------------------------------------------

def _refuse_directory_of_steps(p: str, command: str) -> None:
    """``inspect``/``diff`` of a manager directory: say which command fits, not "damaged"."""
    from shardckpt.loading.open import layout_of
    store, name = _location(p)
    if layout_of(store, name).kind == "steps":
        raise UsageError(f"{p} is a directory of checkpoints, not one checkpoint: `shardckpt ls {p}` lists them, "
                         f"`shardckpt verify {p}` checks them all, `shardckpt {command} {p}/<step dir>` "
                         "looks at one")


def _damage(path: str, checksums: bool = True, progress: bool | None = False, label: str | None = None) -> list[str]:
    """Every problem ``verify`` finds in the checkpoint at ``path`` (checksums of every file
    and chunk included), so that ``inspect`` and ``diff`` never present damaged data as
    sound."""
    from shardckpt.tools.verify import verify
    return verify(path, checksums=checksums, progress=progress, label=label).problems


def cmd_inspect(args) -> int:
    from shardckpt.tools.inspect import describe, format_time

    path = _existing_path(args.path)
    _refuse_directory_of_steps(path, "inspect")
    data = describe(path)
    data["damage"] = [] if args.no_verify else _damage(path, progress=None if not args.json else False)
    data["verified"] = not args.no_verify
    rc = EXIT_PROBLEM if data["damage"] else EXIT_OK
    if args.json:
        _print_json(data)
        return rc
    con = _console()
    con.print(f"[bold]{_e(data['path'])}[/bold]  ({_e(data['layout'])} layout)")
    con.print(f"  step: {_e(data['step'])}")
    if data.get("created"):
        con.print(f"  created: {_e(format_time(data['created']))} ({_e(data['created'])})")
    if data.get("versions"):
        con.print("  written by: " + _e(", ".join(f"{k} {v}" for k, v in data["versions"].items())))
    if data.get("host_count"):
        con.print(f"  hosts: {_e(data['host_count'])}")
    con.print(f"  size: {_size(data['total_bytes'])} in {len(data['files'])} shard files"
              f" + {len(data['meta_files'])} metadata files")
    for item, rec in data["items"].items():
        rows = [[_e(a["key"]), _e(a["dtype"]), _e(_shape(a["shape"])), _size(a["nbytes"]),
                 "-" if a["chunks"] is None else str(a["chunks"])] for a in rec["arrays"]]
        table = _table([("key", "text"), ("dtype", "short"), ("shape", "num"), ("size", "num"),
                        ("chunks", "num")], rows)
        _show(con, f"item {_e(item)}: {len(rec['arrays'])} arrays, {_size(rec['nbytes'])}", table)
        if rec["scalars"]:
            rows = [[_e(k), _e(_fmt_value(repr(v)))] for k, v in rec["scalars"].items()]
            _show(con, f"item {_e(item)}: {len(rec['scalars'])} scalar leaves",
                  _table([("key", "text"), ("value", "text")], rows))
    if data["files"]:
        rows = []
        for f in data["files"]:
            w = f.get("writer") if isinstance(f.get("writer"), dict) else {}
            rows.append([_e(f["name"]), _e(f.get("item") or "-"), _size(f["size"]),
                         *(_e(_fmt_value(w.get(k, "-"))) for k in ("backend", "writer")),
                         _e(_fmt_value(w.get("node_id") or "-")[:16]),
                         *(_e(_fmt_value(w.get(k, "-"))) for k in ("pid", "host"))])
        table = _table([("file", "text"), ("item", "text"), ("size", "num"), ("backend", "text"),
                        ("writer", "text"), ("node", "text"), ("pid", "num"), ("host", "text")], rows)
        _show(con, "shard files", table)
    if data["writers"]:
        con.print("  writers: " + "; ".join(
            _e(f"{w['writer'] or '?'} ({w['backend'] or '?'}) pid {w['pid']} on "
               f"{w['node_id'][:12] + ' / ' if w['node_id'] else ''}{w['host']}: {w['shards']} shards")
            for w in data["writers"]))
    if data["meta_files"]:
        con.print("  metadata files: " + _e(", ".join(f"{m['name']} ({_size(m['size'])})"
                                                      for m in data["meta_files"])))
    con.print(f"  metrics: {_e(_fmt_metrics(data['metrics']))}")
    for name, key in (("config.json", "config"), ("extra.json", "extra")):
        if data.get(key) is not None:
            con.print(f"{name}:")
            # json.dumps escapes every control and non-ASCII character; clean() the rest
            con.print(_e(json.dumps(_jsonable(data[key]), indent=1), newlines=True))
    for w in data["warnings"]:
        con.print(f"[yellow]warning[/yellow]: {_e(w)}")
    if not data["verified"]:
        con.print("  checksums: not verified (--no-verify)")
    elif data["damage"]:
        con.print(f"[red]DAMAGED[/red]: {len(data['damage'])} problem(s) (shardckpt verify shows the same):")
        for p in data["damage"]:
            con.print(f"  - {_e(p)}")
    else:
        con.print("  checksums: [green]OK[/green] (every file and chunk verified)")
    return rc


# --- verify ----------------------------------------------------------------------------------

def _verify_targets(p: str) -> list[tuple[str, Any]]:
    """A checkpoint, or a manager directory (no manifest of its own, committed steps inside):
    every committed step in step order, then each step directory that is not a valid
    checkpoint (as a problem)."""
    from shardckpt.loading.open import layout_of
    from shardckpt.tools.inspect import scan
    _existing_path(p)
    store, name = _location(p)
    if layout_of(store, name).kind in ("checkpoint", "legacy", "file", "orbax"):
        return [(p, None)]
    infos, invalid = scan(p)
    if not infos and not invalid:
        return [(p, None)]
    return [(str(i["path"]), None) for i in infos] + [(str(b["path"]), b["problem"]) for b in invalid]


def cmd_verify(args) -> int:
    from shardckpt.tools.verify import VerifyReport, verify

    progress = False if (args.json or args.no_progress) else None
    targets = [t for p in args.paths for t in _verify_targets(p)]
    reports = []
    for path, problem in targets:
        if problem is None:
            reports.append(verify(path, checksums=not args.no_checksums, progress=progress))
        else:
            r = VerifyReport(path, checksums=not args.no_checksums, layout="")
            r.problem(f"{path}: {problem}")
            reports.append(r)
    if args.json:
        _print_json([r.to_json() for r in reports])
    else:
        con = _console()
        for r in reports:
            what = (f"{r.files_checked} files, {_size(r.bytes_checked)} hashed, {r.arrays} arrays"
                    if r.checksums else f"{r.files_checked} files, {r.arrays} arrays, checksums skipped")
            if r.ok:
                con.print(f"[green]OK[/green]      {_e(r.path)} ({what})")
            else:
                plural = "s" if len(r.problems) != 1 else ""
                con.print(f"[red]FAILED[/red]  {_e(r.path)} ({what}): {len(r.problems)} problem{plural}")
                for p in r.problems:
                    con.print(f"  - {_e(p)}")
            for n in r.notes:
                con.print(f"  note: {_e(n)}")
        if len(reports) > 1:
            bad = sum(not r.ok for r in reports)
            con.print(f"{len(reports) - bad} of {len(reports)} checkpoints OK")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PROBLEM


# --- diff ------------------------------------------------------------------------------------

def cmd_diff(args) -> int:
    from shardckpt.tools.inspect import diff

    for p in (args.a, args.b):
        _existing_path(p)
        _refuse_directory_of_steps(p, "diff")
    if args.atol < 0 or not math.isfinite(args.atol):
        raise UsageError(f"--atol {args.atol}: expected a finite number >= 0")
    bars = False if args.json else None
    damage = {} if args.no_verify else {side: _damage(p, progress=bars, label=f"{side.upper()} ({p})")
                                        for side, p in (("a", args.a), ("b", args.b))}
    damaged = any(damage.values())
    if damaged:
        # Comparing damaged data would report differences (or sameness) that are not there.
        data: dict[str, Any] = {"a": args.a, "b": args.b, "atol": args.atol, "items": {}, "only_in_a_items": [],
                                "only_in_b_items": [], "identical": False}
    else:
        data = diff(args.a, args.b, atol=args.atol)
    data["damage"] = damage
    data["verified"] = not args.no_verify
    rc = EXIT_OK if data["identical"] else EXIT_PROBLEM
    if args.json:
        _print_json(data)
        return rc
    con = _console()
    con.print(f"A = {_e(args.a)}\nB = {_e(args.b)}")
    if damaged:
        err = _console(stderr=True)
        for side, problems in damage.items():
            for p in problems:
                err.print(f"[red]{side.upper()} is damaged[/red]: {_e(p)}")
        err.print("[red]not compared: damaged checkpoint[/red] (shardckpt verify shows the same)")
        return rc
    for label, items in (("only in A", data["only_in_a_items"]), ("only in B", data["only_in_b_items"])):
        if items:
            con.print(f"items {label}: {_e(', '.join(items))}")
    for item, rec in data["items"].items():
        rows = rec["keys"]
        shown = [r for r in rows if args.all or r["status"] != "equal"]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("equal", "close", "differs", "shape", "dtype")}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        con.print(f"[bold]item {_e(item)}[/bold]: {len(rows)} keys in both ({summary or 'none'})")
        if shown:
            cells = []
            for r in shown:
                if r["status"] in ("shape", "dtype"):
                    a, b = (_shape(r["a"]), _shape(r["b"])) if r["status"] == "shape" else (r["a"], r["b"])
                    cells.append([_e(r["key"]), f"[red]{r['status']} differs[/red]",
                                  _e(f"{a} vs {b}") if r["status"] == "dtype" else "",
                                  _e(f"{a} vs {b}") if r["status"] == "shape" else "", "", ""])
                elif r.get("scalar"):
                    cells.append([_e(r["key"]), r["status"], "scalar", "", "",
                                  "" if r["status"] == "equal" else
                                  _e(f"{_fmt_value(repr(r['a']))} vs {_fmt_value(repr(r['b']))}")])
                else:
                    mad = r["max_abs_diff"]
                    cells.append([_e(r["key"]), r["status"], _e(r["dtype"]), _e(_shape(r["shape"])),
                                  str(r["differing"]), "raw bits" if mad is None else f"{mad:.6g}"])
            con.print(_table([("key", "text"), ("status", "short"), ("dtype", "short"), ("shape", "num"),
                              ("differing", "num"), ("max abs diff", "num")], cells))
        for label, keys in (("only in A", rec["only_in_a"]), ("only in B", rec["only_in_b"])):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 20 else ""
                con.print(f"  keys {label}: {_e(', '.join(keys[:20]))}{more}")
    con.print("[green]identical[/green]" if data["identical"] else "[red]different[/red]")
    return rc


# --- gc --------------------------------------------------------------------------------------

def _clear_tier(args, directory) -> int:
    """``gc --clear``: drop every file of a memory tier from its holders (a previous job's
    steps); a directory or bucket is never cleared wholesale."""
    from shardckpt.store.registry import open_store
    store = open_store(directory)
    clear = getattr(store, "clear", None)     # what only the memory tier offers
    if clear is None:
        raise UsageError(f"{args.dir}: --clear drops a memory tier's steps (mem://NAME); a directory keeps its "
                         "newest checkpoint: use --max-to-keep")
    files = 0 if args.dry_run else clear()
    if args.json:
        _print_json({"directory": str(directory), "dry_run": args.dry_run, "cleared_files": files})
    else:
        _console().print(f"{'would clear' if args.dry_run else 'cleared'} {_e(str(directory))}"
                         + ("" if args.dry_run else f": {files} files released"))
    return EXIT_OK


def cmd_gc(args) -> int:
    from shardckpt.tools.inspect import gc_plan, run_gc

    _check_prefix(args.prefix)
    directory = _existing_dir(args.dir)
    if args.clear:
        return _clear_tier(args, directory)
    if args.max_to_keep is not None and args.max_to_keep < 1:
        raise UsageError(f"--max-to-keep {args.max_to_keep}: keep at least 1 (omit it to keep all)")
    if args.best_to_keep < 0:
        raise UsageError(f"--best-to-keep {args.best_to_keep}: expected >= 0")
    plan = gc_plan(directory, args.prefix, args.max_to_keep, args.best_metric, args.best_mode, args.best_to_keep)
    result: dict[str, Any] = {"directory": str(directory), "dry_run": args.dry_run,
                              "kept_leftovers": plan["kept_leftovers"], "protected": plan["protected"]}
    if args.dry_run:
        result["leftovers"], result["deleted_steps"] = plan["leftovers"], plan["deleted_steps"]
    else:
        result.update(run_gc(plan))
    infos = [{"step": s, "name": n} for s, n in sorted(plan["names"].items())]
    result["kept_steps"] = [i["step"] for i in infos if i["step"] not in result["deleted_steps"]]
    rc = EXIT_PROBLEM if result.get("failed") else EXIT_OK
    if args.json:
        _print_json(result)
        return rc
    con = _console()
    verb = "would remove" if args.dry_run else "removed"
    for lo in result["leftovers"]:
        if lo["action"] == "restore":
            con.print(f"{'would restore' if args.dry_run else 'restored'} {_e(lo['name'])} "
                      f"(an interrupted replacement) as {_e(lo.get('checkpoint', ''))}")
        else:
            con.print(f"{verb} leftover {_e(lo['name'])}")
    for lo in result["kept_leftovers"]:
        con.print(f"kept leftover {_e(lo['name'])} (its owner, pid {_e(lo['pid'])} on {_e(lo['host'])}, "
                  "may still run)")
    step_verb = "would delete" if args.dry_run else "deleted"
    by_step = {i["step"]: i for i in infos}
    for p in result["protected"]:
        why = "the original single-file layout" if p["legacy"] else f"files shardckpt did not write: {', '.join(p['foreign'][:5])}"
        con.print(f"left alone {_e(p['name'])} ({_e(why)})")
    for s in result["deleted_steps"]:
        name = by_step[s]["name"] if s in by_step else f"{args.prefix}_{s}"
        con.print(f"{step_verb} {_e(name)}")
    if args.max_to_keep is None and args.best_metric:
        con.print("note: without --max-to-keep every checkpoint is kept; --best-metric only protects "
                  "checkpoints that --max-to-keep would delete")
    for f in result.get("failed", []):
        con.print(f"[red]could not remove[/red] {_e(f['name'])}: {_e(f['error'])}")
    con.print(f"kept steps: {result['kept_steps'] or 'none'}"
              + (" (dry run: nothing was changed)" if args.dry_run else ""))
    return rc


# --- convert / export ------------------------------------------------------------------------

def _print_report(report) -> None:
    con = _console()
    verb = "exported" if report.direction == "export" else "converted"
    what = {"from_orbax": f"Orbax {report.kind} -> shardckpt", "to_orbax": f"shardckpt -> Orbax {report.kind}",
            "export": "safetensors"}[report.direction]
    con.print(f"{verb} {_e(report.src)} ({what}), items: {_e(', '.join(report.items) or '-')}")
    for path in report.written:
        con.print(f"  wrote {_e(path)}")
    for note in report.notes:
        con.print(f"  note: {_e(note)}")


def _tool_paths(src: str, dst: str, *, new_dir: bool, overwrite: bool = False) -> tuple[Path, Path]:
    """SRC and DST of ``convert`` / ``export`` as absolute local paths (``~`` and ``file://``
    read as everywhere else; Orbax itself refuses relative paths), checked as usage errors
    before anything is read: SRC exists; DST does not, or is an empty directory for
    ``convert`` (``new_dir``), or a file that ``export --overwrite`` replaces. The library
    checks DST again when it publishes (someone may fill it meanwhile)."""
    from shardckpt.errors import CheckpointError
    from shardckpt.store.registry import is_uri, local_root
    paths = []
    for p in (src, dst):
        if is_uri(p):
            raise UsageError(f"{p}: convert and export work on local paths (copy the checkpoint here first)")
        try:
            paths.append(local_root(p))
        except (CheckpointError, TypeError, ValueError) as e:
            raise UsageError(f"{p}: {e}") from e
    if not os.path.lexists(paths[0]):
        raise UsageError(f"{src}: no such file or directory")
    out = paths[1]
    try:
        if not os.path.lexists(out):
            free = True
        elif out.is_dir() and not out.is_symlink():
            free = new_dir and not any(os.scandir(out))
        else:
            free = overwrite
    except OSError as e:
        raise UsageError(f"{dst}: cannot check it ({e.strerror or e})") from e
    if not free:
        why = "and is not an empty directory" if new_dir else "(--overwrite replaces a file)"
        raise UsageError(f"{dst}: exists {why}; refusing to overwrite it")
    return paths[0], out


def _done(args, report) -> int:
    if args.json:
        _print_json(report.to_json())
    else:
        _print_report(report)
    return EXIT_OK


def cmd_convert(args) -> int:
    from shardckpt.tools import convert

    src, dst = _tool_paths(args.src, args.dst, new_dir=True)
    model_config = None
    if args.model_config:
        try:
            model_config = json.loads(Path(os.path.expanduser(args.model_config)).read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise UsageError(f"--model-config {args.model_config}: {e}") from e
    return _done(args, convert.convert(src, dst, step=args.step, model_config=model_config,
                                       skip_unknown=args.skip_unknown, kind=args.orbax_kind,
                                       nnx_values=False if args.pure_dict else None))


def cmd_export(args) -> int:
    from shardckpt.tools.export import export_safetensors

    src, out = _tool_paths(args.src, args.out, new_dir=False, overwrite=args.overwrite)
    return _done(args, export_safetensors(src, out, item=args.item, overwrite=args.overwrite,
                                          include_rngs=args.include_rngs))


def _add_convert_parsers(sub) -> None:
    p = sub.add_parser("convert", help="Orbax checkpoint -> shardckpt, or shardckpt -> Orbax (from SRC)",
                       formatter_class=_Formatter)
    p.add_argument("src", help="an Orbax checkpoint, step or CheckpointManager directory, or a shardckpt "
                               "checkpoint or manager directory")
    p.add_argument("dst", help="a new (or empty) directory")
    p.add_argument("--step", type=int, default=None, help="Orbax -> shardckpt: the step to record")
    p.add_argument("--model-config", default=None, metavar="FILE.json",
                   help="Orbax -> shardckpt: model config for config.json (what load_model builds)")
    p.add_argument("--skip-unknown", action="store_true",
                   help="Orbax -> shardckpt: skip items of handlers other than pytree/standard/json")
    p.add_argument("--orbax-kind", choices=("standard", "pytree", "manager"), default=None,
                   help="shardckpt -> Orbax: checkpointer layout (default: standard; manager for a "
                        "manager directory or a checkpoint that came from an Orbax step)")
    p.add_argument("--pure-dict", action="store_true",
                   help="shardckpt -> Orbax: leaves as in state.to_pure_dict(), without nnx's 'value' level")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write a checkpoint's model weights in another format",
                       formatter_class=_Formatter)
    p.add_argument("src", help="a shardckpt checkpoint")
    p.add_argument("out", metavar="OUT", help="the file to write (OUT.safetensors)")
    p.add_argument("--format", choices=("safetensors",), default="safetensors",   # tools.export.FORMATS (imports jax)
                   help="the file format")
    p.add_argument("--safetensors", dest="format", action="store_const", const="safetensors",
                   help="the same as --format safetensors")
    p.add_argument("--item", default="model", help="which item")
    p.add_argument("--include-rngs", action="store_true",
                   help="keep the numeric RNG state (nnx.Rngs counts and raw keys; typed PRNG keys are always left out)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true")


# --- main ------------------------------------------------------------------------------------

class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (options whose default means "off" or "none" say
    so in their help instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.dest == "help":
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardckpt", description="Sharded checkpoints for JAX / Flax NNX",
                                     epilog="exit codes: 0 ok, 1 problem found, 2 usage error",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"shardckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    from shardckpt.tools import demo
    demo.add_arguments(add("demo", "train, save through Ray, get killed, resume bit-exactly"))

    p = add("ls", "list the committed checkpoints of a manager directory")
    p.add_argument("dir", help="a manager directory: a local path or a URI (s3://bucket/run?endpoint_url=...)")
    p.add_argument("--prefix", default="step", help="checkpoint names are PREFIX_<step>")
    p.add_argument("--best-metric", default=None, metavar="NAME", help="mark the best checkpoint by this metric")
    p.add_argument("--best-mode", choices=("min", "max"), default="min", help="is a smaller or larger metric better")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = add("inspect", "arrays, dtypes, shapes, shards and writers of a checkpoint; checksums verified")
    p.add_argument("path")
    p.add_argument("--no-verify", action="store_true",
                   help="do not read every file to verify its checksums (fast; damage goes unreported)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = add("verify", "check structure and checksums (exit 1 if anything is wrong)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="checkpoints, or manager directories (every committed step is verified)")
    p.add_argument("--no-checksums", action="store_true", help="check structure and sizes only (fast)")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = add("diff", "which arrays of two checkpoints differ, and by how much (both verified first)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=0.0,
                   help="arrays whose max abs difference is <= ATOL count as equal (0: same bits)")
    p.add_argument("--all", action="store_true", help="list equal keys too")
    p.add_argument("--no-verify", action="store_true",
                   help="compare without verifying every file's checksum first")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = add("gc", "remove leftovers of dead saves and apply retention")
    p.add_argument("dir", help="a manager directory: a local path or a URI (s3://bucket/run?endpoint_url=...)")
    p.add_argument("--max-to-keep", type=int, default=None, metavar="N",
                   help="keep the N most recent (default: keep all; only leftovers are removed)")
    p.add_argument("--best-metric", default=None, metavar="NAME",
                   help="also keep the best checkpoints by this metric (default: none)")
    p.add_argument("--best-mode", choices=("min", "max"), default="min", help="is a smaller or larger metric better")
    p.add_argument("--best-to-keep", type=int, default=3, metavar="K",
                   help="with --best-metric: how many of the best checkpoints to keep")
    p.add_argument("--prefix", default="step", help="checkpoint names are PREFIX_<step>")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed, change nothing")
    p.add_argument("--clear", action="store_true",
                   help="a memory tier (mem://NAME) only: drop all its steps from the nodes' memory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_convert_parsers(sub)
    return parser


COMMANDS = {"ls": cmd_ls, "inspect": cmd_inspect, "verify": cmd_verify, "diff": cmd_diff, "gc": cmd_gc,
            "convert": cmd_convert, "export": cmd_export}


def _error(command: str, e: BaseException) -> None:
    print(f"shardckpt {command}: {clean(e)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from shardckpt.errors import CheckpointError, CheckpointNotFoundError
    try:
        if args.command == "demo":
            from shardckpt.tools import demo
            return demo.run_demo(args.dir, args.steps, args.save_every, args.kill_after, args.backend,
                                 cleanup=args.cleanup)
        return COMMANDS[args.command](args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"shardckpt {args.command}: error: {clean(e)}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointNotFoundError as e:
        _error(args.command, e)
        return EXIT_USAGE
    except CheckpointError as e:
        _error(args.command, e)
        return EXIT_PROBLEM
    except BrokenPipeError:   # `shardckpt ls | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        except OSError:
            pass
        return EXIT_OK
    except OSError as e:
        _error(args.command, e)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
