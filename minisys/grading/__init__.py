"""The course pipeline: solution sources -> student notebooks -> grades.

Modules, in the order a lab flows through them:

- ``source``: parse ``solutions/labNN_<slug>.py`` (percent format, exercise markers).
- ``notebooks``: generate ``labs/NN-<slug>.ipynb``; ``labs build`` / ``labs check``.
- ``execute``: run a notebook top to bottom in a Jupyter kernel (nbclient).
- ``namespace``: exec a notebook's non-benchmark code cells into a module.
- ``pytest_plugin``: the ``impl`` fixture and ``--lab-notebook`` for tests/labs.
- ``collector``: the pytest plugin the grader uses to record outcomes and points.
- ``grader``: ``grade NOTEBOOK``: score table and Gradescope ``results.json``.

The names below are imported lazily (on first use), so that running a module
with ``python -m minisys.grading.grader`` does not import it twice.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GradeReport": "grader",
    "GradingError": "grader",
    "grade": "grader",
    "main_grade": "grader",
    "build_labs": "notebooks",
    "check_labs": "notebooks",
    "main_labs": "notebooks",
    "execute_notebook": "execute",
    "NotebookExecutionError": "execute",
    "LabFormatError": "source",
    "LabSource": "source",
    "parse_solution": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
