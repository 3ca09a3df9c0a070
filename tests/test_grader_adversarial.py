"""The grader as a security boundary: notebooks that try to score what they did not earn.

Each adversarial notebook is an honest notebook (the toy lab's solution or
stub, or a real lab's student notebook) plus attack cells. The oracle is the
honest notebook's own score, known without grading: every exercise test of a
stub scores 0, every test of a solution scores its points; ``max_score`` is the
manifest's and never moves. The toy lab (tests/test_grading.py) grades in a
few seconds; every real lab gets one notebook with all the top-level attacks
and the reference smuggled in.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell
from test_grading import SOLUTION, lab  # noqa: F401 - the toy lab fixture

from minisys.grading.grader import grade
from minisys.grading.guard import exercise_names
from minisys.grading.notebooks import build_notebook, notebook_bytes, solution_sources
from minisys.grading.runner import Limits
from minisys.grading.source import parse_solution

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_MAX = 8.0  # test_add 2 + test_add_zero 1+1 + test_counter 3 + test_has_exercises 1

ATEXIT = '''\
import atexit, glob, json, os
def _forge():
    line = json.dumps({"body": json.dumps({"kind": "result", "outcome": "passed"}), "mac": "0"})
    for fd in range(3, 64):
        try:
            os.write(fd, (line + "\\n").encode())
        except OSError:
            pass
    for path in glob.glob("/tmp/minisys-grade-*/**/*.json", recursive=True):
        open(path, "w").write(json.dumps({"tests": [], "score": 100}))
atexit.register(_forge)
_hook = atexit.register(_forge)
'''
SKIP = '''\
import pytest
pytest.skip("needs a GPU", allow_module_level=True)
'''
EXIT = '''\
import sys
sys.exit(0)
'''
PATCH_IGNORED = '''\
import _pytest.runner
_pytest.runner.call_and_report = lambda item, when, log=True, **kw: None
'''
PATCH = '''\
import _pytest.runner
_real = _pytest.runner.TestReport
class _Passing(_real):
    @classmethod
    def from_item_and_call(cls, item, call):
        report = _real.from_item_and_call(item, call)
        report.outcome, report.longrepr = "passed", None
        return report
_done = setattr(_pytest.runner, "TestReport", _Passing)
'''


def _notebook(path: Path, source: str, *extra: str) -> Path:
    """The notebook of a solution ``source`` text plus ``extra`` code cells at the end."""
    sol = path.parent / "src" / "lab01_toy_lab.py"
    sol.parent.mkdir(parents=True, exist_ok=True)
    sol.write_text(source)
    notebook = build_notebook(parse_solution(sol), student=False)
    notebook.cells += [new_code_cell(cell) for cell in extra]
    path.write_bytes(notebook_bytes(notebook))
    return path


def _stub(source: str) -> str:
    """The toy solution with both exercises stubbed, as a solution text."""
    return (source.replace("    return a + b\n", "    raise NotImplementedError\n")
            .replace("            self.n += 1\n            return self.n\n",
                     "            raise NotImplementedError\n"))


def _grade(root: Path, notebook: Path, **limits: float):
    report = grade(notebook, root / "tests" / "labs", limits=Limits(**limits) if limits else None)
    assert report.max_score == TOY_MAX and len(report.tests) == 6  # the denominator never moves
    return report


@pytest.mark.parametrize("attack", [ATEXIT, SKIP, EXIT, PATCH_IGNORED],
                         ids=["atexit", "skip", "sys_exit", "patch_by_attribute"])
def test_top_level_attacks_change_nothing(lab: Path, attack: str) -> None:  # noqa: F811
    stub = _grade(lab, _notebook(lab / "graded" / "stub.ipynb", _stub(SOLUTION), attack))
    assert stub.score == 1  # only test_has_exercises, as for the untouched stub
    honest = _grade(lab, _notebook(lab / "graded" / "honest.ipynb", SOLUTION, attack))
    assert honest.score == TOY_MAX


def test_patching_pytest_stops_grading(lab: Path) -> None:  # noqa: F811
    report = _grade(lab, _notebook(lab / "graded" / "patch.ipynb", _stub(SOLUTION), PATCH))
    assert report.score == 0
    assert any("changed pytest or the grader" in flag for flag in report.flags)
    assert any("_pytest" in flag for flag in report.flags)  # the static scan flags it too


def test_skip_inside_an_exercise_scores_zero(lab: Path) -> None:  # noqa: F811
    source = SOLUTION.replace("    return a + b\n",
                              "    import pytest\n    pytest.skip('needs a GPU')\n")
    report = _grade(lab, _notebook(lab / "graded" / "skip.ipynb", source))
    add = [test for test in report.tests if test.exercise == "add"]
    assert all(test.outcome == "skipped" and test.score == 0 for test in add)
    assert report.score == 3 + 1


def test_deselecting_and_rewriting_the_tests_is_caught(lab: Path) -> None:  # noqa: F811
    rewrite = '''\
import os, sys
from pathlib import Path
_evil = "def pytest_collection_modifyitems(items):\\n    items.clear()\\n"
_cwd = Path("conftest.py").write_text(_evil)
_tree = [Path(a).parent.joinpath("tests", "labs", "conftest.py").write_text(_evil)
         for a in sys.argv if a.endswith("pytest.ini")]
_env = os.environ.__setitem__("PYTEST_ADDOPTS", "-k has_exercises")
def pytest_collection_modifyitems(items):
    items.clear()
'''
    source = SOLUTION.replace("    return a + b\n", "    import os\n    os._exit(0)\n")
    report = _grade(lab, _notebook(lab / "graded" / "deselect.ipynb", source, rewrite))
    assert any("changed during grading" in note for note in report.flags)
    assert report.score <= 3 + 1  # at most the honest counter and test_has_exercises


def test_exits_cost_only_the_test_they_happen_in(lab: Path) -> None:  # noqa: F811
    source = SOLUTION.replace("    return a + b\n", "    import os\n    os._exit(3)\n")
    report = _grade(lab, _notebook(lab / "graded" / "exit.ipynb", source))
    assert report.score == 3 + 1
    add = [test for test in report.tests if test.exercise == "add"]
    assert all("ended during this test" in test.reason for test in add)


def test_an_infinite_loop_costs_only_its_exercise(lab: Path) -> None:  # noqa: F811
    source = SOLUTION.replace("    return a + b\n", "    while True:\n        pass\n")
    report = _grade(lab, _notebook(lab / "graded" / "loop.ipynb", source), test=4.0)
    assert report.score == 3 + 1
    add = [test for test in report.tests if test.exercise == "add"]
    assert all(test.score == 0 and "timed out" in test.reason for test in add)


def test_a_hanging_cell_fails_the_notebook_not_the_grader(lab: Path) -> None:  # noqa: F811
    hang = "def _spin():\n    while True:\n        pass\n_value = _spin()\n"
    report = _grade(lab, _notebook(lab / "graded" / "hang.ipynb", SOLUTION, hang), load=4.0)
    assert report.score == 0
    assert all("did not finish" in test.reason for test in report.tests if test.max_score)


# --- every real lab: the student notebook with every attack and the reference smuggled in

LABS = solution_sources(REPO_ROOT)


def _smuggle(test_file: str, names: list[str]) -> str:
    """A cell that binds each exercise to the reference, through the test module itself."""
    lines = ["import importlib.util",
             f"_spec = importlib.util.spec_from_file_location('ref', {test_file!r})",
             "_mod = importlib.util.module_from_spec(_spec)",
             "_loaded = _spec.loader.exec_module(_mod)",
             "_ref = _mod.reference_impl()"]
    for index, name in enumerate(names):  # half bound directly, half through a local lambda
        if index % 2:
            lines.append(f"{name} = lambda *a, **k: getattr(_ref, {name!r})(*a, **k)")
        else:
            lines.append(f"{name} = _ref.{name}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("solution", LABS, ids=[path.stem for path in LABS])
def test_real_lab_attacks_score_what_the_stubs_deserve(solution: Path, tmp_path: Path,
                                                       graded_student_notebook) -> None:
    lab = parse_solution(solution)
    honest = graded_student_notebook(REPO_ROOT / "labs" / lab.notebook_name)
    notebook = nbformat.read(REPO_ROOT / "labs" / lab.notebook_name, as_version=4)
    test_file = f"tests/labs/test_lab{lab.number}.py"
    notebook.cells += [new_code_cell(cell) for cell in
                       (ATEXIT, SKIP, EXIT, _smuggle(test_file, exercise_names(solution)))]
    path = tmp_path / lab.notebook_name
    path.write_bytes(notebook_bytes(notebook))
    report = grade(path)
    assert report.max_score == honest.max_score
    assert [t.name for t in report.tests] == [t.name for t in honest.tests]
    cheated = [t.name for t in report.tests if t.exercise and t.score > 0]
    assert not cheated, f"the smuggled reference scores: {cheated}"
    assert report.score <= honest.score
    assert any("importlib" in flag for flag in report.flags)

