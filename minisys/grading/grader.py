"""Grade lab notebooks: the scoring process, which never runs student code.

``python -m minisys grade NOTEBOOK... [--results results.json] [--csv grades.csv]``
``python -m minisys grade --bundle labs/NN-....ipynb -o autograder.zip`` (see ``bundle``)

1. Read the lab number from the notebook metadata (``minisys.lab``), or else
   from a file name like ``01-....ipynb``.
2. Copy the lab's tests (``tests/labs/test_labNN*.py`` and the instructor-only
   ``tests/labs/hidden/test_labNN*.py``) to a private tree and run them against
   the notebook in child processes (:mod:`minisys.grading.runner`), with the
   lab's list of forbidden minisys names (:mod:`minisys.grading.guard`).
3. Score from what was observed: the denominator is the manifest's (every
   collected test's points, known before anything ran); a test earns its
   points only if it was seen to pass; failed, skipped, errored, timed-out or
   missing tests earn 0. Tests that need hardware this machine lacks are "not
   gradable here": listed, and left out of the maximum.
4. Print a score table and the flags of the static scan; optionally write
   Gradescope's ``results.json`` and (for many notebooks) a CSV.

Failing tests are a grade, not an error: the exit code is 0 unless grading
itself could not run (no such notebook, no tests for the lab, tests that do
not collect).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minisys.grading import guard
from minisys.grading.namespace import strip_magics
from minisys.grading.source import BENCHMARK_TAG
from minisys.grading.runner import GradingError, GradingTree, Limits, run_lab

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_NAME = re.compile(r"^(?P<number>\d\d)-")
NOT_GRADABLE = "not gradable here"

__all__ = ["GradeReport", "GradedTest", "GradingError", "Limits", "grade", "main_grade"]


@dataclass(frozen=True)
class GradedTest:
    """One row of the score table."""

    name: str
    exercise: str | None
    points: float
    outcome: str  # "passed", "failed", "skipped" or NOT_GRADABLE
    reason: str = ""
    output: str = ""
    hidden: bool = False  # an instructor-only test (tests/labs/hidden/)

    @property
    def score(self) -> float:
        return self.points if self.outcome == "passed" else 0.0

    @property
    def max_score(self) -> float:
        """Every test counts, whatever happened to it, unless this machine cannot run it."""
        return 0.0 if self.outcome == NOT_GRADABLE else self.points


@dataclass
class GradeReport:
    """The per-test rows of a grading run, their totals and the flags raised."""

    notebook: Path
    lab: str
    tests: list[GradedTest] = field(default_factory=list)
    pytest_output: str = ""
    flags: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(test.score for test in self.tests)

    @property
    def max_score(self) -> float:
        return sum(test.max_score for test in self.tests)

    @property
    def not_gradable(self) -> list[GradedTest]:
        return [test for test in self.tests if test.outcome == NOT_GRADABLE]

    def to_gradescope(self) -> dict:
        """Gradescope's autograder ``results.json`` content (only keys its spec documents;
        the maximum, the lab and the flags go in ``extra_data``)."""
        notes = [f"{len(self.not_gradable)} test(s) {NOT_GRADABLE}: "
                 + ", ".join(test.name for test in self.not_gradable)] if self.not_gradable else []
        return {
            "score": self.score,
            "extra_data": {"max_score": self.max_score, "lab": self.lab, "flags": self.flags},
            "output": "\n".join([f"Lab {self.lab}: {self.score:g} / {self.max_score:g}", *notes]),
            "visibility": "visible",
            "stdout_visibility": "hidden",
            "tests": [
                {
                    "name": test.name + (f" ({test.exercise})" if test.exercise else ""),
                    "score": test.score,
                    "max_score": test.max_score,
                    "status": "passed" if test.outcome == "passed" else "failed",
                    "output": test.output or test.reason or test.outcome,
                    "visibility": "after_published" if test.hidden else "visible",
                }
                for test in self.tests
            ],
        }


def lab_of_notebook(notebook_path: Path) -> str:
    """The two-digit lab number of a notebook: metadata first, then the file name."""
    try:
        notebook = nbformat.read(notebook_path, as_version=4)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a grading error
        raise GradingError(f"cannot read notebook {notebook_path}: {error}") from error
    lab = notebook.metadata.get("minisys", {}).get("lab")
    match = NOTEBOOK_NAME.match(notebook_path.name)
    if lab is None and match is not None:
        lab = match["number"]
    if lab is None or not re.fullmatch(r"\d\d", str(lab)):
        raise GradingError(f"{notebook_path}: no minisys.lab in its metadata, name it NN-....ipynb")
    return str(lab)


def lab_test_files(tests_dir: Path, lab: str) -> list[Path]:
    """``test_labNN*.py`` and ``hidden/test_labNN*.py`` of ``tests_dir``."""
    files = sorted(tests_dir.glob(f"test_lab{lab}*.py"))
    return files + sorted((tests_dir / "hidden").glob(f"test_lab{lab}*.py")) if files else []


def lab_guard_spec(tests_dir: Path, lab: str) -> dict:
    """The lab's guard (:func:`guard.lab_spec`): ``guard-labNN.json`` beside the tests
    (a bundle ships it), else derived from ``solutions/`` and the lab's tests."""
    shipped = tests_dir / f"guard-lab{lab}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text(encoding="utf-8"))
    solutions = sorted((tests_dir.parents[1] / "solutions").glob(f"lab{lab}_*.py"))
    test_file = tests_dir / f"test_lab{lab}.py"
    if len(solutions) != 1 or not test_file.is_file():
        return {"lab": lab, "forbidden": [], "exercises": []}
    return guard.lab_spec(lab, test_file, solutions[0])


def grade(
    notebook_path: str | Path,
    tests_dir: str | Path | None = None,
    timeout: float | None = None,
    limits: Limits | None = None,
) -> GradeReport:
    """Run lab NN's tests against ``notebook_path`` and return the scored rows.

    ``timeout`` (seconds), if given, is the limit for each test and for the
    notebook's cells; ``limits`` sets them one by one.
    """
    notebook_path = Path(notebook_path).resolve()
    if not notebook_path.is_file():
        raise GradingError(f"no such notebook: {notebook_path}")
    lab = lab_of_notebook(notebook_path)
    tests_dir = Path(tests_dir or REPO_ROOT / "tests" / "labs").resolve()
    files = lab_test_files(tests_dir, lab)
    if not files:
        raise GradingError(f"no tests for lab {lab}: {tests_dir / f'test_lab{lab}.py'} does not exist")
    limits = limits or (Limits(load=timeout, test=timeout) if timeout else Limits())
    spec = lab_guard_spec(tests_dir, lab)
    flags = guard.scan_code(_code_cells(notebook_path), spec["forbidden"])
    with tempfile.TemporaryDirectory(prefix="minisys-grade-") as scratch:
        tree = GradingTree(Path(scratch), files, tests_dir / "conftest.py")
        guard_file = Path(scratch) / "guard.json"
        guard_file.write_text(json.dumps(spec), encoding="utf-8")
        args = [f"--lab-notebook={notebook_path}", f"--lab-guard={guard_file}",
                f"--lab-root={tests_dir.parents[1]}"]
        run = run_lab(tree, args, limits)
    tests = [_graded(row, run.observed.get(row["nodeid"])) for row in run.manifest]
    return GradeReport(notebook_path, lab, tests, run.output, flags + run.notes)


def _graded(row: dict, seen) -> GradedTest:
    """A manifest row and what was observed of it (``None``: it never reported)."""
    if row["not_gradable"]:
        outcome, reason, output = NOT_GRADABLE, row["not_gradable"], ""
    elif seen is None:
        outcome, reason, output = "failed", "did not run", ""
    else:
        outcome, reason, output = seen.outcome, seen.reason, seen.output
    if outcome == "skipped":
        reason = f"skipped ({reason}): a skipped test scores 0"
    return GradedTest(_display_name(row["name"]), row["exercise"], float(row["points"]),
                      outcome, reason, output, hidden="/hidden/" in row["nodeid"])


def _code_cells(notebook_path: Path) -> list[tuple[int, str]]:
    """``(index, source)`` of the notebook's graded code cells, for the static scan."""
    notebook = nbformat.read(notebook_path, as_version=4)
    return [(index, strip_magics(cell.source)) for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and BENCHMARK_TAG not in cell.metadata.get("tags", [])]


def _display_name(name: str) -> str:
    """Drop the ``notebook`` parameter id: ``test_x[notebook-4]`` -> ``test_x[4]``."""
    base, bracket, params = name.partition("[")
    if not bracket:
        return name
    kept = [part for part in params.removesuffix("]").split("-") if part != "notebook"]
    return f"{base}[{'-'.join(kept)}]" if kept else base


def score_table(report: GradeReport) -> Table:
    """The rich table: test, exercise, points, result, short reason, then the total."""
    table = Table(title=Text(f"Lab {report.lab}: {report.notebook.name}"), show_footer=True)
    table.add_column("test", footer="total")
    table.add_column("exercise")
    table.add_column("points", justify="right",
                     footer=f"{report.score:g}/{report.max_score:g}")
    table.add_column("result")
    table.add_column("reason", overflow="fold", max_width=70)
    styles = {"passed": "green", "failed": "red", "skipped": "red", NOT_GRADABLE: "yellow"}
    for test in report.tests:
        name = test.name + (" (hidden)" if test.hidden else "")
        table.add_row(Text(name), Text(test.exercise or ""), _points(test),
                      Text(test.outcome, style=styles[test.outcome]), Text(_short(test.reason)))
    return table


def _points(test: GradedTest) -> str:
    """``1/2``; a test this machine cannot run: ``-/2``."""
    earned = "-" if test.outcome == NOT_GRADABLE else f"{test.score:g}"
    return f"{earned}/{test.points:g}"


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_results(report: GradeReport, path: str | Path) -> None:
    """Write Gradescope's ``results.json``."""
    Path(path).write_text(json.dumps(report.to_gradescope(), indent=2) + "\n", encoding="utf-8")


CSV_FIELDS = ["notebook", "lab", "score", "max_score", "not_gradable", "flags", "error"]


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One row per graded notebook (``CSV_FIELDS``); ``error`` when grading could not run."""
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _csv_row(notebook: Path, report: GradeReport | None, error: str = "") -> dict:
    if report is None:
        return dict.fromkeys(CSV_FIELDS, "") | {"notebook": str(notebook), "error": error}
    return {"notebook": str(notebook), "lab": report.lab, "score": f"{report.score:g}",
            "max_score": f"{report.max_score:g}", "not_gradable": len(report.not_gradable),
            "flags": " | ".join(report.flags), "error": ""}


def main_grade(argv: list[str]) -> int:
    """``grade NOTEBOOK... [--results R] [--csv C] [--tests DIR]`` or ``grade --bundle NB -o Z``."""
    parser = argparse.ArgumentParser(prog="python -m minisys grade",
                                     description="Grade lab notebooks.")
    parser.add_argument("notebooks", type=Path, nargs="+")
    parser.add_argument("--results", type=Path,
                        help="write Gradescope's results.json here (one notebook only)")
    parser.add_argument("--csv", type=Path, help="write one row per notebook to this CSV")
    parser.add_argument("--tests", type=Path, help="folder of test_labNN.py (default tests/labs)")
    parser.add_argument("--timeout", type=float,
                        help="seconds for each test and for the notebook's cells")
    parser.add_argument("--bundle", action="store_true",
                        help="write a Gradescope autograder zip for the notebook's lab (-o)")
    parser.add_argument("-o", "--output", type=Path, default=Path("autograder.zip"),
                        help="the zip --bundle writes (default autograder.zip)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print pytest's output")
    args = parser.parse_args(argv)
    console = Console()
    if args.bundle:
        from minisys.grading.bundle import main_bundle

        return main_bundle(args.notebooks, args.output, args.tests, console)
    if args.results and len(args.notebooks) > 1:
        parser.error("--results takes one notebook; use --csv for many")
    rows, status = [], 0
    for notebook in args.notebooks:
        try:
            report = grade(notebook, args.tests, args.timeout)
        except GradingError as error:
            console.print(Text(f"grading {notebook} failed: ", style="red") + Text(str(error)))
            rows.append(_csv_row(notebook, None, str(error).splitlines()[0]))
            status = 2
            continue
        rows.append(_csv_row(notebook, report))
        _print_report(console, report, args.verbose)
        if args.results:
            write_results(report, args.results)
            console.print(f"wrote {args.results}")
    if args.csv:
        write_csv(rows, args.csv)
        console.print(f"wrote {args.csv} ({len(rows)} rows)")
    return status


def _print_report(console: Console, report: GradeReport, verbose: bool) -> None:
    if verbose:
        console.print(report.pytest_output, markup=False, highlight=False)
    console.print(score_table(report))
    for flag in report.flags:
        console.print(Text("flag: ", style="yellow") + Text(flag))
    if report.not_gradable:
        console.print(f"{len(report.not_gradable)} test(s) {NOT_GRADABLE} (left out of the maximum)")
    console.print(f"score: {report.score:g} / {report.max_score:g}")


def main(argv: list[str] | None = None) -> int:
    """``python -m minisys.grading.grader NOTEBOOK ...``."""
    return main_grade(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
