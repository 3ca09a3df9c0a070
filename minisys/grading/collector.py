"""The pytest plugin inside a test child (``-p minisys.grading.collector``).

With ``--grade-channel KEYFD:OUTFD`` (set by :mod:`minisys.grading.runner`)
it reads the grader's key from ``KEYFD`` at configure time -- before any
student code exists in the process -- and streams signed messages (see
:mod:`minisys.grading.protocol`) into ``OUTFD``:

- ``manifest``: when collection ends, one row per collected test: node id,
  name, ``exercise`` (``@pytest.mark.exercise``), ``points``
  (``@pytest.mark.points``, default 1) and ``not_gradable`` (the reason, for a
  test marked ``@pytest.mark.hardware("cuda")`` on a machine without it). No
  notebook is loaded during collection (``impl`` is a lazy fixture), so the
  manifest is the lab's own: the grader takes ``max_score`` from it.
- ``start`` / ``result`` around each test; setup, call and teardown fold into
  one outcome ("passed" only if all three passed).
- ``done`` when the session ends.

This process hosts student code and is not trusted with the score: it only
reports. The grader decides what a report is worth.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pytest

from minisys.grading import protocol
from minisys.grading.integrity import Snapshot

OUTPUT_LIMIT = 4000  # characters of failure text kept per test
PLUGIN_NAME = "minisys-grade-channel"


@dataclass
class ManifestRow:
    """What the grader knows about a test before anything runs."""

    nodeid: str
    name: str
    exercise: str | None
    points: float
    not_gradable: str = ""


def manifest_row(item: pytest.Item) -> ManifestRow:
    points = item.get_closest_marker("points")
    exercise = item.get_closest_marker("exercise")
    return ManifestRow(
        nodeid=item.nodeid,
        name=item.name,
        exercise=str(exercise.args[0]) if exercise and exercise.args else None,
        points=float(points.args[0]) if points and points.args else 1.0,
        not_gradable=missing_hardware(item),
    )


def missing_hardware(item: pytest.Item) -> str:
    """``"needs cuda"`` when the test is marked for hardware this machine lacks.

    ``cuda`` is the one kind this grader can detect; any other name is missing.
    """
    for marker in item.iter_markers("hardware"):
        for need in marker.args:
            if need != "cuda":
                return f"needs {need}"
            import torch

            if not torch.cuda.is_available():
                return "needs cuda"
    return ""


class GradeChannel:
    """Signs and writes the child's messages; folds test phases into one outcome."""

    def __init__(self, key: bytes, out_fd: int) -> None:
        self._key, self._out = key, out_fd
        self._outcome: dict[str, tuple[str, str, str]] = {}
        self._errors: list[str] = []
        self._snapshot: Snapshot | None = None
        self._tampered = False

    def send(self, message: dict) -> None:
        data = protocol.encode(self._key, message)
        while data:
            data = data[os.write(self._out, data):]

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            reason = missing_hardware(item)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"not gradable here: {reason}"))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._errors.append(f"{report.nodeid}: {report.longreprtext}")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.send({"kind": "manifest", "errors": self._errors,
                   "tests": [asdict(manifest_row(item)) for item in session.items]})
        self._snapshot = Snapshot(session.config)  # no student code has run yet

    def check_integrity(self) -> bool:
        """Send ``tampered`` (once) if pytest or the grader changed since collection."""
        changes = self._snapshot.changes() if self._snapshot is not None else []
        if changes and not self._tampered:
            self._tampered = True
            self.send({"kind": "tampered", "changes": changes[:20]})
        return not self._tampered

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.send({"kind": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.passed and report.when != "call":
            return
        if self._outcome.get(report.nodeid, ("passed",))[0] != "passed":
            return  # keep the first failure
        outcome = "skipped" if report.skipped else report.outcome
        reason = _reason(report)
        if reason.startswith("Failed: "):  # pytest.fail(...): the message says it all
            reason = reason.removeprefix("Failed: ")
        elif report.when != "call" and report.failed:
            reason = f"error in {report.when}: {reason}"
        self._outcome[report.nodeid] = (outcome, reason, report.longreprtext[-OUTPUT_LIMIT:])

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        if not self.check_integrity():
            return
        outcome, reason, output = self._outcome.get(nodeid, ("failed", "no report", ""))
        self.send({"kind": "result", "nodeid": nodeid, "outcome": outcome,
                   "reason": reason, "output": output})

    def pytest_sessionfinish(self) -> None:
        if self.check_integrity():
            self.send({"kind": "done"})


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
    parser.addoption("--grade-channel", default=None, metavar="KEYFD:OUTFD",
                     help="(set by the grader) stream signed test outcomes to OUTFD")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hardware(name): the test needs this hardware (cuda)")
    channel = config.getoption("grade_channel")
    if channel:
        key_fd, out_fd = (int(part) for part in channel.split(":"))
        config.pluginmanager.register(GradeChannel(protocol.read_key(key_fd), out_fd),
                                      PLUGIN_NAME)
