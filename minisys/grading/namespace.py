"""Turn a notebook (or a solution source) into the namespace the lab tests grade.

Grading does not start a Jupyter kernel: it ``exec``s each non-benchmark code
cell, in order, in one fresh module (registered in ``sys.modules`` so that
dataclasses and pickling work), with the repository root as the working
directory and ``MINISYS_QUICK=1`` in the environment. Lines that start with
``%`` or ``!`` (IPython magics and shell escapes) are blanked out.

A cell that raises does not crash anything. By default execution stops there
and the error is kept in :attr:`LoadedLab.error`, so each test can fail with a
message that names the cell. With ``keep_going=True`` (the grader) the later
cells still run: every error is kept in :attr:`LoadedLab.errors`, and asking
the namespace for a name that is not defined raises an ``AttributeError``
naming the failed cells -- so only the tests that need what a failed cell
never defined fail, and a typo in a late cell costs no earlier exercise.

The grader loads a notebook with ``definitions_only=True``: of each cell it
runs the top-level imports, ``def``/``class`` statements and assignments --
what the exercises are made of -- and none of the top-level statements that
only *do* something (calls, loops, ``if``/``with``/``try`` blocks, asserts,
``del``): a cell that registers an ``atexit`` hook, skips, exits or patches
pytest at top level has no effect on grading. Line numbers are kept.
"""

from __future__ import annotations

import ast
import contextlib
import linecache
import os
import re
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from minisys.grading.source import BENCHMARK_TAG, parse_solution

QUICK_ENV = {"MINISYS_QUICK": "1"}


@dataclass(frozen=True)
class GradingCell:
    """A code cell to run: where it came from and the exact source to exec.

    ``filename`` is what tracebacks show: the solution file itself (``source``
    is padded with blank lines so line numbers match it) or ``<NAME cell N>``.
    """

    index: int  # position among all cells of the notebook, from 0
    cell_id: str
    source: str
    filename: str

    def describe(self) -> str:
        """``cell 3 (id cell-003)``: how error messages name the cell."""
        return f"cell {self.index} (id {self.cell_id})"


@dataclass(frozen=True)
class CellError:
    """The exception a cell raised while the namespace was being built."""

    cell: GradingCell
    error: str  # "ZeroDivisionError: division by zero"
    traceback: str

    def message(self, origin: str,
                consequence: str = "The tests cannot use your code until that cell runs.") -> str:
        """A message for students: which cell, its first lines, the traceback."""
        head = "\n".join(self.cell.source.strip("\n").splitlines()[:8])
        return (
            f"{self.cell.describe()} of {origin} raised {self.error}\n"
            f"{consequence} The cell begins:\n"
            f"{_indent(head)}\n{self.traceback}"
        )


@dataclass
class LoadedLab:
    """The namespace built from a notebook, and the errors its cells raised, in order."""

    namespace: types.ModuleType
    errors: list[CellError] = field(default_factory=list)
    origin: str = "the notebook"

    @property
    def error(self) -> CellError | None:
        """The first error (the one that stopped execution unless ``keep_going``)."""
        return self.errors[0] if self.errors else None


def grading_cells(path: str | Path) -> list[GradingCell]:
    """The non-benchmark code cells of a ``.ipynb`` notebook or a solution ``.py``."""
    path = Path(path)
    if path.suffix == ".py":
        return _solution_cells(path)
    return _notebook_cells(path)


def _solution_cells(path: Path) -> list[GradingCell]:
    """Cells of a solution source, padded so tracebacks point into the file."""
    lab = parse_solution(path)
    return [
        GradingCell(index, f"cell-{index:03d}", "\n" * (cell.line - 1) + cell.source, str(path))
        for index, cell in enumerate(lab.cells)
        if cell.kind == "code" and not cell.is_benchmark
    ]


def _notebook_cells(path: Path) -> list[GradingCell]:
    """Cells of a notebook; magics blanked, source registered for tracebacks."""
    notebook = nbformat.read(path, as_version=4)
    cells = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or BENCHMARK_TAG in cell.metadata.get("tags", []):
            continue
        source = strip_magics(cell.source)
        filename = f"<{path.name} cell {index}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        cells.append(GradingCell(index, cell.get("id", "?"), source, filename))
    return cells


def strip_magics(source: str) -> str:
    """Blank out lines that start with ``%`` or ``!``, keeping line numbers."""
    lines = source.splitlines()
    return "\n".join("" if line.startswith(("%", "!")) else line for line in lines)


DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
               ast.Assign, ast.AnnAssign, ast.AugAssign)


def _is_definition(node: ast.stmt) -> bool:
    """Imports, def, class, and assignments to plain names (not ``module.attr = ...``)."""
    if not isinstance(node, DEFINITIONS):
        return False
    targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
    names = [t for target in targets if target is not None for t in ast.walk(target)
             if isinstance(t, (ast.Attribute, ast.Subscript, ast.Starred))]
    return not names


def definitions(source: str, filename: str) -> ast.Module:
    """``source`` parsed, keeping only its top-level definitions (see the module docstring)."""
    tree = ast.parse(source, filename)
    tree.body = [node for node in tree.body if _is_definition(node)]
    return tree


def execute_cells(
    cells: list[GradingCell], root: str | Path, module_name: str = "lab_notebook",
    definitions_only: bool = False, keep_going: bool = False,
) -> LoadedLab:
    """``exec`` ``cells`` in order in a fresh module; stop at the first error unless
    ``keep_going``."""
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module
    errors: list[CellError] = []
    with working_directory(root), environment(QUICK_ENV):
        for cell in cells:
            try:
                code = definitions(cell.source, cell.filename) if definitions_only else cell.source
                exec(compile(code, cell.filename, "exec"), module.__dict__)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit, pytest.skip too
                errors.append(CellError(cell, _one_line(exc), _traceback(exc)))
                if not keep_going:
                    break
    return LoadedLab(module, errors)


def load_lab(path: str | Path, root: str | Path, module_name: str = "lab_notebook",
             definitions_only: bool = False, keep_going: bool = False) -> LoadedLab:
    """Read ``path`` (a notebook or a solution source) and execute its cells.

    With ``keep_going``, a name the namespace lacks after a cell failed raises an
    ``AttributeError`` that names the failed cell(s) (see :func:`explain_missing_names`).
    """
    path = Path(path)
    loaded = execute_cells(grading_cells(path), root, module_name, definitions_only, keep_going)
    loaded.origin = f"notebook {path.name}" if path.suffix == ".ipynb" else f"solution {path.name}"
    if keep_going and loaded.errors:
        explain_missing_names(loaded)
    return loaded


def explain_missing_names(loaded: LoadedLab) -> None:
    """Give the namespace a module ``__getattr__`` (PEP 562): a missing name raises an
    ``AttributeError`` that says which cells failed, so the test that needs it fails
    with the cause, and tests that need only what was defined are unaffected."""
    errors = list(loaded.errors)
    consequence = "The code after the error in that cell did not run; later cells did."

    def __getattr__(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)  # dunder probes (copy, pickle, inspect) stay ordinary
        culprits = [error for error in errors if name in names_defined_by(error.cell.source)]
        if culprits:  # the cell that would have defined it
            raise AttributeError(f"{name!r} is not defined: "
                                 + culprits[-1].message(loaded.origin, consequence))
        details = "\n".join(error.message(loaded.origin, consequence) for error in errors)
        raise AttributeError(f"{name!r} is not defined; {len(errors)} cell(s) raised an error "
                             f"before the end: {details}")

    loaded.namespace.__getattr__ = __getattr__


@contextlib.contextmanager
def working_directory(path: str | Path) -> Iterator[None]:
    """Temporarily ``chdir`` to ``path``."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables, restoring the old values."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


TOP_LEVEL_NAME = re.compile(r"^(?:(?:async\s+)?def|class)\s+(\w+)|^(\w+)\s*(?::[^=]*)?=(?!=)")


def names_defined_by(source: str) -> set[str]:
    """The top-level names a cell's source binds: from its syntax tree, or (when it does not
    parse) from lines that start with ``def NAME``, ``class NAME`` or ``NAME =``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {a or b for line in source.splitlines() if (m := TOP_LEVEL_NAME.match(line))
                for a, b in [m.groups()]}
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = getattr(node, "targets", None) or [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _traceback(exc: BaseException) -> str:
    """The traceback without this module's own ``exec`` frame."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ else None
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
