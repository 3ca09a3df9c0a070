"""No free reference: a lab's exercises may not be answered by calling minisys's own.

One source decides what is off limits for lab NN (nothing is listed by hand):

    forbidden = what ``reference_impl()`` of ``tests/labs/test_labNN.py`` uses
                from ``minisys`` (functions and classes, with the attribute
                chains it calls, e.g. ``Scheduler.schedule``)
              - what the lab's solution source imports outside its exercise
                regions and benchmark cells (the scaffolding students are given).

Three checks use that list:

- :func:`scan_code` (grader process, static): every ``minisys`` name a
  notebook's code cells reference -- through imports, attribute chains,
  aliases or string constants -- that resolves to a forbidden object is
  flagged in the report;
- :func:`install` (test child, before the notebook's cells run): each
  forbidden function, and each forbidden class's ``__init__``, is replaced by
  a wrapper that raises :class:`FreeReferenceError` when its caller is
  notebook code (a frame whose file is ``<NAME cell N>``); tests and minisys
  itself call them as before;
- :func:`seal_namespace` (test child, after the cells ran): a notebook global
  that *is* a forbidden object, or a class derived from one, is replaced by a
  stand-in that raises :class:`FreeReferenceError` -- so the tests of that
  exercise fail, and the others are graded as usual.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path

from minisys.grading.source import BENCHMARK_TAG, parse_solution, stub_exercises

NOTEBOOK_FILE = re.compile(r"^<.* cell \d+>$")
DOTTED = re.compile(r"^minisys(\.[A-Za-z_]\w*)+$")
# process-level escape hatches no lab needs; seen in a notebook, they are flagged for review
SUSPICIOUS = ("atexit", "os._exit", "sys.exit", "pytest", "_pytest", "minisys.grading",
              "gc", "ctypes", "signal", "faulthandler", "sys._getframe", "sys.modules",
              "builtins", "importlib", "os.fdopen", "os.write", "os.kill", "inspect")


class FreeReferenceError(RuntimeError):
    """Notebook code called the package's implementation of one of the lab's exercises."""


# --- names a piece of code references ---------------------------------------------


def _import_aliases(tree: ast.AST) -> dict[str, str]:
    """``local name -> dotted name`` for every import in ``tree``."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    aliases[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ``["a", "b", "c"]``; ``None`` when the root is not a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def dotted_references(tree: ast.AST, aliases: dict[str, str] | None = None) -> set[str]:
    """Every dotted name ``tree`` refers to, with import aliases expanded.

    ``import minisys.kv.block_allocator as ba; ba.BlockAllocator(...)`` gives
    ``minisys.kv.block_allocator`` and ``minisys.kv.block_allocator.BlockAllocator``;
    string constants that look like ``minisys.x.y`` count too.
    """
    local = _import_aliases(tree)
    aliases = {**(aliases or {}), **local}
    names = set(local.values())
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in inner:
            parts = _chain(node)
            if parts and parts[0] in aliases:
                names.add(".".join([aliases[parts[0]], *parts[1:]]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if DOTTED.match(node.value):
                names.add(node.value)
    return names


def resolve(dotted: str) -> object | None:
    """The object a dotted ``minisys`` name names, or ``None`` (never raises)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - not a module at this length: try shorter
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr, None)
            if value is None:
                return None
        return value
    return None


def _is_implementation(value: object) -> bool:
    """A minisys function or class (not a module, constant or exception type)."""
    if isinstance(value, type):
        return value.__module__.startswith("minisys") and not issubclass(value, BaseException)
    return isinstance(value, types.FunctionType) and value.__module__.startswith("minisys")


# --- what lab NN forbids ------------------------------------------------------------


def forbidden_names(test_file: Path, solution: Path) -> list[str]:
    """The dotted names lab NN's notebook may not use (see the module docstring)."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    top_level = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                           type_ignores=[])
    module_aliases = _import_aliases(top_level)
    reference = next((node for node in tree.body if isinstance(node, ast.FunctionDef)
                      and node.name == "reference_impl"), None)
    if reference is None:
        return []
    used = {name for name in dotted_references(reference, module_aliases)
            if name.startswith("minisys.")}
    allowed = {id(resolve(name)) for name in _solution_references(solution)}
    forbidden = {}
    for name in sorted(used):
        value = resolve(name)
        if _is_implementation(value) and id(value) not in allowed:
            forbidden.setdefault(id(value), name)
    return sorted(forbidden.values())


def exercise_names(solution: Path) -> list[str]:
    """Top-level functions and classes of a solution that contain an exercise region."""
    lab = parse_solution(solution)
    names = []
    for cell in lab.cells:
        if cell.kind != "code" or "### BEGIN SOLUTION" not in cell.source:
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                segment = ast.get_source_segment(cell.source, node) or ""
                if "### BEGIN SOLUTION" in segment:
                    names.append(node.name)
    return names


def lab_spec(lab: str, test_file: Path, solution: Path) -> dict:
    """What the test child needs: ``{"lab", "forbidden", "exercises"}`` (JSON-ready)."""
    return {"lab": lab, "forbidden": forbidden_names(test_file, solution),
            "exercises": exercise_names(solution)}


def _solution_references(solution: Path) -> set[str]:
    """The minisys names the scaffolding of a solution (stubs in place) references."""
    lab = parse_solution(solution)
    names: set[str] = set()
    for cell in lab.cells:
        if cell.kind == "code" and BENCHMARK_TAG not in cell.tags:
            code = stub_exercises(cell.source, lab.path, cell.line)
            names |= dotted_references(ast.parse(code))
    return {name for name in names if name.startswith("minisys.")}


RULES_HEADING = "## What the grader allows"


def rules_paragraph(test_file: Path, solution: Path) -> str:
    """The lesson's statement of which minisys names lab NN's notebook may use, derived from the
    same sources the guard reads (``labs build`` writes it under `RULES_HEADING`; ``labs check``
    fails when it drifts)."""
    quote = lambda names: ", ".join(f"`{n}`" for n in names)
    allowed = sorted(_solution_references(solution))
    forbidden = forbidden_names(test_file, solution)
    may = quote(allowed) if allowed else "none (plain Python and torch)"
    text = f"Your notebook may use the minisys names its scaffolding already imports: {may}. "
    if forbidden:
        text += (f"It may not use minisys's own implementation of this lab's exercises ({quote(forbidden)}): "
                 "the grader makes those raise when your code calls them, and ")
    else:
        text += "Besides, "
    text += (f"every exercise ({quote(exercise_names(solution))}) must be defined in your notebook. "
             "The grader runs your notebook's definitions (imports, `def`, `class`, assignments to names), "
             "not its other top-level statements, with a time limit per test.")
    return text


def with_rules_section(lesson_text: str, paragraph: str) -> str:
    """``lesson_text`` with its `RULES_HEADING` section (the last one) set to ``paragraph``."""
    head = lesson_text.split(RULES_HEADING)[0].rstrip("\n")
    return f"{head}\n\n{RULES_HEADING}\n\n{paragraph}\n"


# --- the static scan (grader process) ---------------------------------------------


def scan_code(cells: Iterable[tuple[int, str]], forbidden: list[str]) -> list[str]:
    """Flags for code cells ``(index, source)``: forbidden references, escape hatches."""
    banned = {id(value): name for name in forbidden if (value := resolve(name)) is not None}
    flags = []
    for index, source in cells:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        names = dotted_references(tree) | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        for name in sorted(names):
            value = resolve(name) if name.startswith("minisys.") else None
            if value is not None and id(value) in banned:
                flags.append(f"cell {index} references {banned[id(value)]}, the package's "
                             "implementation of an exercise of this lab")
            elif any(name == s or name.startswith(s + ".") for s in SUSPICIOUS):
                flags.append(f"cell {index} uses {name}: no lab needs it; review the notebook")
    return flags


# --- the runtime guard (test child) -----------------------------------------------


def _message(name: str, lab: str) -> str:
    return (f"your code uses {name}, minisys's own implementation of an exercise of lab {lab}; "
            f"write it yourself (lessons/{lab}-*.md lists the minisys imports this lab allows)")


def _called_from_notebook() -> bool:
    """Whether notebook code is anywhere on the stack above the wrapper.

    The whole stack, not only the caller: a notebook that hands the tests a
    function defined elsewhere (a lambda around the reference, the test
    module's own ``reference_impl()``) still has its frame on the stack.
    """
    frame = sys._getframe(2)  # 0: this function, 1: the wrapper, 2: its caller
    while frame is not None:
        if NOTEBOOK_FILE.match(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False


def _guarded(function: Callable, name: str, lab: str) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if _called_from_notebook():
            raise FreeReferenceError(_message(name, lab))
        return function(*args, **kwargs)

    wrapper.__minisys_guarded__ = function  # type: ignore[attr-defined]
    return wrapper


def install(forbidden: list[str], lab: str) -> dict[int, str]:
    """Guard every forbidden object; return ``{id(object): name}`` for :func:`seal_namespace`.

    Call it before the notebook's cells run and after the test module imported
    what it needs: module attributes that *are* a forbidden function (re-exports
    included) are swapped for the wrapper in every loaded module.
    """
    known: dict[int, str] = {}
    for name in forbidden:
        owner_name, _, attr = name.rpartition(".")
        owner, value = resolve(owner_name), resolve(name)
        if owner is None or value is None:
            continue
        known[id(value)] = name
        if isinstance(value, type):
            init = value.__init__
            guarded_init = _guarded(init, name, lab)
            value.__init__ = guarded_init  # type: ignore[misc]
            known[id(guarded_init)] = name
        elif isinstance(inspect.getattr_static(owner, attr), types.FunctionType):
            wrapper = _guarded(value, name, lab)
            known[id(wrapper)] = name
            for module in list(sys.modules.values()):
                for key, item in list(getattr(module, "__dict__", {}).items()):
                    if item is value:
                        setattr(module, key, wrapper)
            if isinstance(owner, type):
                setattr(owner, attr, wrapper)
    return known


def defined_in_notebook(value: object, namespace: types.ModuleType) -> bool:
    """A function compiled from a notebook cell, or a class created in the namespace."""
    if isinstance(value, type):
        return value.__module__ == namespace.__name__
    code = getattr(value, "__code__", None)
    return code is not None and bool(NOTEBOOK_FILE.match(code.co_filename))


def seal_namespace(namespace: types.ModuleType, known: dict[int, str], lab: str,
                   exercises: Iterable[str] = ()) -> list[str]:
    """Replace notebook globals the notebook may not hand in; return their names.

    Replaced: globals that are (or derive from) forbidden objects, and the
    lab's exercise names (``exercises``) bound to anything not defined in the
    notebook (an import, a ``functools.partial``, another module's function).
    """
    replaced = []
    for key in exercises:
        value = getattr(namespace, key, None)
        if value is not None and not defined_in_notebook(value, namespace):
            where = getattr(value, "__module__", None) or type(value).__name__
            setattr(namespace, key, _stand_in(f"{key} from {where} (not defined in the notebook)",
                                              lab))
            replaced.append(key)
    for key, value in list(vars(namespace).items()):
        hit = known.get(id(value))
        if hit is None and isinstance(value, type):
            hit = next((known[id(base)] for base in value.__mro__[1:] if id(base) in known), None)
        if hit is not None:
            setattr(namespace, key, _stand_in(hit, lab))
            replaced.append(key)
    return replaced


def _stand_in(name: str, lab: str) -> Callable:
    def refused(*args, **kwargs):
        raise FreeReferenceError(_message(name, lab))

    return refused
