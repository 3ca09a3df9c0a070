"""A converted model directory that is checked before it is served.

Converting the GGUF writes a Hugging Face directory into the cache; a later
start loads it directly. So that a damaged cache (a truncated file, flipped
bytes, an edited ``config.json``) is never served as garbage, the converter
writes ``MANIFEST.json`` last: the size and sha256 of every file it wrote.
`verify` recomputes them; `ensure_converted` rebuilds a directory that is
missing, incomplete or fails its check, and refuses to return one that still
fails.

Invariant: a directory returned by `ensure_converted` matched its manifest
byte for byte at that moment.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

MANIFEST = "MANIFEST.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, source: str) -> None:
    """Record size and sha256 of every file in ``directory`` (written last: it marks the build complete)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1) + "\n")


def verify(directory: Path) -> list[str]:
    """What is wrong with ``directory`` against its manifest ([] when every file matches)."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return [f"{manifest} is missing (the conversion never finished, or an older minisys wrote this cache)"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{manifest} is unreadable ({e})"]
    problems = []
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the conversion wrote {want['size']}")
        elif sha256_of(path) != want["sha256"]:
            problems.append(f"{path} does not match the sha256 recorded at conversion")
    return problems


def ensure_converted(out: Path, convert: Callable[[Path], None], source: str,
                     rebuild: bool = False) -> Path:
    """``out``, verified; (re)built with ``convert(tmp_dir)`` if missing, failing its check, or ``rebuild``.

    A damaged cache is reported on stderr (which file, what is wrong; always:
    it is a warning, not progress) and rebuilt from ``source``; if the rebuilt
    directory still fails its check, RuntimeError names the file and the fix.
    """
    if not rebuild:
        problems = verify(out)
        if not problems:
            return out
        if out.exists():
            print(f"minisys: the model cache failed its check: {problems[0]}; rebuilding it from {source} "
                  f"(by hand: --rebuild-cache, or delete {out})", file=sys.stderr)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert(tmp)
    write_manifest(tmp, source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    problems = verify(out)
    if problems:
        raise RuntimeError(f"the rebuilt model cache fails its check: {problems[0]}. Delete {out} and retry, "
                           "or run with --rebuild-cache")
    return out
