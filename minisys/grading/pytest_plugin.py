"""The pytest side of a lab: the ``impl`` fixture and the ``--lab-notebook`` option.

``tests/labs/conftest.py`` imports the names below, so every
``tests/labs/test_labNN.py`` gets them for free. A lab test asks for ``impl``
and calls the exercise functions on it::

    @pytest.mark.points(2)
    @pytest.mark.exercise("softmax")
    def test_softmax_rows_sum_to_one(impl):
        assert torch.allclose(impl.softmax(x).sum(-1), torch.ones(3))

``impl`` is parametrized:

- ``reference``: ``reference_impl()`` of the test module (built from minisys);
- ``solution``: the namespace from executing ``solutions/labNN_*.py``;
- ``notebook``: only this one, when ``--lab-notebook PATH`` is given (the grader).

Executed namespaces are cached for the session. When a cell of the reference
or the solution raises, every test that uses ``impl`` fails with a message
naming the cell. A graded notebook's cells all run even when one raises: a
test fails only if it needs a name that was left undefined (the message names
the cell), and the grader lists the cells that raised.

Under the grader (a test child, see ``runner``) two more options apply:
``--lab-root DIR`` is the working directory the notebook's cells run in, and
``--lab-guard FILE`` lists the names the notebook may not use
(:mod:`minisys.grading.guard`): they are guarded before its cells run and the
namespace is sealed after. The grading channel is told when the cells start
and end, so that the grader can time the notebook apart from the tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minisys.grading import guard
from minisys.grading.collector import PLUGIN_NAME, missing_hardware
from minisys.grading.namespace import LoadedLab, load_lab

__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_generate_tests",
    "pytest_collection_modifyitems",
    "lab_namespace_cache",
    "impl",
]

NOTEBOOK_OPTION = "--lab-notebook"
TEST_FILE = re.compile(r"^test_lab(?P<number>\d\d)")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        NOTEBOOK_OPTION,
        default=None,
        metavar="PATH",
        help="grade this notebook: `impl` is only the namespace of its code cells",
    )
    parser.addoption("--lab-root", default=None, metavar="DIR",
                     help="working directory for the notebook's cells (default: the repository)")
    parser.addoption("--lab-guard", default=None, metavar="FILE",
                     help="JSON {lab, forbidden, exercises}: what the notebook may not use or import")


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so that labs outside this repo work.
    config.addinivalue_line("markers", "points(n): points a lab test is worth in the grader")
    config.addinivalue_line("markers", "exercise(name): the lab exercise a test grades")
    config.addinivalue_line("markers", "hardware(name): the test needs this hardware (cuda)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``@pytest.mark.hardware("cuda")`` tests skip where it is missing (the grader: not gradable)."""
    for item in items:
        reason = missing_hardware(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"not gradable here: {reason}"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``impl``: reference + solution, or only the graded notebook."""
    if "impl" not in metafunc.fixturenames:
        return
    notebook = metafunc.config.getoption("lab_notebook", default=None)
    kinds = ["notebook"] if notebook else ["reference", "solution"]
    metafunc.parametrize("impl", kinds, indirect=True, ids=kinds)


@pytest.fixture(scope="session")
def lab_namespace_cache() -> dict[tuple[str, str], object]:
    """Namespaces already built in this session: executing a notebook takes seconds."""
    return {}


@pytest.fixture
def impl(request: pytest.FixtureRequest, lab_namespace_cache: dict) -> object:
    """The implementation under test: a namespace whose attributes are the exercises."""
    kind = request.param
    test_file = Path(request.path)
    if kind == "reference":
        key = ("reference", str(test_file))
        if key not in lab_namespace_cache:
            lab_namespace_cache[key] = _reference(request.module)
        return lab_namespace_cache[key]
    if kind == "solution":
        path = find_solution_source(test_file)
        module_name = f"lab{lab_number(test_file)}_solution"
    else:
        path = Path(request.config.getoption("lab_notebook")).resolve()
        module_name = "lab_notebook"
    key = (kind, str(path))
    if key not in lab_namespace_cache:
        if kind == "notebook":
            lab_namespace_cache[key] = _load_graded_notebook(request.config, path, test_file)
        else:
            lab_namespace_cache[key] = load_lab(path, find_lab_root(test_file), module_name)
    loaded: LoadedLab = lab_namespace_cache[key]  # type: ignore[assignment]
    if loaded.error is not None and kind != "notebook":
        pytest.fail(loaded.error.message(loaded.origin), pytrace=False)
    return loaded.namespace


def _load_graded_notebook(config: pytest.Config, path: Path, test_file: Path) -> LoadedLab:
    """Run the notebook's cells with the lab's guard on; tell the grader when."""
    channel = config.pluginmanager.get_plugin(PLUGIN_NAME)
    guard_file = config.getoption("lab_guard", default=None)
    root = config.getoption("lab_root", default=None) or find_lab_root(test_file)
    lab = lab_number(test_file)
    spec = {"forbidden": [], "exercises": []}
    if guard_file:
        spec = json.loads(Path(guard_file).read_text(encoding="utf-8"))
    known = guard.install(spec["forbidden"], lab)
    if channel is not None:
        channel.send({"kind": "loading"})
    loaded = load_lab(path, root, "lab_notebook", definitions_only=True, keep_going=True)
    if channel is not None:
        channel.check_integrity()
        channel.send({"kind": "loaded", "cell_errors": [
            f"{error.cell.describe()} raised {error.error}" for error in loaded.errors]})
    guard.seal_namespace(loaded.namespace, known, lab, spec["exercises"])
    return loaded


def _reference(module: object) -> object:
    factory = getattr(module, "reference_impl", None)
    if factory is None:
        pytest.fail(f"{module.__name__} must define reference_impl() -> namespace", pytrace=False)
    return factory()


def lab_number(test_file: Path) -> str:
    """``tests/labs/test_lab03_extra.py`` -> ``"03"``."""
    match = TEST_FILE.match(test_file.name)
    if match is None:
        pytest.fail(f"{test_file}: lab tests are named test_labNN*.py", pytrace=False)
    return match["number"]


def find_lab_root(test_file: Path) -> Path:
    """The nearest directory above ``test_file`` that has a ``solutions/`` folder."""
    for parent in test_file.resolve().parents:
        if (parent / "solutions").is_dir():
            return parent
    pytest.fail(f"no solutions/ folder above {test_file}", pytrace=False)


def find_solution_source(test_file: Path) -> Path:
    """``solutions/labNN_*.py`` for the lab ``test_file`` tests (exactly one)."""
    number = lab_number(test_file)
    matches = sorted((find_lab_root(test_file) / "solutions").glob(f"lab{number}_*.py"))
    if len(matches) != 1:
        pytest.fail(f"expected one solutions/lab{number}_*.py, found {len(matches)}", pytrace=False)
    return matches[0]
