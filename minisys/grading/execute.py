"""Execute a notebook top to bottom in a real Jupyter kernel (benchmark cells too).

This is what a student does with "Run All", and what CI does with every
solution notebook: nbclient starts a ``python3`` kernel running *this*
interpreter (so it sees the same packages), in the repository root, with
``MINISYS_QUICK=1`` so benchmarks use their quick sizes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

from minisys.grading.namespace import QUICK_ENV
from minisys.grading.notebooks import REPO_ROOT, build_notebook
from minisys.grading.source import parse_solution

KERNEL_NAME = "python3"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # kernel tracebacks come colored


class NotebookExecutionError(RuntimeError):
    """A cell raised: the message has the cell's index, source and traceback."""


def execute_notebook(
    notebook: str | Path, timeout: int = 600, root: str | Path = REPO_ROOT
) -> nbformat.NotebookNode:
    """Run every cell of ``notebook`` and return the executed notebook.

    ``notebook`` is an ``.ipynb`` file or a solution source ``.py`` (its
    solution notebook is built in memory). ``timeout`` is per cell, in seconds.
    """
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = Path(notebook)
    if notebook.suffix == ".py":
        nb = build_notebook(parse_solution(notebook), student=False)
    else:
        nb = nbformat.read(notebook, as_version=4)
    env = {**os.environ, **QUICK_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="minisys-kernels-") as scratch:
        manager = AsyncKernelManager(
            kernel_name=KERNEL_NAME, kernel_spec_manager=_kernel_specs(Path(scratch))
        )
        client = NotebookClient(nb, km=manager, timeout=timeout,
                                resources={"metadata": {"path": str(root)}})
        try:
            return client.execute(cleanup_kc=True, env=env)
        except CellExecutionError as error:
            raise NotebookExecutionError(_describe_failure(nb, notebook, error)) from None


def _kernel_specs(scratch: Path):  # -> KernelSpecManager
    """Kernel specs in which ``python3`` runs ``sys.executable``.

    The installed ``python3`` spec (or ipykernel's built-in one) normally says
    ``python``, which jupyter_client replaces with ``sys.executable``. If the
    spec found points at another interpreter, write a temporary one instead.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    specs = KernelSpecManager()
    try:
        if _runs_this_python(specs.get_kernel_spec(KERNEL_NAME).argv):
            return specs
    except NoSuchKernel:
        pass
    spec_dir = scratch / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return KernelSpecManager(kernel_dirs=[str(scratch / "kernels")], ensure_native_kernel=False)


def _runs_this_python(argv: list[str]) -> bool:
    """Whether a kernel command line starts this interpreter."""
    major, minor = sys.version_info[:2]
    if not argv or argv[0] in ("python", f"python{major}", f"python{major}.{minor}"):
        return bool(argv)  # jupyter_client substitutes sys.executable for these
    return Path(argv[0]).absolute() == Path(sys.executable).absolute()


def _describe_failure(nb: nbformat.NotebookNode, notebook: Path, error: Exception) -> str:
    """Name the failing cell (the first with an error output) and quote its source."""
    for index, cell in enumerate(nb.cells):
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return (f"{notebook}: cell {index} (id {cell.get('id', '?')}) failed.\n"
                    f"--- source ---\n{cell.source}\n--- error ---\n{_plain(error)}")
    return f"{notebook}: execution failed.\n{_plain(error)}"


def _plain(error: Exception) -> str:
    return ANSI_ESCAPE.sub("", str(error))
