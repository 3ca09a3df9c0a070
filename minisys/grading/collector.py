"""A pytest plugin the grader loads (``-p minisys.grading.collector``) to record results.

With ``--grade-report PATH`` it writes, when the session ends::

    {"exitstatus": 1,
     "collection_errors": ["tests/labs/test_lab01.py: ..."],
     "tests": [{"nodeid": ..., "name": "test_x[notebook]", "exercise": "softmax",
                "points": 2.0, "outcome": "passed" | "failed" | "skipped",
                "reason": "one line", "output": "the failure text"}]}

One row per collected test item. An error in setup (for example the notebook
failed to execute) or teardown counts as ``failed``. ``points`` comes from
``@pytest.mark.points(N)`` (default 1), ``exercise`` from
``@pytest.mark.exercise(name)`` (default none).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

OUTPUT_LIMIT = 4000  # characters of failure text kept per test


@dataclass
class GradeRow:
    """What the grader needs to know about one test."""

    nodeid: str
    name: str
    exercise: str | None
    points: float
    outcome: str = "failed"  # until a report says otherwise: a test that never ran scores 0
    reason: str = "did not run"
    output: str = ""


class GradeCollector:
    """Collects one :class:`GradeRow` per test and dumps them as JSON at the end."""

    def __init__(self, report_path: Path) -> None:
        self.report_path = report_path
        self.rows: dict[str, GradeRow] = {}
        self.collection_errors: list[str] = []

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            points = item.get_closest_marker("points")
            exercise = item.get_closest_marker("exercise")
            self.rows[item.nodeid] = GradeRow(
                nodeid=item.nodeid,
                name=item.name,
                exercise=str(exercise.args[0]) if exercise and exercise.args else None,
                points=float(points.args[0]) if points and points.args else 1.0,
            )

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_errors.append(f"{report.nodeid}: {report.longreprtext}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = self.rows.get(report.nodeid)
        if row is None or (report.when != "call" and report.passed):
            return
        if report.when == "teardown" and row.outcome != "passed":
            return  # keep the first failure
        row.outcome = "skipped" if report.skipped else report.outcome
        row.reason, row.output = _reason(report), report.longreprtext[-OUTPUT_LIMIT:]
        if row.reason.startswith("Failed: "):  # pytest.fail(...): the message says it all
            row.reason = row.reason.removeprefix("Failed: ")
        elif report.when != "call" and report.failed:
            row.reason = f"error in {report.when}: {row.reason}"

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        data = {
            "exitstatus": int(exitstatus),
            "collection_errors": self.collection_errors,
            "tests": [asdict(row) for row in self.rows.values()],
        }
        self.report_path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _reason(report: pytest.TestReport) -> str:
    """A one-line summary: the assertion or exception message, or the skip reason."""
    if report.passed:
        return ""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # skipped: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else report.longreprtext
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "failed"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--grade-report", default=None, metavar="PATH",
                     help="write each test's outcome and points to PATH as JSON")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("grade_report")
    if path:
        config.pluginmanager.register(GradeCollector(Path(path)), "minisys-grade-collector")
