"""Package layering: no two packages of minisys import each other at module level.

The graph is read from the source (AST), not from what happens to be
imported: every ``import`` / ``from ... import`` executed when a module is
loaded (module level, including under ``if`` / ``try``; not inside
functions, not under ``if TYPE_CHECKING:``) adds an edge from the module's
package (``minisys/kv/paged.py`` -> ``kv``; a top-level module such as
``minisys/llm.py`` is its own node, ``llm``) to the package it names. A cycle
between packages works only by import order, and breaks when someone
imports the other end first.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "minisys"



def _node(module: str) -> str | None:
    """'minisys.kv.paged' -> 'kv'; 'minisys.llm' -> 'llm'; 'minisys' -> '__init__'; not minisys -> None."""
    parts = module.split(".")
    if parts[0] != "minisys":
        return None
    if len(parts) > 1 and ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists()):
        return parts[1]
    return "__init__"                        # minisys itself, or a name defined in minisys/__init__.py


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]):
    """Import statements run when the module loads (skips defs, classes' methods, TYPE_CHECKING blocks)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _load_time_imports(node.body)
            yield from _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _load_time_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _load_time_imports(node.body)


def _targets(stmt: ast.stmt, module: str, is_package: bool) -> list[str]:
    """Absolute module names an import statement names."""
    if isinstance(stmt, ast.Import):
        return [a.name for a in stmt.names]
    if stmt.level == 0:
        base = stmt.module or ""
    else:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (stmt.level - 1)]
        base = ".".join(pkg + ([stmt.module] if stmt.module else []))
    if stmt.module is None:                  # from .. import kv, llm: each name may be a module
        return [f"{base}.{a.name}" for a in stmt.names]
    return [base]


def package_graph() -> dict[str, set[str]]:
    """{package: packages it imports at load time}, self-edges dropped."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        src = _node(module)
        edges = graph.setdefault(src, set())
        for stmt in _load_time_imports(ast.parse(path.read_text(), str(path)).body):
            for target in _targets(stmt, module, path.name == "__init__.py"):
                dst = _node(target)
                if dst is not None and dst != src:
                    edges.add(dst)
    return graph


def cycles(graph: dict[str, set[str]], ignore: list[frozenset[str]] = ()) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan), edges within `ignore` pairs dropped."""
    g = {a: {b for b in bs if frozenset({a, b}) not in ignore} for a, bs in graph.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_packages():
    graph = package_graph()
    assert {"attention", "kv", "model", "engine", "server"} <= set(graph)
    assert "attention" in graph["kv"] and "attention" in graph["model"]     # the edges we know exist


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"a"}}, ignore=[frozenset({"a", "b"})]) == []


def test_no_import_cycle_between_packages():
    found = cycles(package_graph())
    assert not found, f"packages importing each other at module level: {found}"


def test_kv_imports_nothing_from_model():
    """The KV caches are tensors and block tables: they must load without the model package."""
    code = "import sys, minisys.kv; print(sorted(m for m in sys.modules if m.startswith('minisys.model')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout
