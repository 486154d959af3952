"""The ``shardckpt`` command.

    shardckpt ls DIR          committed checkpoints of a manager directory
    shardckpt inspect PATH    arrays, dtypes, shapes, shards and who wrote them
    shardckpt verify PATH...  checksums and structure (exit 1 if anything is wrong)
    shardckpt diff A B        which arrays differ and by how much (exit 1 if any)
    shardckpt gc DIR          remove leftovers of dead saves, apply retention
    shardckpt convert SRC DST Orbax -> shardckpt or shardckpt -> Orbax (direction from SRC)
    shardckpt export --safetensors SRC OUT   model weights as one .safetensors file
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

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: exit code 2."""


# --- output helpers ------------------------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    kw: dict[str, Any] = {}
    if not stream.isatty() and "COLUMNS" not in os.environ:
        kw["width"] = 200   # pipes and logs: do not wrap tables at 80 columns
    return Console(file=stream, highlight=False, soft_wrap=False, **kw)


def _e(x: Any) -> str:
    from rich.markup import escape
    return escape(str(x))


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


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items()) or "-"


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _existing_dir(p: str):
    from .store import open_store
    if open_store(p).local_path("") is None:
        return p                  # an object store: listing tells whether anything is there
    path = Path(p)
    if not path.exists():
        raise UsageError(f"{p}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{p}: not a directory")
    return path


def _check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", prefix):
        raise UsageError(f"--prefix {prefix!r}: use letters, digits, '_' and '-'")


# --- ls --------------------------------------------------------------------------------------

def cmd_ls(args) -> int:
    from rich.table import Table
    from .inspection import format_time, list_dir

    _check_prefix(args.prefix)
    directory = _existing_dir(args.dir)
    data = list_dir(directory, args.prefix, args.best_metric, args.best_mode)
    if args.json:
        _print_json(data)
        return EXIT_OK
    con = _console()
    infos = data["checkpoints"]
    if not infos:
        con.print(f"{_e(directory)}: no committed checkpoints named {_e(args.prefix)}_<step>")
    else:
        best = f"best {args.best_metric} ({args.best_mode})" if args.best_metric else None
        table = Table()
        table.add_column("step", justify="right", no_wrap=True)
        table.add_column("created", no_wrap=True)
        table.add_column("metrics")
        table.add_column("size", justify="right", no_wrap=True)
        table.add_column("shards", justify="right", no_wrap=True)
        table.add_column("items", no_wrap=True)
        table.add_column("marks", no_wrap=True)
        for i in infos:
            marks = [m for m, on in (("latest", i["latest"]), ("best", i["best"])) if on]
            table.add_row(str(i["step"]), _e(format_time(i["created"])), _e(_fmt_metrics(i["metrics"])),
                          _size(i["bytes"]), str(i["files"]), _e(",".join(i["items"])),
                          ", ".join(marks) or "")
        _show(con, f"{_e(directory)}: {len(infos)} checkpoints, {_size(data['total_bytes'])}", table)
        if best and not any(i["best"] for i in infos):
            con.print(f"no checkpoint has a finite metric {_e(args.best_metric)!r}: none marked best")
    for bad in data["invalid"]:
        con.print(f"[yellow]not a checkpoint[/yellow]: {_e(bad['name'])}: {_e(bad['problem'])}")
    if data["leftovers"]:
        table = Table()
        for col in ("name", "kind", "host", "pid", "owner", "age", "gc would"):
            table.add_column(col, no_wrap=True)
        for lo in data["leftovers"]:
            table.add_row(_e(lo["name"]), lo["kind"], _e(lo["host"]), str(lo["pid"]),
                          "alive" if lo["owner_alive"] else "dead", f"{lo['age_s']:.0f}s", lo["action"])
        _show(con, "leftovers of unfinished saves and deletes (shardckpt gc removes dead ones)", table)
    return EXIT_OK


# --- inspect ---------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from rich.table import Table
    from .inspection import describe, format_time

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{args.path}: no such file or directory")
    data = describe(path)
    if args.json:
        _print_json(data)
        return EXIT_OK
    con = _console()
    con.print(f"[bold]{_e(data['path'])}[/bold]  ({data['layout']} layout)")
    con.print(f"  step: {data['step']}")
    if data.get("created"):
        con.print(f"  created: {_e(format_time(data['created']))} ({_e(data['created'])})")
    if data.get("versions"):
        con.print("  written by: " + _e(", ".join(f"{k} {v}" for k, v in data["versions"].items())))
    if data.get("host_count"):
        con.print(f"  hosts: {data['host_count']}")
    con.print(f"  size: {_size(data['total_bytes'])} in {len(data['files'])} shard files"
              f" + {len(data['meta_files'])} metadata files")
    for item, rec in data["items"].items():
        table = Table()
        for col, just in (("key", "left"), ("dtype", "left"), ("shape", "left"), ("size", "right"),
                          ("chunks", "right")):
            table.add_column(col, justify=just, no_wrap=True)
        for a in rec["arrays"]:
            table.add_row(_e(a["key"]), _e(a["dtype"]), _shape(a["shape"]), _size(a["nbytes"]),
                          "-" if a["chunks"] is None else str(a["chunks"]))
        _show(con, f"item {_e(item)}: {len(rec['arrays'])} arrays, {_size(rec['nbytes'])}", table)
        if rec["scalars"]:
            st = Table()
            st.add_column("key", no_wrap=True)
            st.add_column("value")
            for k, v in rec["scalars"].items():
                st.add_row(_e(k), _e(repr(v)))
            _show(con, f"item {_e(item)}: {len(rec['scalars'])} scalar leaves", st)
    if data["files"]:
        table = Table()
        for col, just in (("file", "left"), ("item", "left"), ("size", "right"), ("backend", "left"),
                          ("writer", "left"), ("node", "left"), ("pid", "right"), ("host", "left")):
            table.add_column(col, justify=just, no_wrap=True)
        for f in data["files"]:
            w = f.get("writer") or {}
            table.add_row(_e(f["name"]), _e(f.get("item") or "-"), _size(f["size"]),
                          _e(w.get("backend", "-")), _e(w.get("writer", "-")),
                          _e(str(w.get("node_id") or "-")[:16]), _e(w.get("pid", "-")), _e(w.get("host", "-")))
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
    if data.get("config") is not None:
        con.print("config.json:")
        con.print(_e(json.dumps(_jsonable(data["config"]), indent=1)))
    if data.get("extra") is not None:
        con.print("extra.json:")
        con.print(_e(json.dumps(_jsonable(data["extra"]), indent=1)))
    for w in data["warnings"]:
        con.print(f"[yellow]warning[/yellow]: {_e(w)}")
    return EXIT_OK


# --- verify ----------------------------------------------------------------------------------

def cmd_verify(args) -> int:
    from .verification import verify

    progress = False if (args.json or args.no_progress) else None
    reports = [verify(p, checksums=not args.no_checksums, progress=progress) for p in args.paths]
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
    from rich.table import Table
    from .inspection import diff

    for p in (args.a, args.b):
        if not Path(p).exists():
            raise UsageError(f"{p}: no such file or directory")
    if args.atol < 0 or not math.isfinite(args.atol):
        raise UsageError(f"--atol {args.atol}: expected a finite number >= 0")
    data = diff(args.a, args.b, atol=args.atol)
    if args.json:
        _print_json(data)
        return EXIT_OK if data["identical"] else EXIT_PROBLEM
    con = _console()
    con.print(f"A = {_e(args.a)}\nB = {_e(args.b)}")
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
            table = Table()
            for col, just in (("key", "left"), ("status", "left"), ("dtype", "left"), ("shape", "left"),
                              ("differing", "right"), ("max abs diff", "right")):
                table.add_column(col, justify=just, no_wrap=True)
            for r in shown:
                if r["status"] in ("shape", "dtype"):
                    a, b = (_shape(r["a"]), _shape(r["b"])) if r["status"] == "shape" else (r["a"], r["b"])
                    table.add_row(_e(r["key"]), f"[red]{r['status']} differs[/red]",
                                  _e(f"{a} vs {b}") if r["status"] == "dtype" else "",
                                  _e(f"{a} vs {b}") if r["status"] == "shape" else "", "", "")
                elif r.get("scalar"):
                    table.add_row(_e(r["key"]), r["status"], "scalar", "", "",
                                  "" if r["status"] == "equal" else _e(f"{r['a']!r} vs {r['b']!r}"))
                else:
                    mad = r["max_abs_diff"]
                    table.add_row(_e(r["key"]), r["status"], _e(r["dtype"]), _shape(r["shape"]),
                                  str(r["differing"]), "raw bits" if mad is None else f"{mad:.6g}")
            con.print(table)
        for label, keys in (("only in A", rec["only_in_a"]), ("only in B", rec["only_in_b"])):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 20 else ""
                con.print(f"  keys {label}: {_e(', '.join(keys[:20]))}{more}")
    con.print("[green]identical[/green]" if data["identical"] else "[red]different[/red]")
    return EXIT_OK if data["identical"] else EXIT_PROBLEM


# --- gc --------------------------------------------------------------------------------------

def cmd_gc(args) -> int:
    from .inspection import gc_plan, run_gc

    _check_prefix(args.prefix)
    directory = _existing_dir(args.dir)
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
    if args.json:
        _print_json(result)
        return EXIT_OK
    con = _console()
    verb = "would remove" if args.dry_run else "removed"
    for lo in result["leftovers"]:
        if lo["action"] == "restore":
            con.print(f"{'would restore' if args.dry_run else 'restored'} {_e(lo['name'])} "
                      f"(an interrupted replacement) as {_e(lo.get('checkpoint', ''))}")
        else:
            con.print(f"{verb} leftover {_e(lo['name'])}")
    for lo in result["kept_leftovers"]:
        con.print(f"kept leftover {_e(lo['name'])} (its owner, pid {lo['pid']} on {_e(lo['host'])}, may still run)")
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
    con.print(f"kept steps: {result['kept_steps'] or 'none'}"
              + (" (dry run: nothing was changed)" if args.dry_run else ""))
    return EXIT_OK


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


def _new_destination(p: str) -> Path:
    path = Path(p)
    if os.path.lexists(path) and (not path.is_dir() or path.is_symlink() or any(os.scandir(path))):
        raise UsageError(f"{p}: exists and is not an empty directory; refusing to overwrite it")
    return path


def cmd_convert(args) -> int:
    from . import convert

    if not Path(args.src).exists():
        raise UsageError(f"{args.src}: no such directory")
    dst = _new_destination(args.dst)
    model_config = None
    if args.model_config:
        try:
            model_config = json.loads(Path(args.model_config).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--model-config {args.model_config}: {e}") from e
    report = convert.convert(args.src, dst, step=args.step, model_config=model_config,
                             skip_unknown=args.skip_unknown, kind=args.orbax_kind,
                             nnx_values=False if args.pure_dict else None)
    if args.json:
        _print_json(report.to_json())
    else:
        _print_report(report)
    return EXIT_OK


def cmd_export(args) -> int:
    from . import convert

    if not Path(args.src).exists():
        raise UsageError(f"{args.src}: no such checkpoint")
    if os.path.lexists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out}: exists; refusing to overwrite it (--overwrite replaces it)")
    report = convert.export_safetensors(args.src, args.out, item=args.item, overwrite=args.overwrite)
    if args.json:
        _print_json(report.to_json())
    else:
        _print_report(report)
    return EXIT_OK


def _add_convert_parsers(sub) -> None:
    p = sub.add_parser("convert", help="Orbax checkpoint -> shardckpt, or shardckpt -> Orbax (from SRC)")
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

    p = sub.add_parser("export", help="write a checkpoint's model weights in another format")
    p.add_argument("--safetensors", action="store_true", required=True, help="as one .safetensors file")
    p.add_argument("src", help="a shardckpt checkpoint")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--item", default="model", help="which item (default: model)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true")


# --- main ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardckpt", description="Sharded checkpoints for JAX / Flax NNX",
                                     epilog="exit codes: 0 ok, 1 problem found, 2 usage error")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo
    demo.add_arguments(sub.add_parser("demo", help="train, save through Ray, get killed, resume bit-exactly"))

    p = sub.add_parser("ls", help="list the committed checkpoints of a manager directory")
    p.add_argument("dir")
    p.add_argument("--prefix", default="step", help="checkpoint names are PREFIX_<step> (default: step)")
    p.add_argument("--best-metric", default=None, metavar="NAME", help="mark the best checkpoint by this metric")
    p.add_argument("--best-mode", choices=("min", "max"), default="min")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("inspect", help="arrays, dtypes, shapes, shards and writers of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("verify", help="check structure and checksums (exit 1 if anything is wrong)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--no-checksums", action="store_true", help="check structure and sizes only (fast)")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("diff", help="which arrays of two checkpoints differ, and by how much")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=0.0,
                   help="arrays whose max abs difference is <= ATOL count as equal (default 0: bits)")
    p.add_argument("--all", action="store_true", help="list equal keys too")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("gc", help="remove leftovers of dead saves and apply retention")
    p.add_argument("dir")
    p.add_argument("--max-to-keep", type=int, default=None, metavar="N",
                   help="keep the N most recent (default: keep all; only leftovers are removed)")
    p.add_argument("--best-metric", default=None, metavar="NAME")
    p.add_argument("--best-mode", choices=("min", "max"), default="min")
    p.add_argument("--best-to-keep", type=int, default=3, metavar="K")
    p.add_argument("--prefix", default="step")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed, change nothing")
    p.add_argument("--json", action="store_true")
    _add_convert_parsers(sub)
    return parser


COMMANDS = {"ls": cmd_ls, "inspect": cmd_inspect, "verify": cmd_verify, "diff": cmd_diff, "gc": cmd_gc,
            "convert": cmd_convert, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo
        return demo.run_demo(args.dir, args.steps, args.save_every, args.kill_after, args.backend)
    from .errors import CheckpointError, CheckpointNotFoundError
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"shardckpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointNotFoundError as e:
        print(f"shardckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:
        print(f"shardckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except BrokenPipeError:   # `shardckpt ls | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except OSError as e:
        print(f"shardckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
