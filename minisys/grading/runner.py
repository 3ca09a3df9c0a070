"""Run a lab's tests against a notebook in child processes; observe, never trust.

The grader process never executes student code. This module starts *test
children*: ``python -I`` running pytest on a private copy of the lab's tests
(see :class:`GradingTree`) with ``--lab-notebook``; the notebook's cells run
inside the child, under the lab's guard. The child streams signed messages
(:mod:`minisys.grading.protocol`) and the grader alone turns them into a score:

- **the manifest** (every test, its points and exercise) arrives when the
  first child finishes collecting, before any notebook cell has run; it fixes
  the denominator. A test with no accepted result scores 0 of its points.
- **the order is enforced**: a result counts only for the test whose ``start``
  came just before it, once; nothing is accepted after ``done``, before the
  manifest, or for a node id outside it. A protocol violation stops the child
  and the tests it had not reported score 0.
- **time limits**: the notebook's cells get ``load_timeout`` seconds; each
  test ``test_timeout``. A test that runs over is killed with its child; it
  and the rest of its exercise's tests score 0 ("timed out"), and a fresh child
  grades the tests still to run. A child that exits in the middle of a test
  (``sys.exit`` in a cell is caught; ``os._exit`` or a crash is not) costs that
  test only.
- **the files are checked**: before each child the grader hashes the test tree
  and the ``minisys`` package; if the notebook changed them, grading stops and
  the remaining tests score 0.

What this does not defend against: code that runs inside a child can reach
the child's plugin and sign what it likes (Python has no in-process
boundary). Such an attack has to target this grader's internals by name, which
the static scan of :mod:`minisys.grading.guard` flags for review; a
container per submission (as Gradescope runs) bounds the rest.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from minisys.grading import protocol
from minisys.grading.namespace import QUICK_ENV

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the minisys package
BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import pytest; "
        "sys.exit(pytest.main(sys.argv[1:]))")
PYTEST_INI = """\
[pytest]
markers =
    slow: loads the real default model
    points(n): points a lab test is worth in the grader
    exercise(name): the lab exercise a test grades
    hardware(name): the test needs this hardware (cuda)
"""


@dataclass(frozen=True)
class Observed:
    """What the grader saw of one test."""

    outcome: str  # "passed", "failed" or "skipped"
    reason: str = ""
    output: str = ""


@dataclass
class Limits:
    """Seconds: collecting, the notebook's cells, one test."""

    collect: float = 180.0
    load: float = 180.0
    test: float = 120.0


class GradingTree:
    """A private copy of a lab's tests, and the hash that says it is unchanged.

    Layout: ``ROOT/pytest.ini``, ``ROOT/tests/conftest.py`` (the shared
    fixtures, when the repository has them), ``ROOT/tests/labs/conftest.py``,
    ``ROOT/tests/labs/test_labNN*.py`` and ``ROOT/tests/labs/hidden/test_labNN*.py``.
    """

    def __init__(self, scratch: Path, test_files: list[Path], conftest: Path) -> None:
        self.root = scratch / "tree"
        labs = self.root / "tests" / "labs"
        (labs / "hidden").mkdir(parents=True)
        (self.root / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
        shutil.copy(conftest, labs / "conftest.py")
        shared = conftest.parent.parent / "conftest.py"
        if shared.is_file():
            shutil.copy(shared, labs.parent / "conftest.py")
        self.files = []
        for path in test_files:
            target = labs / ("hidden" if path.parent.name == "hidden" else "") / path.name
            shutil.copy(path, target)
            self.files.append(target)
        self.digest = self.fingerprint()

    def fingerprint(self) -> str:
        """SHA-256 over the tree's files and the minisys package's sources."""
        digest = hashlib.sha256()
        for base in (self.root, PACKAGE_ROOT):
            for path in sorted(base.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()


@dataclass
class ChildRun:
    """What one child reported before it finished, exited or was stopped."""

    manifest: list[dict] | None = None
    errors: list[str] = field(default_factory=list)
    results: dict[str, Observed] = field(default_factory=dict)
    current: str | None = None  # a test that started and did not finish
    phase: str = "collecting"  # collecting | loading | testing | done
    stopped: str = ""  # why the grader stopped the child ("" if it ended by itself)
    cell_errors: list[str] = field(default_factory=list)  # the notebook's cells that raised
    exit_code: int | None = None
    output: str = ""


def run_child(tree: GradingTree, targets: list[str], args: list[str], limits: Limits,
              expected: set[str] | None) -> ChildRun:
    """Start one test child on ``targets`` and follow its messages to the end."""
    key = protocol.new_key()
    key_r, key_w = os.pipe()
    out_r, out_w = os.pipe()
    log = tempfile.TemporaryFile()
    command = [sys.executable, "-I", "-c", BOOT, str(PACKAGE_ROOT.parent),
               "-c", str(tree.root / "pytest.ini"), "--rootdir", str(tree.root),
               "--confcutdir", str(tree.root / "tests"),
               "-p", "no:cacheprovider", "-p", "minisys.grading.collector",
               f"--grade-channel={key_r}:{out_w}", "-q", "--color=no", *args, *targets]
    env = {**os.environ, **QUICK_ENV, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    child = subprocess.Popen(command, cwd=tree.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, pass_fds=(key_r, out_w),
                             start_new_session=True)
    os.close(key_r)
    os.close(out_w)
    os.write(key_w, key)
    os.close(key_w)
    run = ChildRun()
    try:
        _follow(child, out_r, key, run, limits, expected)
    finally:
        os.close(out_r)
        _stop(child, grace=0 if run.stopped else 5)
        run.exit_code = child.returncode
        log.seek(0)
        run.output = log.read().decode("utf-8", "replace")
        log.close()
    return run


def _follow(child: subprocess.Popen, out_r: int, key: bytes, run: ChildRun, limits: Limits,
            expected: set[str] | None) -> None:
    """Read messages until ``done``, end of stream, a violation or a time limit."""
    buffer, deadline = b"", time.monotonic() + limits.collect
    while run.phase != "done":
        wait = deadline - time.monotonic()
        if wait <= 0:
            run.stopped = "timeout"
            return
        ready, _, _ = select.select([out_r], [], [], wait)
        if not ready:
            continue
        chunk = os.read(out_r, 65536)
        if not chunk:
            return  # the child closed the pipe: it exited
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            message = protocol.decode(key, line)
            if message is None:
                continue  # not signed by the plugin: ignored
            violation = _accept(run, message, expected)
            if violation:
                run.stopped = f"protocol violation: {violation}"
                return
            if run.phase == "done":
                return
            budget = {"loading": limits.load}.get(run.phase, limits.test)
            deadline = time.monotonic() + budget


def _accept(run: ChildRun, message: dict, expected: set[str] | None) -> str:
    """Apply one message to ``run``; return a violation, or "" if it is in order."""
    kind = message.get("kind")
    if kind == "manifest":
        if run.phase != "collecting":
            return "a second manifest"
        run.manifest, run.errors = list(message.get("tests", [])), list(message.get("errors", []))
        run.phase = "testing"
        return ""
    if run.manifest is None:
        return f"{kind!r} before the manifest"
    ids = {row["nodeid"] for row in run.manifest}
    if kind in ("loading", "loaded"):
        run.phase = "loading" if kind == "loading" else "testing"
        if kind == "loaded":
            errors = message.get("cell_errors")
            run.cell_errors = [str(error)[:300] for error in errors[:20]] if isinstance(errors, list) else []
        return ""
    if kind == "start":
        nodeid = message.get("nodeid")
        if run.current is not None or nodeid not in ids or nodeid in run.results:
            return f"start of {nodeid!r} out of order"
        if expected is not None and nodeid not in expected:
            return f"start of {nodeid!r}, which was not asked for"
        run.current = nodeid
        return ""
    if kind == "result":
        if message.get("nodeid") != run.current or run.phase == "loading":
            return f"result for {message.get('nodeid')!r} out of order"
        outcome = message.get("outcome")
        if outcome not in ("passed", "failed", "skipped"):
            return f"unknown outcome {outcome!r}"
        run.results[run.current] = Observed(outcome, str(message.get("reason", "")),
                                            str(message.get("output", "")))
        run.current = None
        return ""
    if kind == "tampered":
        return "the code under test changed pytest or the grader: " + ", ".join(
            map(str, message.get("changes", [])))
    if kind == "done":
        if run.current is not None:
            return "done in the middle of a test"
        run.phase = "done"
        return ""
    return f"unknown message {kind!r}"


def _stop(child: subprocess.Popen, grace: float) -> None:
    """Give the child ``grace`` seconds to exit, then kill its whole process group."""
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()


@dataclass
class LabRun:
    """Everything the grader observed: the manifest, one result per test, notes."""

    manifest: list[dict]
    observed: dict[str, Observed]
    notes: list[str]
    output: str


class GradingError(RuntimeError):
    """Grading could not run (as opposed to: the tests ran and some failed)."""


def run_lab(tree: GradingTree, args: list[str], limits: Limits) -> LabRun:
    """Grade every test of ``tree`` with as many children as failures require."""
    targets = [str(path.relative_to(tree.root)) for path in tree.files]
    manifest: list[dict] | None = None
    observed: dict[str, Observed] = {}
    notes: list[str] = []
    output = ""
    pending: list[str] | None = None
    while pending is None or pending:
        if tree.fingerprint() != tree.digest:
            notes.append("the test files or the minisys package changed during grading: "
                         "grading stopped")
            break
        run = run_child(tree, pending or targets, args, limits,
                        None if pending is None else set(pending))
        output += run.output
        if manifest is None:
            manifest = _first_manifest(run)
        for error in run.cell_errors:
            note = f"{error}: the tests that need what it left undefined fail"
            if note not in notes:
                notes.append(note)
        observed.update(run.results)
        if run.phase == "done":
            break
        before = len(observed)
        _charge_failure(run, manifest, observed, notes)
        pending = [row["nodeid"] for row in manifest
                   if row["nodeid"] not in observed and not row["not_gradable"]]
        if len(observed) == before and pending:  # no progress: do not loop
            notes.append(f"the test process ended without running a test ({_why(run)})")
            break
    return LabRun(manifest or [], observed, notes, output)


def _first_manifest(run: ChildRun) -> list[dict]:
    if run.manifest is None or run.errors or not run.manifest:
        errors = "\n".join(run.errors)
        raise GradingError(f"pytest could not grade: the lab's tests could not be collected ({_why(run)}):\n"
                           f"{errors}\n{run.output[-3000:]}")
    return run.manifest


def _why(run: ChildRun) -> str:
    return run.stopped or f"exit code {run.exit_code}"


def _charge_failure(run: ChildRun, manifest: list[dict], observed: dict[str, Observed],
                    notes: list[str]) -> None:
    """Score 0 for what a child that stopped early was doing, so the next one moves on."""
    if run.stopped.startswith("protocol violation"):
        notes.append(f"grading stopped: {run.stopped}")
        for row in manifest:
            observed.setdefault(row["nodeid"], Observed("failed", f"grading stopped: {run.stopped}"))
        return
    if run.phase == "loading":
        what = ("did not finish within the time limit" if run.stopped == "timeout"
                else f"ended the test process ({_why(run)})")
        notes.append(f"the notebook's cells {what}")
        for row in manifest:
            observed.setdefault(row["nodeid"], Observed("failed", f"the notebook's cells {what}"))
        return
    if run.current is None:
        return
    rows = {row["nodeid"]: row for row in manifest}
    current = rows[run.current]
    if run.stopped == "timeout":
        reason = f"timed out in {current['name']}"
        exercise = current["exercise"]
        for row in manifest:
            same = exercise is not None and row["exercise"] == exercise
            if row["nodeid"] == run.current or (same and row["nodeid"] not in observed):
                observed[row["nodeid"]] = Observed("failed", reason)
        notes.append(f"exercise {exercise or current['name']}: {reason}")
    else:
        observed[run.current] = Observed("failed", f"the test process ended during this test "
                                                   f"({_why(run)})")
