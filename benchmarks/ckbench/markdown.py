"""A run's JSON as the markdown tables of docs/benchmarks.md (one per state).

    python -m benchmarks.ckbench.markdown benchmarks/results/bench_s3.json
"""

from __future__ import annotations

import json
import sys


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def state_table(name: str, st: dict, regimes: list[str]) -> str:
    head = ["operation"]
    for r in regimes:
        head += [f"{r} s", f"{r} xOrbax", f"{r} xbest", f"{r} of limit"]
    head += ["save mem"]
    lines = [f"**{name}**: {st['arrays']} arrays, {st['state_bytes'] / 1e9:.3f} GB", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in st["rows"]:
        cells = [row["label"]]
        for r in regimes:
            c = row["regimes"].get(r, {})
            cells += [_f(c.get("median_s"), ".3f"), _f(c.get("speedup_vs_orbax"), ".2f"),
                      _f(c.get("speedup_vs_orbax_best"), ".2f") + (f" ({c['orbax_best']})" if c.get("orbax_best")
                                                                   and row["family"] == "shardckpt" else ""),
                      _f(c.get("fraction_of_limit"), ".2f")]
        cells.append(_f(row.get("save_extra_memory_x_state"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    rss = st.get("rss") or {}
    if rss:
        lines += ["", "| restore in a fresh process | peak RSS - base, x state | s |", "|---|---|---|"]
        for system, d in rss.items():
            lines.append(f"| {system} | {_f(d.get('multiple_of_state'), '.2f')} | {_f(d.get('time'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    d = json.load(open(path))
    for name, st in d["states"].items():
        print(state_table(name, st, d["regimes"]))
        print()


if __name__ == "__main__":
    main()
