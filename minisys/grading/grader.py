"""Grade a lab notebook: run its lab's tests against it and score them.

``python -m minisys grade labs/01-tokens-to-text.ipynb [--results results.json]``

1. Read the lab number from the notebook metadata (``minisys.lab``), or else
   from a file name like ``01-....ipynb``.
2. Run ``pytest tests/labs/test_labNN.py --lab-notebook NOTEBOOK`` in a
   subprocess, with the collector plugin recording each test's outcome.
3. Score: a passed test earns its ``points``; a failed one earns 0; a skipped
   one (say, it needs a GPU) is left out of both the score and the maximum.
4. Print a score table; optionally write Gradescope's ``results.json``.

Failing tests are a grade, not an error: the exit code is 0 unless grading
itself could not run (no such notebook, no tests for the lab, pytest broke).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minisys.grading.namespace import QUICK_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_NAME = re.compile(r"^(?P<number>\d\d)-")


class GradingError(RuntimeError):
    """Grading could not run (as opposed to: the tests ran and some failed)."""


@dataclass(frozen=True)
class GradedTest:
    """One row of the score table."""

    name: str
    exercise: str | None
    points: float
    outcome: str  # "passed", "failed" or "skipped"
    reason: str = ""
    output: str = ""

    @property
    def score(self) -> float:
        return self.points if self.outcome == "passed" else 0.0

    @property
    def max_score(self) -> float:
        """Skipped tests are not graded: they count for nothing either way."""
        return 0.0 if self.outcome == "skipped" else self.points


@dataclass
class GradeReport:
    """The per-test rows of a grading run and their totals."""

    notebook: Path
    lab: str
    tests: list[GradedTest] = field(default_factory=list)
    pytest_output: str = ""

    @property
    def score(self) -> float:
        return sum(test.score for test in self.tests)

    @property
    def max_score(self) -> float:
        return sum(test.max_score for test in self.tests)

    def to_gradescope(self) -> dict:
        """Gradescope's autograder ``results.json`` content."""
        return {
            "score": self.score,
            "max_score": self.max_score,
            "tests": [
                {
                    "name": test.name + (f" ({test.exercise})" if test.exercise else ""),
                    "score": test.score,
                    "max_score": test.max_score,
                    "output": test.output or test.reason or test.outcome,
                    "visibility": "visible",
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
    if lab is None:
        raise GradingError(f"{notebook_path}: no minisys.lab in its metadata, name it NN-....ipynb")
    return str(lab)


def grade(
    notebook_path: str | Path,
    tests_dir: str | Path | None = None,
    timeout: float | None = None,
) -> GradeReport:
    """Run lab NN's tests against ``notebook_path`` and return the scored rows."""
    notebook_path = Path(notebook_path).resolve()
    if not notebook_path.is_file():
        raise GradingError(f"no such notebook: {notebook_path}")
    lab = lab_of_notebook(notebook_path)
    test_file = Path(tests_dir or REPO_ROOT / "tests" / "labs").resolve() / f"test_lab{lab}.py"
    if not test_file.is_file():
        raise GradingError(f"no tests for lab {lab}: {test_file} does not exist")
    with tempfile.TemporaryDirectory(prefix="minisys-grade-") as scratch:
        report_path = Path(scratch) / "report.json"
        output = _run_pytest(test_file, notebook_path, report_path, timeout)
        data = _read_report(report_path, output)
    tests = [
        GradedTest(_display_name(row["name"]), row["exercise"], row["points"],
                   row["outcome"], row["reason"], row["output"])
        for row in data["tests"]
    ]
    return GradeReport(notebook_path, lab, tests, output)


def _run_pytest(test_file: Path, notebook: Path, report_path: Path, timeout: float | None) -> str:
    """Run the lab's tests in a fresh interpreter; return pytest's output."""
    root = test_file.parents[2]  # tests/labs/test_labNN.py -> the repository
    command = [
        sys.executable, "-m", "pytest", str(test_file),
        f"--lab-notebook={notebook}",
        "-p", "minisys.grading.collector", f"--grade-report={report_path}",
        "-p", "no:cacheprovider", "-q", "-rN", "--color=no",
    ]
    env = {**os.environ, **QUICK_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise GradingError(f"the tests did not finish within {timeout} s") from error
    return done.stdout + done.stderr


def _read_report(report_path: Path, output: str) -> dict:
    """Load the collector's JSON, or explain why pytest produced no grade."""
    if not report_path.exists():
        raise GradingError(f"pytest did not run the tests:\n{output[-3000:]}")
    data = json.loads(report_path.read_text(encoding="utf-8"))
    if data["collection_errors"] or data["exitstatus"] not in (0, 1) or not data["tests"]:
        errors = "\n".join(data["collection_errors"])
        status = data["exitstatus"]
        raise GradingError(f"pytest could not grade (exit status {status}):\n{errors}\n"
                           f"{output[-3000:]}")
    return data


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
    styles = {"passed": "green", "failed": "red", "skipped": "yellow"}
    for test in report.tests:
        table.add_row(Text(test.name), Text(test.exercise or ""),
                      _points(test),
                      Text(test.outcome, style=styles[test.outcome]), Text(_short(test.reason)))
    return table


def _points(test: GradedTest) -> str:
    """``1/2``; a skipped test is not graded: ``-/2``."""
    earned = "-" if test.outcome == "skipped" else f"{test.score:g}"
    return f"{earned}/{test.points:g}"


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_results(report: GradeReport, path: str | Path) -> None:
    """Write Gradescope's ``results.json``."""
    Path(path).write_text(json.dumps(report.to_gradescope(), indent=2) + "\n", encoding="utf-8")


def main_grade(argv: list[str]) -> int:
    """``grade NOTEBOOK [--results results.json] [--tests tests/labs]``."""
    parser = argparse.ArgumentParser(prog="python -m minisys grade",
                                     description="Grade a lab notebook.")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--results", type=Path, help="write Gradescope's results.json here")
    parser.add_argument("--tests", type=Path, help="folder of test_labNN.py (default tests/labs)")
    parser.add_argument("--timeout", type=float, help="seconds for the whole test run")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print pytest's output")
    args = parser.parse_args(argv)
    console = Console()
    try:
        report = grade(args.notebook, args.tests, args.timeout)
    except GradingError as error:
        console.print(Text("grading failed: ", style="red") + Text(str(error)))
        return 2
    if args.verbose:
        console.print(report.pytest_output, markup=False, highlight=False)
    console.print(score_table(report))
    console.print(f"score: {report.score:g} / {report.max_score:g}")
    if args.results:
        write_results(report, args.results)
        console.print(f"wrote {args.results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m minisys.grading.grader NOTEBOOK ...``."""
    return main_grade(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
