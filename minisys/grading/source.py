"""Read a lab's solution source: the "percent" notebook format, read by jupytext.

A solution source ``solutions/labNN_<slug>.py`` is a Python file that is also
a notebook. Cells start at header lines::

    # %% [markdown]                 a markdown cell; its lines are comments
    # # Lab 01: Tokens to text      (``# `` or ``#`` is stripped from each line)
    # %%                            a code cell
    # %% tags=["benchmark"]         a code cell with tags (a JSON list)
    # %% [markdown] tags=["x"]      a markdown cell with tags

`jupytext` (the well-kept reader and writer of that format) splits the
cells; this module adds what the course needs on top: each cell's line in
the file (tracebacks and errors point into the solution), the layout checks
below, and the exercise markers. Inside code cells, exercise regions are marked::

    ### BEGIN SOLUTION
    ...the code students write...
    ### END SOLUTION

and :func:`stub_exercises` replaces each region (markers included) by one
``raise NotImplementedError(...)`` line indented like the BEGIN marker.

Invariants checked here (a :class:`LabFormatError` names file and line):
  - the file starts with a cell header; nothing but blank lines before it;
  - every markdown line is a comment (so the file stays valid Python);
  - exercise regions are matched, do not nest and stay inside one cell;
  - the first cell is markdown whose first line is ``# Lab NN: Title`` with
    ``NN`` the number in the file name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jupytext

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"
STUB_LINE = 'raise NotImplementedError("exercise: fill in this part")'
BENCHMARK_TAG = "benchmark"

SOLUTION_NAME = re.compile(r"^lab(?P<number>\d\d)_(?P<slug>[a-z0-9_]+)\.py$")
CELL_HEADER = re.compile(r"^# %%(?P<rest>.*)$")
HEADER_REST = re.compile(r"^(?:\s+\[(?P<kind>[a-z]+)\])?(?:\s+tags=(?P<tags>\[.*\]))?\s*$")
TITLE = re.compile(r"^# Lab (?P<number>\d\d): (?P<title>\S.*)$")

CellKind = Literal["markdown", "code"]


class LabFormatError(ValueError):
    """A solution source breaks the format; the message starts ``path:line:``."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line = Path(path), line


@dataclass(frozen=True)
class Cell:
    """One notebook cell as written in the solution source.

    ``line`` is the 1-based line of the solution file on which ``source``
    starts, so code can be compiled with tracebacks that point into the file.
    """

    kind: CellKind
    source: str
    tags: tuple[str, ...] = ()
    line: int = 1

    @property
    def is_benchmark(self) -> bool:
        """Benchmark cells run top to bottom in Jupyter but the grader skips them."""
        return BENCHMARK_TAG in self.tags


@dataclass(frozen=True)
class LabSource:
    """A parsed solution source: lab number, slug, title and cells."""

    path: Path
    number: str  # two digits, "01"
    slug: str  # "tokens_to_text"
    title: str  # "Tokens to text"
    cells: tuple[Cell, ...]

    @property
    def notebook_name(self) -> str:
        """The student notebook's file name: ``01-tokens-to-text.ipynb``."""
        return f"{self.number}-{self.slug.replace('_', '-')}.ipynb"

    @property
    def source_ref(self) -> str:
        """The source as recorded in notebook metadata: ``solutions/<name>``."""
        return f"solutions/{self.path.name}"


def parse_solution(path: str | Path) -> LabSource:
    """Parse ``solutions/labNN_<slug>.py`` and check its lab metadata."""
    path = Path(path)
    match = SOLUTION_NAME.match(path.name)
    if match is None:
        raise LabFormatError(path, 1, "a solution source is named labNN_<slug>.py")
    cells = parse_percent(path.read_text(encoding="utf-8"), path)
    first = cells[0] if cells else None
    if first is None or first.kind != "markdown":
        raise LabFormatError(path, 1, "the first cell must be markdown with the title")
    title = TITLE.match(first.source.splitlines()[0] if first.source else "")
    if title is None or title["number"] != match["number"]:
        raise LabFormatError(
            path, first.line, f"the first line must be '# Lab {match['number']}: Title'"
        )
    for cell in cells:
        if cell.kind == "code":
            exercise_regions(cell.source, path, cell.line)  # raises if unmatched
    return LabSource(path, match["number"], match["slug"], title["title"], tuple(cells))


def parse_percent(text: str, path: str | Path = "<solution>") -> list[Cell]:
    """Split percent-format ``text`` into cells (jupytext), after checking the layout rules."""
    starts = _check_layout(text, path)
    notebook = jupytext.reads(text, fmt="py:percent")
    if len(notebook.cells) != len(starts):
        raise LabFormatError(path, 1, f"jupytext read {len(notebook.cells)} cells, the file has "
                                      f"{len(starts)} '# %%' headers")
    return [Cell(cell.cell_type, cell.source, tuple(cell.metadata.get("tags", ())), line)
            for cell, line in zip(notebook.cells, starts)]


def _check_layout(text: str, path: str | Path) -> list[int]:
    """Raise `LabFormatError` on text before the first header, an unreadable header, or a markdown
    line that is not a comment; return each cell's first non-blank line (1-based)."""
    starts: list[int] = []
    kind: CellKind | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if CELL_HEADER.match(line):
            kind = _parse_header(line, path, number)[0]
            starts.append(0)
        elif kind is None:
            if line.strip():
                raise LabFormatError(path, number, "text before the first '# %%' cell header")
        elif line.strip():
            if kind == "markdown" and not line.startswith("#"):
                raise LabFormatError(path, number, "markdown lines must be comments ('# text')")
            starts[-1] = starts[-1] or number
    return [n or 1 for n in starts]


def _parse_header(line: str, path: str | Path, number: int) -> tuple[CellKind, tuple[str, ...]]:
    """``# %% [markdown] tags=["a"]`` -> ("markdown", ("a",))."""
    match = HEADER_REST.match(CELL_HEADER.match(line)["rest"])  # type: ignore[index]
    if match is None or match["kind"] not in (None, "markdown"):
        raise LabFormatError(path, number, f"cannot read cell header {line!r}")
    tags: tuple[str, ...] = ()
    if match["tags"]:
        try:
            tags = tuple(json.loads(match["tags"]))
        except json.JSONDecodeError as error:
            raise LabFormatError(path, number, f"tags must be a JSON list: {error}") from None
        if not all(isinstance(tag, str) for tag in tags):
            raise LabFormatError(path, number, "tags must be strings")
    return ("markdown" if match["kind"] else "code"), tags


def exercise_regions(
    code: str, path: str | Path = "<cell>", first_line: int = 1
) -> list[tuple[int, int]]:
    """Return ``(begin, end)`` 0-based line indices of each exercise region in ``code``.

    ``first_line`` is the file line of ``code``'s first line, for error messages.
    Raises :class:`LabFormatError` on a nested, unclosed or unopened marker.
    """
    regions: list[tuple[int, int]] = []
    begin: int | None = None
    for index, line in enumerate(code.splitlines()):
        marker = line.strip()
        if marker == BEGIN_MARKER:
            if begin is not None:
                raise LabFormatError(path, first_line + index, f"nested '{BEGIN_MARKER}'")
            begin = index
        elif marker == END_MARKER:
            if begin is None:
                raise LabFormatError(path, first_line + index, f"'{END_MARKER}' without BEGIN")
            regions.append((begin, index))
            begin = None
    if begin is not None:
        raise LabFormatError(
            path, first_line + begin, f"'{BEGIN_MARKER}' without END in the same cell"
        )
    return regions


def stub_exercises(code: str, path: str | Path = "<cell>", first_line: int = 1) -> str:
    """Replace every exercise region (markers included) by an indented stub line."""
    lines = code.splitlines()
    for begin, end in reversed(exercise_regions(code, path, first_line)):
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        lines[begin : end + 1] = [indent + STUB_LINE]
    return "\n".join(lines)
