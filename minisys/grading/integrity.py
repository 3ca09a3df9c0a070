"""Did the code under test patch pytest or the grader? A snapshot to compare against.

The test child takes a :class:`Snapshot` at configure time, before any
student code exists in the process, of what decides and reports outcomes:
every attribute of the loaded ``pytest``, ``_pytest.*``, ``pluggy.*`` and
``minisys.grading.*`` modules (and the code object of each function and
method there), a few process-level functions (``os.write``, ``os._exit``,
``sys.exit``) and the registered pytest hook implementations. The plugin
compares after the notebook's cells ran and after every test; a difference
("the notebook changed _pytest.runner.call_and_report") stops grading and the
grader scores the rest 0.

Attributes added later (lazily imported submodules) are not differences; a
replaced or deleted one is. Like everything inside the child this is a
tripwire, not a wall: code that targets this module by name can disarm it,
and the grader's static scan flags such code for review.
"""

from __future__ import annotations

import os
import sys

import pytest

WATCHED = ("pytest", "_pytest", "pluggy", "minisys.grading")
# set and reset by pytest itself around every test (assertion rewriting's hooks)
VOLATILE = {"_pytest.assertion.util._reprcompare", "_pytest.assertion.util._config",
            "_pytest.assertion.util._assertion_pass"}


def _watched(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in WATCHED)


def _identity(value: object) -> tuple[int, int]:
    """The object, and its code object if it has one (``__code__`` is writable)."""
    return id(value), id(getattr(value, "__code__", None))


def _state(config: pytest.Config) -> dict[str, tuple[int, int]]:
    state: dict[str, tuple[int, int]] = {}
    for module_name, module in list(sys.modules.items()):
        if not _watched(module_name) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            state[f"{module_name}.{attr}"] = _identity(value)
            if isinstance(value, type) and _watched(getattr(value, "__module__", "") or ""):
                for member, inner in list(vars(value).items()):
                    state[f"{module_name}.{attr}.{member}"] = _identity(inner)
    for name, value in (("os.write", os.write), ("os._exit", os._exit), ("sys.exit", sys.exit)):
        state[name] = _identity(value)
    hooks = config.pluginmanager.hook
    for hook_name in sorted(vars(hooks)):
        caller = getattr(hooks, hook_name)
        impls = caller.get_hookimpls() if hasattr(caller, "get_hookimpls") else []
        state[f"hook {hook_name}"] = (len(impls), hash(tuple(id(i.function) for i in impls)))
    return state


class Snapshot:
    """What the watched objects were when the snapshot was taken."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._state = _state(config)

    def changes(self) -> list[str]:
        """Names of watched objects replaced or removed since (hooks: changed)."""
        now = _state(self._config)
        return [name for name, value in self._state.items()
                if now.get(name) != value and name not in VOLATILE]
