"""No import cycles in yun/: the modules form a layered graph (issue: engine contracts).

Every import counts, however it is written: module level, inside a function (lazy
imports run too) and under `if TYPE_CHECKING:` (a type-only cycle is still two modules
that each need the other to be understood). The graph is read with `ast`; nothing is
imported. A cycle fails the test with each edge's file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str = "yun") -> dict[str, Path]:
    """'yun.engine.runner' -> its file, for every module and package under root/package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_edges(root: Path, package: str = "yun"
                 ) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line}, within the package only."""
    modules = module_names(root, package)

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod, path in modules.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    pkg = here[:len(here) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule; `from mod import name` mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for t in targets:
                if t == package or t.startswith(package + "."):
                    target = owner(t)
                    if target is not None and target != mod:
                        edges[mod].setdefault(target, node.lineno)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def describe(edges: dict[str, dict[str, int]], comp: list[str],
             files: dict[str, Path]) -> str:
    lines = [" <-> ".join(comp)]
    for a in comp:
        for b, line in edges[a].items():
            if b in comp:
                lines.append(f"    {files[a].relative_to(ROOT)}:{line} imports {b}")
    return "\n".join(lines)


def test_yun_has_no_import_cycles():
    edges = import_edges(ROOT)
    assert len(edges) > 50  # the whole package was read
    files = module_names(ROOT)
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(describe(edges, c, files) for c in found)


def test_the_check_finds_lazy_type_only_and_relative_cycles(tmp_path):
    pkg = tmp_path / "yun"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "a.py").write_text("def f():\n    from yun.engine.b import g\n")
    (pkg / "engine" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    (pkg / "engine" / "c.py").write_text("from yun.engine import a\n")  # one way only
    edges = import_edges(tmp_path)
    assert edges["yun.engine.c"] == {"yun.engine.a": 1}
    assert cycles(edges) == [["yun.engine.a", "yun.engine.b"]]
