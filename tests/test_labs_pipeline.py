"""CI checks every lab passes: one solution source, notebooks in sync, tests that can fail.

Parametrized over ``solutions/labNN_*.py``, so a new lab is covered as soon as
its solution source exists (with no labs, the parametrized checks collect
nothing). For each lab:

- the solution source is valid Python, and its student notebook's cells compile;
- ``labs/`` holds exactly what ``solutions/`` generates (``make labs`` fixes it);
- grading the solution notebook gives full marks;
- grading the untouched student notebook gives zero on every exercise test;
- the solution notebook runs top to bottom in a Jupyter kernel (slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minisys.grading.execute import execute_notebook
from minisys.grading.grader import grade
from minisys.grading.notebooks import (
    build_notebook,
    check_labs,
    notebook_bytes,
    solution_sources,
)
from minisys.grading.source import parse_solution

REPO_ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = solution_sources(REPO_ROOT)
per_lab = pytest.mark.parametrize("solution", SOLUTIONS, ids=[path.stem for path in SOLUTIONS])


def test_labs_folder_in_sync_with_solutions() -> None:
    problems = check_labs(REPO_ROOT)
    assert not problems, "\n".join(map(str, problems)) + "\nrun: make labs"


@per_lab
def test_solution_source_is_valid_python(solution: Path) -> None:
    compile(solution.read_text(encoding="utf-8"), str(solution), "exec")


@per_lab
def test_student_notebook_matches_its_source(solution: Path) -> None:
    lab = parse_solution(solution)
    notebook = REPO_ROOT / "labs" / lab.notebook_name
    assert notebook.exists(), f"{notebook} missing: run make labs"
    assert notebook.read_bytes() == notebook_bytes(build_notebook(lab)), "stale: run make labs"
    for index, cell in enumerate(build_notebook(lab).cells):
        if cell.cell_type == "code":
            compile(cell.source, f"{notebook.name} cell {index}", "exec")


@per_lab
def test_solution_scores_full_marks(solution: Path, tmp_path: Path) -> None:
    lab = parse_solution(solution)
    notebook = tmp_path / lab.notebook_name
    notebook.write_bytes(notebook_bytes(build_notebook(lab, student=False)))
    report = grade(notebook)
    failed = [f"{t.name}: {t.reason}" for t in report.tests if t.outcome == "failed"]
    assert not failed, "the solution fails:\n" + "\n".join(failed)
    assert report.score == report.max_score > 0


@per_lab
def test_student_notebook_scores_zero_on_exercises(solution: Path, graded_student_notebook) -> None:
    lab = parse_solution(solution)
    report = graded_student_notebook(REPO_ROOT / "labs" / lab.notebook_name)
    exercises = [test for test in report.tests if test.exercise]
    assert exercises, f"lab {lab.number} has no @pytest.mark.exercise tests"
    passing = [test.name for test in exercises if test.score > 0]
    assert not passing, f"these exercise tests pass on the untouched stubs: {passing}"


@pytest.mark.slow
@per_lab
def test_solution_notebook_executes_top_to_bottom(solution: Path) -> None:
    execute_notebook(solution, timeout=600, root=REPO_ROOT)
