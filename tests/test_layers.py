"""The package's layers, checked over the source on every CI run.

Every module of ``shardckpt`` belongs to one layer (``LAYERS``, bottom first). A module may
import modules of its own layer or of layers below it, never above; function-level imports
are arrows too. No import circle may exist anywhere (inside a layer neither), and no module
imports a private (underscore) name of another module. ``docs/architecture.md`` draws the
same list. The checks read the code with ``ast`` (nothing is imported), so they also run on
a planted copy of the package: the last tests show each check failing on a planted fault.
"""

from __future__ import annotations

import ast
import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shardckpt"

#: Bottom first. A module matches the first pattern that names it (fnmatch on the dotted name).
LAYERS: list[tuple[str, list[str]]] = [
    ("leaves", ["shardckpt.errors", "shardckpt.progress", "shardckpt.release", "shardckpt.workers", "shardckpt.lm", "shardckpt.lm.*"]),
    ("tree", ["shardckpt.tree"]),
    ("format", ["shardckpt.format", "shardckpt.format.*"]),
    ("store", ["shardckpt.store", "shardckpt.store.*"]),
    ("executors", ["shardckpt.executors", "shardckpt.executors.*"]),
    ("coord", ["shardckpt.coord", "shardckpt.coord.*"]),
    ("saving", ["shardckpt.saving", "shardckpt.saving.*"]),
    ("loading", ["shardckpt.loading", "shardckpt.loading.*"]),
    ("catalog", ["shardckpt.catalog"]),
    ("api", ["shardckpt.api", "shardckpt.api.*"]),
    ("tools", ["shardckpt.tools", "shardckpt.tools.*"]),
    ("faces", ["shardckpt", "shardckpt.convert", "shardckpt.ray_train", "shardckpt.testing"]),
]


@dataclass(frozen=True)
class Arrow:
    source: str      # importing module
    target: str      # imported module
    line: int
    names: tuple[str, ...] = ()


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    out = {}
    root = package.parent
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def arrows(package: Path) -> list[Arrow]:
    """Every import of one module of the package by another, wherever it stands."""
    mods = modules(package)
    top = package.name
    out = []
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        out.append(Arrow(name, _known(a.name, mods), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                if not (base == top or base.startswith(top + ".")):
                    continue
                plain = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods:          # ``from pkg import module``
                        out.append(Arrow(name, sub, node.lineno))
                    else:
                        plain.append(a.name)
                if plain or not node.names:
                    out.append(Arrow(name, _known(base, mods), node.lineno, tuple(plain)))
    return [a for a in out if a.source != a.target]


def _known(name: str, mods: dict[str, Path]) -> str:
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise KeyError(module)


def unplaced(package: Path) -> list[str]:
    out = []
    for m in modules(package):
        try:
            layer_of(m)
        except KeyError:
            out.append(m)
    return out


def upward(package: Path) -> list[str]:
    return [f"{a.source} (layer {LAYERS[layer_of(a.source)][0]}) imports {a.target} (layer "
            f"{LAYERS[layer_of(a.target)][0]}) at line {a.line}"
            for a in arrows(package) if layer_of(a.target) > layer_of(a.source)]


def circles(package: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in modules(package)}
    for a in arrows(package):
        graph[a.source].add(a.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def private_imports(package: Path) -> list[str]:
    return [f"{a.source} imports {n} from {a.target} at line {a.line}"
            for a in arrows(package) for n in a.names if n.startswith("_") and not n.startswith("__")]


# --- the checks ---------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    assert unplaced(PACKAGE) == []


def test_no_import_points_up():
    assert upward(PACKAGE) == []


def test_no_import_circle():
    assert circles(PACKAGE) == []


def test_no_private_name_crosses_a_module():
    assert private_imports(PACKAGE) == []


# --- each check fails on a planted fault ---------------------------------------------------------

@pytest.fixture
def planted(tmp_path) -> Path:
    copy = tmp_path / "shardckpt"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _append(f: Path, text: str) -> None:
    f.write_text(f.read_text() + "\n" + text + "\n")


def test_checks_see_a_planted_upward_import(planted):
    _append(planted / "errors.py", "def _late():\n    from shardckpt.api import core  # noqa: F401")
    assert any("shardckpt.errors" in u and "shardckpt.api.core" in u for u in upward(planted))


def test_checks_see_a_planted_circle(planted):
    _append(planted / "format" / "names.py", "import shardckpt.format.manifest  # noqa: F401")
    assert any({"shardckpt.format.names", "shardckpt.format.manifest"} <= set(c) for c in circles(planted))


def test_checks_see_a_planted_private_import(planted):
    _append(planted / "tree.py", "from shardckpt.errors import _hidden  # noqa: F401")
    assert any("_hidden" in p for p in private_imports(planted))


def test_checks_see_an_unplaced_module(planted):
    (planted / "stray.py").write_text("")
    assert unplaced(planted) == ["shardckpt.stray"]
