"""A fresh clone's documents point only at files the clone has.

Every relative link (``[text](path)``, ``![alt](path)``, ``<img src=...>``)
in README.md, docs/*.md and lessons/*.md must resolve to a file inside the
repository, and its ``#anchor``, for a Markdown target, to one of that file's
headings (GitHub's slugs). Paths written as code that leave the repository
(``../shared/...``) are refused too: a clone has nothing there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"),
                    *(REPO_ROOT / "lessons").glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img[^>]*\bsrc=\"([^\"]+)\"")
OUTSIDE = re.compile(r"`(\.\./[^`\s]+)`")


def links(text: str) -> list[str]:
    text = FENCE.sub("", text)
    return [a or b for a, b in LINK.findall(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(document: Path, text: str | None = None) -> list[str]:
    """What is wrong with ``document``'s links (``text``: its content, if not read from disk)."""
    text = document.read_text(encoding="utf-8") if text is None else text
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.is_relative_to(REPO_ROOT):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    for path in OUTSIDE.findall(FENCE.sub("", text)):
        resolved = (document.parent / path).resolve()
        if not resolved.is_relative_to(REPO_ROOT) or not resolved.exists():
            problems.append(f"`{path}`: not in the repository (a clone does not have it)")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(d.relative_to(REPO_ROOT)) for d in DOCUMENTS])
def test_relative_links_resolve_inside_the_repository(document: Path) -> None:
    assert not broken_links(document), "\n".join(broken_links(document))


def test_the_checker_catches_what_it_is_for() -> None:
    document = REPO_ROOT / "README.md"  # the text is given: what the README had, and more
    text = ("[a](../shared/course-syllabus.md) [b](docs/missing.md) [c](docs/syllabus.md#no-such-heading) "
            "[d](docs/syllabus.md#lesson-map) [e](https://example.org/x) ![g](lessons/01-tokens-to-text.md) "
            "<img src=\"figs/none.png\"> `../shared/DESIGN.md` `docs/anything`\n"
            "```\n[f](inside-a-fence.md)\n```\n")
    problems = broken_links(document, text)
    assert [problem.partition(": ")[0] for problem in problems] == [
        "../shared/course-syllabus.md", "docs/missing.md", "docs/syllabus.md#no-such-heading",
        "figs/none.png", "`../shared/DESIGN.md`"], problems
    assert "outside the repository" in problems[0]


def test_readme_links_the_syllabus_with_the_lesson_map() -> None:
    assert "](docs/syllabus.md)" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    syllabus = (REPO_ROOT / "docs" / "syllabus.md").read_text(encoding="utf-8")
    for number in range(1, 17):
        assert re.search(rf"^\| {number:02d} \|", syllabus, re.M), f"lesson {number:02d} not in the map"
    for lesson in sorted((REPO_ROOT / "lessons").glob("[0-9][0-9]-*.md")):
        assert f"](../lessons/{lesson.name})" in syllabus, f"{lesson.name} exists: the map links it"
