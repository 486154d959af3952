"""Medians, ratios, targets, the console table and the plot.

Columns per regime: median seconds, GB/s, x Orbax-default (Orbax default's time / this
time; higher is better), x Orbax-best (the same against the fastest Orbax variant measured
in this run for the same operation), of limit (the machine's limit time / this time, i.e.
the fraction of the limit's throughput reached: raw write for saves, raw read with the same
page-cache state for restores); and, once per save, the extra host memory during the save
as a multiple of the state's bytes (fresh process).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .common import GB
from .systems import ORBAX_DEFAULT


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(results: dict, ops: list, nbytes: int, regimes: list[str], memory: dict | None = None) -> list[dict]:
    """Rows (op, metric) with per-regime median seconds, GB/s and the ratios."""
    memory = memory or {}
    med = {(o, m, r): _median(results.get(o, {}).get(r, {}).get(m, [])) for o in results
           for r in regimes for m in ("time", "blocking", "total")}
    by_key: dict[tuple, list] = {}       # (action, cache, metric) -> Orbax ops
    for op in ops:
        if op.family == "orbax":
            for m in op.metrics:
                by_key.setdefault((op.action, op.cache, m), []).append(op)

    def orbax(op, metric, regime):
        cands = [(med.get((o.name, metric, regime)), o) for o in by_key.get((op.action, op.cache, metric), [])]
        cands = [(t, o) for t, o in cands if t]
        default = next((t for t, o in cands if o.system.name == ORBAX_DEFAULT), None)
        best = min(cands, key=lambda c: c[0]) if cands else (None, None)
        return default, best[0], (best[1].system.name if best[1] else None)

    def limit_for(op, metric, regime):
        if op.action == "save" or (op.action == "async" and metric == "total"):
            c = [med.get((o.name, "time", regime)) for o in ops if o.system.limit_of == "write"]
            c = [x for x in c if x]
            return (min(c), "raw write") if c else (None, None)
        if op.action == "restore":
            c = [med.get((o.name, "time", regime)) for o in ops
                 if o.system.limit_of == "read" and o.cache == op.cache]
            c = [x for x in c if x]
            return (min(c), f"raw read {op.cache}") if c else (None, None)
        return None, None

    rows = []
    for op in ops:
        for metric in op.metrics:
            row = {"op": op.name, "label": op.label + ("" if metric == "time" else f" - {metric}"),
                   "kind": op.kind, "action": op.action, "metric": metric, "system": op.system.name,
                   "family": op.family, "cache": op.cache, "regimes": {}}
            mem = memory.get("save", {}).get(op.system.name)
            if op.action == "save" and mem:
                row["save_extra_memory_x_state"] = mem["multiple_of_state"]
            for r in regimes:
                t = med.get((op.name, metric, r))
                samples = results.get(op.name, {}).get(r, {}).get(metric, [])
                cell = {"median_s": t, "samples_s": samples,
                        "gbps": (nbytes / t / GB) if t and metric != "blocking" else None}
                if op.kind != "limit":
                    d, b, bname = orbax(op, metric, r)
                    cell["speedup_vs_orbax"] = (d / t) if (d and t) else None
                    cell["speedup_vs_orbax_best"] = (b / t) if (b and t) else None
                    cell["orbax_best"] = bname
                lim, lname = limit_for(op, metric, r)
                if lim and t and metric != "blocking" and op.kind != "limit":
                    cell["vs_limit"] = t / lim
                    cell["fraction_of_limit"] = lim / t
                    cell["limit"] = lname
                row["regimes"][r] = cell
            rows.append(row)
    return rows


def targets_check(rows: list[dict], memory: dict, regimes: list[str]) -> list[dict]:
    def cell(op, metric, r):
        for row in rows:
            if row["op"] == op and row["metric"] == metric:
                return row["regimes"].get(r, {})
        return {}

    def with_best(d, c):
        if c.get("speedup_vs_orbax_best") is not None:
            d["vs_orbax_best"] = c["speedup_vs_orbax_best"]
            d["orbax_best"] = c.get("orbax_best")
        return d

    out = []
    for r in regimes:
        for name in ("shardckpt", "shardckpt_ray"):
            c = cell(f"{name}_save", "time", r)
            if c.get("speedup_vs_orbax") is not None:
                out.append(with_best({"target": f"durable save ({name}) >= 2.5x faster than Orbax", "regime": r,
                                      "value": c["speedup_vs_orbax"], "unit": "x",
                                      "ok": c["speedup_vs_orbax"] >= 2.5}, c))
        c = cell("shardckpt_restore_hot", "time", r)
        if c.get("speedup_vs_orbax") is not None:
            out.append(with_best({"target": "hot restore >= 3x faster than Orbax", "regime": r,
                                  "value": c["speedup_vs_orbax"], "unit": "x", "ok": c["speedup_vs_orbax"] >= 3.0}, c))
        s, o = cell("shardckpt_async", "blocking", r), cell(f"{ORBAX_DEFAULT}_async", "blocking", r)
        if s.get("median_s") is not None and o.get("median_s") is not None:
            out.append({"target": "async blocking time <= Orbax's", "regime": r,
                        "value": s["median_s"], "orbax": o["median_s"], "unit": "s",
                        "ok": s["median_s"] <= o["median_s"]})
    rss = memory.get("restore", {})
    if "shardckpt" in rss:
        m = rss["shardckpt"]["multiple_of_state"]
        out.append({"target": "restore peak RSS <= 1.25x state", "regime": "fresh process",
                    "value": m, "unit": "x state", "ok": m <= 1.25})
    return out


def print_table(console, title: str, rows, regimes, memory, checks):
    from rich.markup import escape
    from rich.table import Table
    t = Table(title=f"{title} (median seconds; xOrbax = Orbax default's time / this time; xbest = the "
                    "fastest Orbax variant's / this; of limit = limit time / this time; save mem = extra "
                    "host memory during save, x state)")
    t.add_column("operation", no_wrap=True)
    for r in regimes:
        t.add_column(f"{r} s", justify="right")
        t.add_column(f"{r} GB/s", justify="right")
        t.add_column(f"{r} xOrbax", justify="right")
        t.add_column(f"{r} xbest", justify="right")
        t.add_column(f"{r} of limit", justify="right")
    t.add_column("save mem", justify="right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    last_kind = None
    for row in rows:
        if last_kind is not None and row["kind"] != last_kind:
            t.add_section()
        last_kind = row["kind"]
        cells = [escape(row["label"])]
        for r in regimes:
            c = row["regimes"].get(r, {})
            cells += [f(c.get("median_s"), ".3f"), f(c.get("gbps"), ".2f"), f(c.get("speedup_vs_orbax"), ".2f"),
                      f(c.get("speedup_vs_orbax_best"), ".2f"), f(c.get("fraction_of_limit"), ".2f")]
        cells.append(f(row.get("save_extra_memory_x_state"), ".2f"))
        t.add_row(*cells)
    console.print(t)
    rss = memory.get("restore", {})
    if rss:
        rt = Table(title="restore peak RSS in a fresh process (above RSS after imports + abstract target)")
        rt.add_column("system")
        rt.add_column("peak - base GB", justify="right")
        rt.add_column("x state", justify="right")
        rt.add_column("restore s (fresh process)", justify="right")
        for sysname, d in rss.items():
            rt.add_row(sysname, f"{d['delta'] / GB:.3f}", f"{d['multiple_of_state']:.2f}", f"{d['time']:.2f}")
        console.print(rt)
    if checks:
        ct = Table(title="targets (against Orbax defaults; Orbax best for reference)")
        ct.add_column("target")
        ct.add_column("regime")
        ct.add_column("measured", justify="right")
        ct.add_column("vs Orbax best", justify="right")
        ct.add_column("ok")
        for c in checks:
            v = f"{c['value']:.3f} {c['unit']}" + (f" (Orbax {c['orbax']:.3f} s)" if "orbax" in c else "")
            b = f"{c['vs_orbax_best']:.2f}x ({c['orbax_best']})" if "vs_orbax_best" in c else "-"
            ct.add_row(c["target"], c["regime"], v, b, "[green]yes[/green]" if c["ok"] else "[red]NO[/red]")
        console.print(ct)


def plot(rows, regimes, nbytes, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [("save", [r for r in rows if r["action"] in ("save", "async")]),
              ("restore", [r for r in rows if r["action"] == "restore"])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(13, 0.5 * max(len(g[1]) for g in groups)), 10),
                             squeeze=False)
    colors = {"cold": "#4a7fb5", "warm": "#e39b3a"}
    for ax, (name, rs) in zip(axes[:, 0], groups):
        width = 0.8 / max(1, len(regimes))
        for j, reg in enumerate(regimes):
            xs, ys, lo, hi = [], [], [], []
            for i, r in enumerate(rs):
                c = r["regimes"].get(reg, {})
                t = c.get("median_s")
                s = c.get("samples_s") or []
                xs.append(i + (j - (len(regimes) - 1) / 2) * width)
                ys.append(t or 0)
                lo.append((t - min(s)) if s and t else 0)
                hi.append((max(s) - t) if s and t else 0)
            ax.bar(xs, ys, width, yerr=[lo, hi], label=f"{reg} regime", color=colors.get(reg), capsize=2)
            for x, y in zip(xs, ys):
                if y:
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["label"].replace(" [", "\n[").replace(" - ", "\n") for r in rs],
                           rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("seconds (median, bars min..max)")
        ax.set_title(f"{name}: {nbytes / GB:.3f} GB state")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
