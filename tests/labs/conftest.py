"""Every tests/labs/test_labNN.py gets the lab-grading plugin from here.

- fixture ``impl``: the implementation under test, parametrized ``reference``
  (the test module's ``reference_impl()``) and ``solution`` (the executed
  ``solutions/labNN_*.py``), or only ``notebook`` under ``--lab-notebook PATH``;
- markers ``points(n)`` and ``exercise(name)`` for the grader, ``hardware(name)``
  for tests that need a GPU (skipped where it is missing; the grader reports
  them "not gradable here").

See minisys/grading/pytest_plugin.py.
"""

from minisys.grading.pytest_plugin import (  # noqa: F401 - pytest finds these by name
    impl,
    lab_namespace_cache,
    pytest_collection_modifyitems,
    pytest_addoption,
    pytest_configure,
    pytest_generate_tests,
)
