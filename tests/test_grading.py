"""Tests of the course pipeline (minisys/grading) on a tiny synthetic lab in tmp_path.

The synthetic lab has the layout of the real repository::

    tmp/solutions/lab01_toy_lab.py    two exercises (add, Counter.step) + a benchmark cell
    tmp/tests/labs/conftest.py        the same wiring as tests/labs/conftest.py
    tmp/tests/labs/test_lab01.py      graded tests with a reference_impl()
    tmp/labs/                         generated here
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from minisys.grading import execute as execute_module
from minisys.grading.grader import GradingError, _display_name, grade, main_grade
from minisys.grading.namespace import load_lab, strip_magics
from minisys.grading.notebooks import (
    build_labs,
    build_notebook,
    check_labs,
    StartError,
    main_labs,
    notebook_bytes,
    start_lab,
)
from minisys.grading.source import (
    STUB_LINE,
    LabFormatError,
    parse_percent,
    parse_solution,
    stub_exercises,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

SOLUTION = '''\
# %% [markdown]
# # Lab 01: Toy lab
#
# Two tiny exercises.

# %%
import os
from dataclasses import dataclass

QUICK = os.environ.get("MINISYS_QUICK")
CWD = os.getcwd()


# %%
def add(a, b):
    """Add two numbers."""
    ### BEGIN SOLUTION
    return a + b
    ### END SOLUTION


@dataclass
class Counter:
    n: int = 0

    def step(self):
        if True:
            ### BEGIN SOLUTION
            self.n += 1
            return self.n
            ### END SOLUTION

# %% [markdown] tags=["note"]
# ## Benchmark

# %% tags=["benchmark"]
BENCHMARKED = add(1, 2)
print("benchmark ran", BENCHMARKED)
'''

LAB_TESTS = '''\
import types

import pytest


def reference_impl():
    class Counter:
        def __init__(self):
            self.n = 0

        def step(self):
            self.n += 1
            return self.n

    return types.SimpleNamespace(add=lambda a, b: a + b, Counter=Counter)


@pytest.mark.points(2)
@pytest.mark.exercise("add")
def test_add(impl):
    assert impl.add(2, 3) == 5


@pytest.mark.exercise("add")
@pytest.mark.parametrize("a", [1, 2])
def test_add_zero(impl, a):
    assert impl.add(a, 0) == a


@pytest.mark.points(3)
@pytest.mark.exercise("counter")
def test_counter(impl):
    counter = impl.Counter()
    assert [counter.step(), counter.step()] == [1, 2]


def test_has_exercises(impl):
    assert callable(impl.add) and callable(impl.Counter)


@pytest.mark.hardware("tpu")
def test_on_gpu(impl):
    raise AssertionError
'''


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A synthetic course repository with one lab; returns its root."""
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "lab01_toy_lab.py").write_text(SOLUTION)
    tests = tmp_path / "tests" / "labs"
    tests.mkdir(parents=True)
    conftest = (REPO_ROOT / "tests" / "labs" / "conftest.py").read_text()
    (tests / "conftest.py").write_text(conftest)
    (tests / "test_lab01.py").write_text(LAB_TESTS)
    return tmp_path


def solution_notebook(root: Path, source: str = SOLUTION) -> Path:
    """Write the solution notebook of ``source`` beside the repo and return its path."""
    path = root / "solutions" / "lab01_toy_lab.py"
    path.write_text(source)
    out = root / "graded" / "01-solution.ipynb"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(notebook_bytes(build_notebook(parse_solution(path), student=False)))
    return out


# --- parsing ---------------------------------------------------------------


def test_parse_cells_kinds_tags_and_lines(lab: Path) -> None:
    source = parse_solution(lab / "solutions" / "lab01_toy_lab.py")
    assert (source.number, source.slug, source.title) == ("01", "toy_lab", "Toy lab")
    assert source.notebook_name == "01-toy-lab.ipynb"
    kinds = [cell.kind for cell in source.cells]
    assert kinds == ["markdown", "code", "code", "markdown", "code"]
    assert source.cells[0].source == "# Lab 01: Toy lab\n\nTwo tiny exercises."
    assert source.cells[3].tags == ("note",) and source.cells[3].source == "## Benchmark"
    assert source.cells[4].is_benchmark and not source.cells[2].is_benchmark
    # a cell's line is where its (trimmed) source starts in the file
    lines = SOLUTION.splitlines()
    for cell in source.cells[1:]:
        if cell.kind == "code":
            assert lines[cell.line - 1] == cell.source.splitlines()[0]


def test_parse_rejects_bad_headers_and_markdown() -> None:
    with pytest.raises(LabFormatError, match=r"x\.py:1: text before"):
        parse_percent("import os\n# %%\n", "x.py")
    with pytest.raises(LabFormatError, match=r"x\.py:2: markdown lines must be comments"):
        parse_percent("# %% [markdown]\nnot a comment\n", "x.py")
    with pytest.raises(LabFormatError, match=r"x\.py:1: cannot read cell header"):
        parse_percent("# %% [raw]\n", "x.py")
    with pytest.raises(LabFormatError, match=r"x\.py:1: tags must be a JSON list"):
        parse_percent("# %% tags=[benchmark]\n", "x.py")


def test_title_must_match_file_number(tmp_path: Path) -> None:
    path = tmp_path / "lab02_wrong.py"
    path.write_text("# %% [markdown]\n# # Lab 03: Wrong\n")
    with pytest.raises(LabFormatError, match=r"lab02_wrong\.py:2: .*'# Lab 02: Title'"):
        parse_solution(path)


# --- stubs -----------------------------------------------------------------


def test_stub_keeps_indentation_and_compiles() -> None:
    code = textwrap.dedent('''\
        def f(x):
            y = x
            ### BEGIN SOLUTION
            y = y + 1
            return y
            ### END SOLUTION

        class C:
            def g(self):
                for i in range(2):
                      ### BEGIN SOLUTION
                      pass
                      ### END SOLUTION
                return 0''')
    stubbed = stub_exercises(code)
    assert stubbed.splitlines()[2] == "    " + STUB_LINE
    assert " " * 14 + STUB_LINE in stubbed.splitlines()
    assert "SOLUTION" not in stubbed and "y + 1" not in stubbed
    namespace: dict = {}
    exec(compile(stubbed, "<stub>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="exercise: fill in this part"):
        namespace["f"](1)


@pytest.mark.parametrize(
    ("code", "line", "message"),
    [
        ("x = 1\n### BEGIN SOLUTION\nx = 2\n", 12, "without END"),
        ("x = 1\n    ### END SOLUTION\n", 12, "without BEGIN"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", 12, "nested"),
    ],
)
def test_unmatched_markers_name_file_and_line(code: str, line: int, message: str) -> None:
    with pytest.raises(LabFormatError, match=rf"sol\.py:{line}: .*{message}") as error:
        stub_exercises(code, "sol.py", first_line=11)
    assert error.value.line == line


def test_region_may_not_span_cells(tmp_path: Path) -> None:
    path = tmp_path / "lab01_span.py"
    path.write_text("# %% [markdown]\n# # Lab 01: Span\n# %%\n### BEGIN SOLUTION\n# %%\n"
                    "### END SOLUTION\n")
    with pytest.raises(LabFormatError, match=r"lab01_span\.py:4: .*without END"):
        parse_solution(path)


# --- notebooks and labs/ ---------------------------------------------------


def test_build_is_deterministic_and_well_formed(lab: Path) -> None:
    changes = build_labs(lab)
    assert len(changes) == 1 and changes[0].startswith("wrote ") and "01-toy-lab" in changes[0]
    path = lab / "labs" / "01-toy-lab.ipynb"
    first = path.read_bytes()
    assert build_labs(lab) == [] and path.read_bytes() == first
    assert check_labs(lab) == []
    notebook = nbformat.reads(first.decode(), as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["minisys"] == {"lab": "01", "source": "solutions/lab01_toy_lab.py"}
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert [cell.id for cell in notebook.cells] == [f"cell-{i:03d}" for i in range(5)]
    assert notebook.cells[4].metadata == {"tags": ["benchmark"]}
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert code[1].source.count(STUB_LINE) == 2 and "SOLUTION" not in code[1].source
    assert first == json.dumps(json.loads(first), sort_keys=True, indent=1,
                               ensure_ascii=False).encode() + b"\n"


def test_solution_source_is_valid_python(lab: Path) -> None:
    path = lab / "solutions" / "lab01_toy_lab.py"
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True)
    assert "benchmark ran 3" in done.stdout


def test_check_detects_missing_stale_and_orphan(lab: Path, capsys) -> None:
    assert [p.kind for p in check_labs(lab)] == ["missing"]
    build_labs(lab)
    source = lab / "solutions" / "lab01_toy_lab.py"
    source.write_text(SOLUTION.replace("Two tiny exercises.", "Two small exercises."))
    (lab / "labs" / "07-gone.ipynb").write_text("{}")
    assert [p.kind for p in check_labs(lab)] == ["stale", "orphan"]
    assert main_labs(["check", "--root", str(lab)]) == 1
    out = capsys.readouterr().out
    assert "01-toy-lab.ipynb: stale" in out and "07-gone.ipynb: orphan" in out
    assert main_labs(["build", "--root", str(lab)]) == 0
    assert main_labs(["check", "--root", str(lab)]) == 0
    assert not (lab / "labs" / "07-gone.ipynb").exists()


def test_labs_cli_reports_format_errors(lab: Path, capsys) -> None:
    source = lab / "solutions" / "lab01_toy_lab.py"
    source.write_text(SOLUTION.replace("    ### END SOLUTION\n\n\n@dataclass", "\n\n@dataclass"))
    assert main_labs(["build", "--root", str(lab)]) == 1
    assert "lab01_toy_lab.py:27: nested '### BEGIN SOLUTION'" in capsys.readouterr().err


# --- the namespace the tests grade -----------------------------------------


def test_load_lab_skips_benchmarks_and_sets_quick_env_and_cwd(lab: Path) -> None:
    notebook = solution_notebook(lab)
    loaded = load_lab(notebook, lab, module_name="lab_test_namespace")
    assert loaded.error is None
    ns = loaded.namespace
    assert ns.add(1, 2) == 3 and ns.Counter().step() == 1
    assert ns.QUICK == "1" and ns.CWD == str(lab)
    assert not hasattr(ns, "BENCHMARKED")
    assert sys.modules["lab_test_namespace"] is ns and ns.Counter.__module__ == ns.__name__


def test_magics_are_blanked() -> None:
    assert strip_magics("%matplotlib inline\n!pip list\nx = 1") == "\n\nx = 1"


def test_broken_cell_is_recorded_not_raised(lab: Path) -> None:
    broken = SOLUTION.replace("CWD = os.getcwd()", "CWD = 1 / 0")
    loaded = load_lab(solution_notebook(lab, broken), lab, module_name="lab_test_broken")
    assert loaded.error is not None and loaded.error.cell.index == 1
    message = loaded.error.message(loaded.origin)
    assert "cell 1 (id cell-001)" in message and "ZeroDivisionError" in message
    assert "CWD = 1 / 0" in message  # the traceback quotes the student's line


def test_keep_going_runs_later_cells_and_names_the_failed_one(lab: Path) -> None:
    broken = SOLUTION.replace("CWD = os.getcwd()", "CWD = 1 / 0")
    loaded = load_lab(solution_notebook(lab, broken), lab, module_name="lab_test_keep_going",
                      keep_going=True)
    assert [error.cell.index for error in loaded.errors] == [1] and loaded.error is loaded.errors[0]
    ns = loaded.namespace
    assert ns.QUICK == "1" and ns.add(1, 2) == 3      # before the error, and in later cells
    assert getattr(ns, "CWD", None) is None and not hasattr(ns, "__wrapped__")
    with pytest.raises(AttributeError, match=r"'CWD' is not defined.*cell 1 \(id cell-001\).*"
                                             r"ZeroDivisionError"):
        ns.CWD


# --- grading -----------------------------------------------------------------


def test_lab_tests_run_against_reference_and_solution(lab: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/labs", "-q", "-p", "no:cacheprovider"],
        cwd=lab, capture_output=True, text=True, env=_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 passed, 2 skipped" in done.stdout


def test_grade_solution_gives_full_marks(lab: Path) -> None:
    report = grade(solution_notebook(lab), lab / "tests" / "labs")
    assert report.lab == "01"
    assert report.score == report.max_score == 2 + 1 + 1 + 3 + 1
    names = [test.name for test in report.tests]
    assert names == ["test_add", "test_add_zero[1]", "test_add_zero[2]", "test_counter",
                     "test_has_exercises", "test_on_gpu"]
    gpu = report.tests[-1]
    assert (gpu.outcome, gpu.max_score, gpu.reason) == ("not gradable here", 0, "needs tpu")
    assert report.not_gradable == [gpu]


def test_labs_start_copies_to_work_and_never_overwrites(lab: Path, capsys) -> None:
    build_labs(lab)
    copy = start_lab("1", lab)
    assert copy == lab / "work" / "01-toy-lab.ipynb"
    assert copy.read_bytes() == (lab / "labs" / "01-toy-lab.ipynb").read_bytes()
    copy.write_text(copy.read_text().replace("NotImplementedError", "NotImplementedError  # mine"))
    mine = copy.read_bytes()
    with pytest.raises(StartError, match="exists"):
        start_lab("01", lab)
    assert main_labs(["start", "01", "--root", str(lab)]) == 1
    assert copy.read_bytes() == mine and "--force" in capsys.readouterr().err
    assert check_labs(lab) == []                         # the student's work is not in labs/
    assert main_labs(["start", "01", "--root", str(lab), "--force"]) == 0
    assert copy.read_bytes() == (lab / "labs" / "01-toy-lab.ipynb").read_bytes()
    assert "grade it: python -m minisys grade" in capsys.readouterr().out
    with pytest.raises(StartError, match="no lab 07"):
        start_lab("7", lab)
    with pytest.raises(StartError, match="a number"):
        start_lab("../01", lab)


def test_gitignore_keeps_work_copies_out_of_git() -> None:
    assert "/work/" in (REPO_ROOT / ".gitignore").read_text().splitlines()


def test_grade_student_notebook_gives_zero_on_exercises(lab: Path) -> None:
    build_labs(lab)
    # graded where students work on it: a copy outside labs/ (python -m minisys labs start 01)
    report = grade(start_lab("01", lab, dest=lab / "elsewhere"), lab / "tests" / "labs")
    exercises = [test for test in report.tests if test.exercise]
    assert exercises and all(test.score == 0 for test in exercises)
    assert all("NotImplementedError" in test.reason for test in exercises)
    assert report.score == 1 and report.max_score == 8  # only test_has_exercises passes


def test_results_json_and_table(lab: Path, tmp_path: Path, capsys) -> None:
    build_labs(lab)
    results = tmp_path / "results.json"
    argv = [str(lab / "labs" / "01-toy-lab.ipynb"), "--results", str(results),
            "--tests", str(lab / "tests" / "labs")]
    assert main_grade(argv) == 0
    data = json.loads(results.read_text())
    assert set(data) == {"score", "extra_data", "tests", "output", "visibility",
                         "stdout_visibility"}
    assert (data["score"], data["extra_data"]["max_score"]) == (1.0, 8.0)
    assert "not gradable here: test_on_gpu" in data["output"]
    for test in data["tests"]:
        assert set(test) == {"name", "score", "max_score", "status", "output", "visibility"}
        assert test["visibility"] == "visible" and isinstance(test["score"], float)
    assert data["tests"][0]["name"] == "test_add (add)"
    assert "NotImplementedError" in data["tests"][0]["output"]
    out = capsys.readouterr().out
    assert "test_counter" in out and "score: 1 / 8" in out


LATE_CELLS = '''
# %%
def late_helper():
    return add(0, 1)


LATE = add(1, "x")

# %%
def typo(:
    return 2
'''

LATE_TESTS = '''
import pytest


@pytest.mark.exercise("late")
def test_cwd(impl):
    assert impl.CWD


@pytest.mark.exercise("late")
def test_late_helper(impl):
    assert impl.late_helper() == 1


@pytest.mark.points(4)
@pytest.mark.exercise("late")
def test_late_value(impl):
    assert impl.LATE == 3


@pytest.mark.exercise("typo")
def test_typo(impl):
    assert impl.typo() == 2
'''


def test_raising_cells_cost_only_the_tests_that_need_what_they_left_undefined(lab: Path) -> None:
    """An early cell and two late cells raise (one a SyntaxError): every other test keeps its points."""
    source = SOLUTION.replace("CWD = os.getcwd()", "CWD = 1 / 0") + LATE_CELLS
    notebook = solution_notebook(lab, source).rename(lab / "01-solution.ipynb")
    solution_notebook(lab)  # the solution source itself stays valid (the guard reads it)
    (lab / "tests" / "labs" / "test_lab01_late.py").write_text(LATE_TESTS)
    report = grade(notebook, lab / "tests" / "labs")
    outcome = {test.name: test for test in report.tests}
    for name in ["test_add", "test_add_zero[1]", "test_add_zero[2]", "test_counter",
                 "test_has_exercises", "test_late_helper"]:
        assert outcome[name].outcome == "passed", (name, outcome[name].reason)
    assert report.score == 2 + 1 + 1 + 3 + 1 + 1 and report.max_score == report.score + 1 + 4 + 1
    for name, missing, cell, error in [("test_cwd", "CWD", 1, "ZeroDivisionError: division by zero"),
                                       ("test_late_value", "LATE", 5, "TypeError"),
                                       ("test_typo", "typo", 6, "SyntaxError")]:
        test = outcome[name]
        assert test.outcome == "failed"  # the cell that would have defined the name is the one named
        assert test.reason.startswith(f"AttributeError: {missing!r} is not defined: cell {cell} "
                                      f"(id cell-00{cell}) of notebook 01-solution.ipynb raised {error}"), \
            test.reason
    assert "CWD = 1 / 0" in outcome["test_cwd"].output  # the traceback quotes the student's line
    assert [flag.partition(" raised ")[0] for flag in report.flags] == [
        "cell 1 (id cell-001)", "cell 5 (id cell-005)", "cell 6 (id cell-006)"]


def test_grading_errors_are_exit_code_2(lab: Path, tmp_path: Path) -> None:
    assert main_grade([str(tmp_path / "missing.ipynb")]) == 2
    build_labs(lab)
    (lab / "tests" / "labs" / "test_lab01.py").unlink()
    with pytest.raises(GradingError, match="no tests for lab 01"):
        grade(lab / "labs" / "01-toy-lab.ipynb", lab / "tests" / "labs")
    (lab / "tests" / "labs" / "test_lab01.py").write_text("import does_not_exist\n")
    with pytest.raises(GradingError, match="could not grade"):
        grade(lab / "labs" / "01-toy-lab.ipynb", lab / "tests" / "labs")


def test_display_name_drops_notebook_param() -> None:
    assert _display_name("test_x[notebook]") == "test_x"
    assert _display_name("test_x[notebook-4]") == "test_x[4]"
    assert _display_name("test_x[4-notebook]") == "test_x[4]"
    assert _display_name("test_x") == "test_x"


# --- executing notebooks in a kernel ---------------------------------------


def test_kernel_runs_this_python() -> None:
    assert execute_module._runs_this_python(["python", "-m", "ipykernel_launcher"])
    assert execute_module._runs_this_python([sys.executable, "-m", "ipykernel_launcher"])
    assert not execute_module._runs_this_python(["/usr/bin/python2.7", "-m", "ipykernel"])


def test_execute_notebook_runs_everything(lab: Path) -> None:
    executed = execute_module.execute_notebook(lab / "solutions" / "lab01_toy_lab.py", root=lab)
    bench = executed.cells[4].outputs
    assert bench and "benchmark ran 3" in bench[0]["text"]


def test_execute_notebook_names_failing_cell(lab: Path) -> None:
    notebook = solution_notebook(lab, SOLUTION.replace("CWD = os.getcwd()", "CWD = 1 / 0"))
    with pytest.raises(execute_module.NotebookExecutionError) as error:
        execute_module.execute_notebook(notebook, root=lab)
    message = str(error.value)
    assert "cell 1 (id cell-001)" in message and "CWD = 1 / 0" in message
    assert "ZeroDivisionError" in message and "\x1b[" not in message


def _env() -> dict[str, str]:
    """The environment with this repository importable (as the grader sets it)."""
    import os

    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
