"""No yun module imports, at run time, a package that a plain `pip install yun` lacks.

A fresh clone once crashed on `make serve`: yun/bench/online.py imported httpx, which only
the test extra installed. This reads every yun/**/*.py with `ast` (nothing is imported),
collects every absolute import, at module level and inside functions (lazy imports run in
production too; only `if TYPE_CHECKING:` blocks are skipped), maps each to the
distribution that provides it, and requires that distribution to be the standard library,
yun itself, or one of pyproject's [project].dependencies. An optional extra is allowed
only where OPTIONAL names it, and only inside a `try` whose ImportError handler raises an
error that tells the user to `pip install 'yun[EXTRA]'`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file relative to the repository root, top-level module) -> the extra that provides it
OPTIONAL: dict[tuple[str, str], str] = {
    ("yun/distributed/ray_replicas.py", "ray"): "ray",
    ("yun/eval/stats.py", "scipy"): "eval",
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, e.g. "yun/bench/online.py"
    line: int
    module: str  # the top-level module, e.g. "httpx" for `from httpx import AsyncClient`
    guard: str | None  # the extra named by an enclosing ImportError handler, if any


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Foo_Bar` == `foo-bar`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0))
            for r in requirements}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError")
               for t in types)


def _guarded_extra(handlers: list[ast.ExceptHandler]) -> str | None:
    """`yun[EXTRA]` named in a string of an ImportError handler that raises, if any."""
    for h in handlers:
        if not _catches_import_error(h):
            continue
        if not any(isinstance(n, ast.Raise) for n in ast.walk(h)):
            continue
        for n in ast.walk(h):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                m = re.search(r"yun\[([A-Za-z0-9_-]+)\]", n.value)
                if m:
                    return m.group(1)
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file = file
        self.guards: list[str | None] = []
        self.imports: list[Import] = []

    def _add(self, node: ast.stmt, module: str) -> None:
        guard = next((g for g in reversed(self.guards) if g is not None), None)
        self.imports.append(Import(self.file, node.lineno, module.split(".")[0], guard))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:  # relative imports stay inside yun
            self._add(node, node.module)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: only type checkers read it
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        self.guards.append(_guarded_extra(node.handlers))
        for stmt in node.body:
            self.visit(stmt)
        self.guards.pop()
        for part in (node.handlers, node.orelse, node.finalbody):
            for stmt in part:
                self.visit(stmt)

    visit_TryStar = visit_Try


def collect_imports(root: Path, package: str = "yun") -> list[Import]:
    out: list[Import] = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        collector = _Collector(rel)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=rel))
        out.extend(collector.imports)
    return out


def violations(root: Path, package: str = "yun",
               optional: dict[tuple[str, str], str] = OPTIONAL) -> list[str]:
    """One line per import that a runtime-only install could not satisfy."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = requirement_names(project.get("dependencies", []))
    extras = {name: requirement_names(reqs)
              for name, reqs in project.get("optional-dependencies", {}).items()}
    providers = importlib.metadata.packages_distributions()
    problems = []
    for imp in collect_imports(root, package):
        if imp.module in sys.stdlib_module_names or imp.module == package:
            continue
        # Not installed here: assume the distribution has the module's name.
        dists = {normalize(d) for d in providers.get(imp.module, [imp.module])}
        if dists & runtime:
            continue
        where = f"{imp.file}:{imp.line}: import {imp.module} ({', '.join(sorted(dists))})"
        extra = optional.get((imp.file, imp.module))
        if extra is None:
            problems.append(f"{where} is not a runtime dependency: list it in pyproject's "
                            "[project].dependencies (even if another one pulls it in) or "
                            "keep it out of yun/")
        elif not dists & extras.get(extra, set()):
            problems.append(f"{where}: the extra [{extra}] does not provide it")
        elif imp.guard != extra:
            problems.append(f"{where} needs a try/except ImportError that raises an error "
                            f"naming pip install 'yun[{extra}]'")
    return problems


def test_yun_imports_only_stdlib_and_runtime_dependencies():
    problems = violations(ROOT)
    assert not problems, "\n".join(problems)


def test_every_optional_import_still_exists():
    """OPTIONAL stays honest: each entry names an import that is still there."""
    found = {(i.file, i.module) for i in collect_imports(ROOT)}
    assert set(OPTIONAL) <= found, set(OPTIONAL) - found


def _fake_project(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "yun"\ndependencies = ["numpy>=1", "Foo_Bar"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=8"]\nray = ["ray>=2.40"]\n')
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_flags_a_test_only_import_even_inside_a_function(tmp_path):
    root = _fake_project(tmp_path, {
        "yun/__init__.py": "import os\nimport numpy as np\nfrom . import engine\n",
        "yun/engine.py": "def f():\n    import pytest\n    return pytest\n",
        "yun/typed.py": "from typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    import pytest\n",
    })
    problems = violations(root)
    assert len(problems) == 1 and problems[0].startswith("yun/engine.py:2: import pytest")


def test_checker_wants_the_install_hint_around_an_optional_import(tmp_path):
    guarded = ("def ray():\n    try:\n        import ray\n    except ImportError as e:\n"
               "        raise RuntimeError(\"needs Ray: pip install 'yun[ray]'\") from e\n")
    bare = "def ray():\n    import ray\n"
    optional = {("yun/good.py", "ray"): "ray", ("yun/bad.py", "ray"): "ray"}
    root = _fake_project(tmp_path, {"yun/good.py": guarded, "yun/bad.py": bare,
                                    "yun/other.py": guarded})
    problems = violations(root, optional=optional)
    assert [p.split(":")[0] for p in problems] == ["yun/bad.py", "yun/other.py"], problems
    assert "try/except ImportError" in problems[0]
    assert "is not a runtime dependency" in problems[1]
