"""Generate the notebooks of a lab from its solution source, and keep labs/ in sync.

``solutions/labNN_<slug>.py``  --build_notebook(student=True)-->  ``labs/NN-<slug>.ipynb``

The student notebook has every exercise region replaced by a stub, no outputs,
cell ids ``cell-000``, ``cell-001``, ... and is written as nbformat v4 JSON with
sorted keys, so regenerating it gives the same bytes. It is never edited by
hand: ``python -m minisys labs check`` fails when it drifts from its source.
The solution notebook (``student=False``) keeps the solution code; it is what
CI executes top to bottom and grades for full marks.

Students do not edit ``labs/``: ``python -m minisys labs start NN`` copies lab
NN's notebook to ``work/NN-<slug>.ipynb`` (gitignored), where ``git pull`` and
``labs build`` never write; they work on and grade that copy.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minisys.grading.guard import rules_paragraph, with_rules_section
from minisys.grading.source import (
    Cell,
    LabFormatError,
    LabSource,
    parse_solution,
    stub_exercises,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def build_notebook(lab: LabSource, student: bool = True) -> nbformat.NotebookNode:
    """The notebook of ``lab``: stubs in place of solutions when ``student``."""
    cells = [_notebook_cell(cell, index, lab, student) for index, cell in enumerate(lab.cells)]
    metadata = {
        "kernelspec": dict(KERNELSPEC),
        "language_info": {"name": "python"},
        "minisys": {"lab": lab.number, "source": lab.source_ref},
    }
    return new_notebook(cells=cells, metadata=metadata)


def _notebook_cell(
    cell: Cell, index: int, lab: LabSource, student: bool
) -> nbformat.NotebookNode:
    """One nbformat cell with a stable id and the cell's tags in its metadata."""
    metadata = {"tags": list(cell.tags)} if cell.tags else {}
    cell_id = f"cell-{index:03d}"
    if cell.kind == "markdown":
        return new_markdown_cell(cell.source, id=cell_id, metadata=metadata)
    source = stub_exercises(cell.source, lab.path, cell.line) if student else cell.source
    return new_code_cell(source, id=cell_id, metadata=metadata)


def notebook_bytes(notebook: nbformat.NotebookNode) -> bytes:
    """Deterministic JSON: nbformat's writer sorts keys; always end with a newline."""
    nbformat.validate(notebook)
    text = nbformat.writes(notebook, version=4)
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def solution_sources(root: Path = REPO_ROOT) -> list[Path]:
    """Every ``solutions/labNN_*.py`` under ``root``, sorted."""
    return sorted((root / "solutions").glob("lab[0-9][0-9]_*.py"))


def expected_labs(root: Path = REPO_ROOT) -> dict[Path, bytes]:
    """What labs/ must hold: notebook path -> bytes, generated in memory; plus, for each lab with a
    lesson and tests, the lesson with its "what the grader allows" section (`guard.rules_paragraph`)."""
    expected = {}
    for source in solution_sources(root):
        lab = parse_solution(source)
        expected[root / "labs" / lab.notebook_name] = notebook_bytes(build_notebook(lab))
        number = source.name[3:5]
        tests = root / "tests" / "labs" / f"test_lab{number}.py"
        for lesson in sorted((root / "lessons").glob(f"{number}-*.md")):
            if tests.exists():
                text = with_rules_section(lesson.read_text(encoding="utf-8"), rules_paragraph(tests, source))
                expected[lesson] = text.encode("utf-8")
    return expected


@dataclass(frozen=True)
class LabProblem:
    """A student notebook out of sync: ``kind`` is missing, stale or orphan."""

    path: Path
    kind: str

    def __str__(self) -> str:
        reasons = {
            "missing": "missing: run `python -m minisys labs build`",
            "stale": "stale: differs from its solution source; run `python -m minisys labs build`",
            "orphan": "orphan: no solutions/labNN_*.py generates it",
        }
        return f"{_shown(self.path)}: {reasons[self.kind]}"


def check_labs(root: Path = REPO_ROOT) -> list[LabProblem]:
    """Compare labs/ with what solutions/ generates; an empty list means in sync."""
    expected = expected_labs(root)
    problems = []
    for path, content in expected.items():
        if not path.exists():
            problems.append(LabProblem(path, "missing"))
        elif path.read_bytes() != content:
            problems.append(LabProblem(path, "stale"))
    for path in sorted((root / "labs").glob("*.ipynb")):
        if path not in expected:
            problems.append(LabProblem(path, "orphan"))
    return problems


def build_labs(root: Path = REPO_ROOT) -> list[str]:
    """Regenerate labs/ from solutions/; return one line per change made.

    Notebooks are rewritten only when their bytes change; orphan notebooks
    (generated from a solution that is gone) are removed, since labs/ only
    ever holds generated files.
    """
    changes = []
    expected = expected_labs(root)
    (root / "labs").mkdir(exist_ok=True)
    for path, content in expected.items():
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
            changes.append(f"wrote {_shown(path)}")
    for path in sorted((root / "labs").glob("*.ipynb")):
        if path not in expected:
            path.unlink()
            changes.append(f"removed {_shown(path)} (no solution source)")
    return changes


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


WORK_DIR = "work"  # students' copies of the lab notebooks (gitignored)


class StartError(RuntimeError):
    """``labs start`` could not make the copy (no such lab, or the copy exists)."""


def start_lab(lab: str, root: Path = REPO_ROOT, dest: Path | None = None,
              force: bool = False) -> Path:
    """Copy ``labs/NN-<slug>.ipynb`` to ``dest`` (default ``ROOT/work/``) and return the copy.

    ``labs/`` holds generated files that ``git pull`` and ``labs check`` own; a
    student works on the copy, which nothing in the repository writes to. An
    existing copy is never overwritten unless ``force``.
    """
    if not lab.isdigit():
        raise StartError(f"a lab is a number like 03, not {lab!r}")
    number = f"{int(lab):02d}"
    matches = sorted((root / "labs").glob(f"{number}-*.ipynb"))
    if len(matches) != 1:
        known = ", ".join(path.name[:2] for path in sorted((root / "labs").glob("*.ipynb")))
        raise StartError(f"no lab {number} in {root / 'labs'} (labs: {known or 'none'})")
    dest = (dest or root / WORK_DIR).resolve()
    target = dest / matches[0].name
    if target.exists() and not force:
        raise StartError(f"{_shown(target)} exists: it is your work, so it is left as it is "
                         "(--force replaces it with a fresh copy)")
    dest.mkdir(parents=True, exist_ok=True)
    target.write_bytes(matches[0].read_bytes())
    return target


def main_labs(argv: list[str]) -> int:
    """``labs build`` regenerates labs/; ``labs check`` exits 1 if it is out of sync;
    ``labs start NN`` copies lab NN's notebook to ``work/`` to be worked on."""
    parser = argparse.ArgumentParser(
        prog="python -m minisys labs",
        description="Generate or check labs/ from solutions/, or start a lab (a copy in work/).",
    )
    parser.add_argument("action", choices=["build", "check", "start"])
    parser.add_argument("lab", nargs="?", help="start: the lab number (01, 3, ...)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"start: the folder of the copy (default ROOT/{WORK_DIR})")
    parser.add_argument("--force", action="store_true",
                        help="start: replace an existing copy (your work in it is lost)")
    args = parser.parse_args(argv)
    if args.action == "start":
        if args.lab is None:
            parser.error("start needs a lab number: labs start 01")
        try:
            copy = start_lab(args.lab, args.root, args.dest, args.force)
        except StartError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        shown = _shown(copy)
        print(f"wrote {shown}: work in this copy (labs/ is regenerated, and git pull updates it)\n"
              f"  open it:  jupyter lab {shown}\n"
              f"  grade it: python -m minisys grade {shown}")
        return 0
    if args.lab is not None:
        parser.error(f"{args.action} takes no lab number")
    try:
        if args.action == "build":
            changes = build_labs(args.root)
            print("\n".join(changes) if changes else "labs/ already up to date")
            return 0
        problems = check_labs(args.root)
    except LabFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    if not problems:
        print(f"labs/ in sync with solutions/ ({len(solution_sources(args.root))} labs)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m minisys.grading.notebooks build|check``."""
    return main_labs(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
