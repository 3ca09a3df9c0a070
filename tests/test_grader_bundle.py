"""The Gradescope bundle, run as Gradescope would, and batch grading to CSV.

The bundle of lab 03 is unpacked into ``ROOT/source``; a submission goes in
``ROOT/submission``; ``run_autograder`` runs with ``MINISYS_AUTOGRADER_ROOT=ROOT``
(standing in for ``/autograder``). ``setup.sh`` is not run (it installs from
the registry); it is checked for the pinned CPU torch. ``results.json`` is
checked against Gradescope's documented schema, written out below from
https://gradescope-autograders.readthedocs.io/en/latest/specs/ .
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from minisys.grading.bundle import TORCH_PIN
from minisys.grading.grader import main_grade
from minisys.grading.notebooks import build_notebook, notebook_bytes
from minisys.grading.source import parse_solution

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT = REPO_ROOT / "labs" / "03-paged-kv.ipynb"
VISIBILITY = {"hidden", "after_due_date", "after_published", "visible"}
TOP_LEVEL = {"score": (int, float), "execution_time": (int, float), "output": str,
             "output_format": str, "test_output_format": str, "test_name_format": str,
             "visibility": str, "stdout_visibility": str, "extra_data": dict, "tests": list,
             "leaderboard": list}
PER_TEST = {"score": (int, float), "max_score": (int, float), "status": str, "name": str,
            "name_format": str, "number": str, "output": str, "output_format": str,
            "tags": list, "visibility": str, "extra_data": dict}


def gradescope_schema_errors(data: dict) -> list[str]:
    """Gradescope's results.json rules: known keys, their types, a score somewhere."""
    errors = [f"unknown top-level key {key!r}" for key in data if key not in TOP_LEVEL]
    errors += [f"{key} must be {kind}" for key, kind in TOP_LEVEL.items()
               if key in data and not isinstance(data[key], kind)]
    if "score" not in data and not all("score" in test for test in data.get("tests", [])):
        errors.append("a score is required at the top level or on every test")
    for key in ("visibility", "stdout_visibility"):
        if key in data and data[key] not in VISIBILITY:
            errors.append(f"{key} {data[key]!r} is not one of {sorted(VISIBILITY)}")
    for index, test in enumerate(data.get("tests", [])):
        errors += [f"tests[{index}]: unknown key {key!r}" for key in test if key not in PER_TEST]
        errors += [f"tests[{index}].{key} must be {kind}" for key, kind in PER_TEST.items()
                   if key in test and not isinstance(test[key], kind)]
        if test.get("visibility", "visible") not in VISIBILITY:
            errors.append(f"tests[{index}].visibility {test['visibility']!r}")
        if test.get("status", "passed") not in ("passed", "failed"):
            errors.append(f"tests[{index}].status {test['status']!r}")
    return errors


def test_schema_checker_can_fail() -> None:
    assert gradescope_schema_errors({"score": 1, "tests": []}) == []
    bad = {"score": "1", "tests": [{"name": 1, "visibility": "sometimes", "status": "ok"}],
           "colour": 1}
    assert len(gradescope_schema_errors(bad)) == 5


def _solution_notebook(path: Path) -> Path:
    lab = parse_solution(REPO_ROOT / "solutions" / "lab03_paged_kv.py")
    path.write_bytes(notebook_bytes(build_notebook(lab, student=False)))
    return path


def test_bundle_runs_like_gradescope(tmp_path: Path) -> None:
    archive = tmp_path / "autograder.zip"
    assert main_grade(["--bundle", str(STUDENT), "-o", str(archive)]) == 0
    root = tmp_path / "autograder"
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
        bundle.extractall(root / "source")
    assert {"setup.sh", "run_autograder", "requirements.txt", "tests/labs/test_lab03.py",
            "tests/labs/hidden/test_lab03_hidden.py", "tests/labs/guard-lab03.json"} <= names
    assert not any(name.startswith("solutions/") for name in names)
    assert TORCH_PIN in (root / "source" / "setup.sh").read_text()
    (root / "submission").mkdir()
    _solution_notebook(root / "submission" / "my-lab.ipynb")
    env = {**os.environ, "MINISYS_AUTOGRADER_ROOT": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the bundle's own copy of minisys is the one graded with
    shutil.rmtree(root / "source" / "minisys" / "__pycache__", ignore_errors=True)
    done = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((root / "results" / "results.json").read_text())
    assert gradescope_schema_errors(data) == []
    assert data["score"] == data["extra_data"]["max_score"] == sum(t["max_score"] for t in data["tests"])
    assert data["score"] > 0
    hidden = [test for test in data["tests"] if test["visibility"] == "after_published"]
    assert len(hidden) == 3 and all("hidden" not in t["name"] for t in hidden)
    assert all(test["visibility"] == "visible" for test in data["tests"] if test not in hidden)


def test_batch_grading_writes_one_row_per_submission(tmp_path: Path) -> None:
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    shutil.copy(STUDENT, submissions / "03-alice.ipynb")
    _solution_notebook(submissions / "03-bob.ipynb")
    (submissions / "03-carol.ipynb").write_text("not a notebook")
    grades = tmp_path / "grades.csv"
    paths = [str(path) for path in sorted(submissions.glob("*.ipynb"))]
    assert main_grade([*paths, "--csv", str(grades)]) == 2  # carol's could not be graded
    rows = list(csv.DictReader(grades.open()))
    assert [Path(row["notebook"]).name for row in rows] == ["03-alice.ipynb", "03-bob.ipynb",
                                                           "03-carol.ipynb"]
    alice, bob, carol = rows
    assert alice["score"] == "0" and bob["score"] == bob["max_score"] == alice["max_score"]
    assert carol["error"].startswith("cannot read notebook") and carol["score"] == ""
