"""A Gradescope autograder for one lab: ``python -m minisys grade --bundle NB -o autograder.zip``.

The zip holds, at its top level (Gradescope unpacks it into ``/autograder/source``):

- ``setup.sh``: installs the pinned CPU torch, then ``requirements.txt`` and
  this package from the registry (``pip``);
- ``run_autograder``: grades the first ``.ipynb`` of ``/autograder/submission``
  and writes ``/autograder/results/results.json``;
- ``minisys/``, ``pyproject.toml``, ``requirements.txt``: the package;
- ``tests/conftest.py``, ``tests/labs/conftest.py``, ``tests/labs/test_labNN*.py``
  and ``tests/labs/hidden/test_labNN*.py`` (reported ``after_published``);
- ``tests/labs/guard-labNN.json``: the lab's guard, computed here, so that no
  solution ships in the bundle.

``MINISYS_AUTOGRADER_ROOT`` relocates ``/autograder`` (to try the bundle in a
plain directory: ``ROOT/source``, ``ROOT/submission``, ``ROOT/results``).
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

from rich.console import Console

from minisys.grading import guard
from minisys.grading.grader import (
    REPO_ROOT,
    GradeReport,
    GradingError,
    grade,
    lab_of_notebook,
    lab_test_files,
    write_results,
)

TORCH_PIN = "torch==2.13.0"
SETUP_SH = f"""#!/usr/bin/env bash
# Gradescope runs this once when it builds the autograder image.
set -euo pipefail
cd "${{MINISYS_AUTOGRADER_ROOT:-/autograder}}/source"
python3 -m pip install --upgrade pip
python3 -m pip install "{TORCH_PIN}" --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install -r requirements.txt
python3 -m pip install --no-deps .
"""
RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission.
set -uo pipefail
ROOT="${MINISYS_AUTOGRADER_ROOT:-/autograder}"
cd "$ROOT/source"
exec python3 -m minisys.grading.bundle run
"""


def bundle_files(lab: str, tests_dir: Path) -> dict[str, bytes]:
    """Archive name -> content, for lab ``lab``."""
    files: dict[str, bytes] = {"setup.sh": SETUP_SH.encode(),
                               "run_autograder": RUN_AUTOGRADER.encode()}
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        files[name] = (REPO_ROOT / name).read_bytes()
    package = REPO_ROOT / "minisys"
    for path in sorted(package.rglob("*.py")):
        files[str(path.relative_to(REPO_ROOT))] = path.read_bytes()
    shared = tests_dir.parent / "conftest.py"
    if shared.is_file():
        files["tests/conftest.py"] = shared.read_bytes()
    files["tests/labs/conftest.py"] = (tests_dir / "conftest.py").read_bytes()
    for path in lab_test_files(tests_dir, lab):
        files[str(Path("tests/labs") / path.relative_to(tests_dir))] = path.read_bytes()
    solutions = sorted((tests_dir.parents[1] / "solutions").glob(f"lab{lab}_*.py"))
    if len(solutions) != 1:
        raise GradingError(f"expected one solutions/lab{lab}_*.py to derive the guard")
    spec = guard.lab_spec(lab, tests_dir / f"test_lab{lab}.py", solutions[0])
    files[f"tests/labs/guard-lab{lab}.json"] = json.dumps(spec, indent=1).encode()
    return files


def write_bundle(notebook: Path, output: Path, tests_dir: Path | None = None) -> list[str]:
    """Write the autograder zip for ``notebook``'s lab; return the archive's names."""
    lab = lab_of_notebook(notebook)
    files = bundle_files(lab, Path(tests_dir or REPO_ROOT / "tests" / "labs").resolve())
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name in ("setup.sh", "run_autograder") else 0o644) << 16
            archive.writestr(info, content)
    return sorted(files)


def main_bundle(notebooks: list[Path], output: Path, tests_dir: Path | None,
                console: Console) -> int:
    if len(notebooks) != 1:
        console.print("--bundle takes one notebook (it names the lab)")
        return 2
    try:
        names = write_bundle(notebooks[0], output, tests_dir)
    except GradingError as error:
        console.print(f"bundle failed: {error}")
        return 2
    console.print(f"wrote {output} ({len(names)} files)")
    return 0


def run(root: Path) -> int:
    """What ``run_autograder`` does: grade the submission, always write results.json."""
    results = root / "results" / "results.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    submissions = sorted((root / "submission").rglob("*.ipynb"))
    if not submissions:
        return _fail(results, "no .ipynb notebook in the submission")
    try:
        report: GradeReport = grade(submissions[0], root / "source" / "tests" / "labs")
    except GradingError as error:
        return _fail(results, f"grading failed: {error}")
    write_results(report, results)
    print(f"score: {report.score:g} / {report.max_score:g}")
    return 0


def _fail(results: Path, message: str) -> int:
    results.write_text(json.dumps({"score": 0.0, "output": message, "tests": []}, indent=2) + "\n",
                       encoding="utf-8")
    print(message)
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["run"]:
    sys.exit(run(Path(os.environ.get("MINISYS_AUTOGRADER_ROOT", "/autograder"))))
