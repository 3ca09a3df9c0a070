"""The document collection RAG retrieves from: the course's own text, split into passages.

    course_sources(root) -> [lessons/*.md, docs/syllabus.md, README.md]   (sorted, relative paths)
    split_markdown(text, source, max_words) -> [Passage]                   (one file)
    build_corpus(root, sources, max_words) -> [Passage] with ids 0..N-1    (all files)

A passage is a run of consecutive paragraphs under one heading, at most
``max_words`` words (a longer paragraph is cut at sentence ends, or at
``max_words`` words when a sentence is longer); fenced code blocks are kept
whole inside a paragraph. Invariants: a passage never spans two headings or
two files; ids are 0..N-1 in (file order, position in file) order, so the
same files give the same ids — the canonical order of `minisys.rag.prompt`
sorts by them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_MAX_WORDS = 120
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Passage:
    id: int
    source: str           # the file, relative to the repository root
    heading: str          # the nearest heading above it ("" before the first)
    text: str

    def title(self) -> str:
        return f"{self.source} § {self.heading}" if self.heading else self.source

    def embedding_text(self) -> str:
        """What is embedded: where it comes from, then the text."""
        return f"{self.title()}\n{self.text}"


def course_sources(root: str | Path) -> list[str]:
    """The course's own text: every lesson, the syllabus, the README (relative paths, that order)."""
    root = Path(root)
    lessons = sorted(p.relative_to(root).as_posix() for p in (root / "lessons").glob("*.md"))
    return lessons + [p for p in ("docs/syllabus.md", "README.md") if (root / p).is_file()]


def _paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs; a fenced code block (``` ... ```) stays in one paragraph."""
    paras, cur, in_fence = [], [], False
    for line in lines:
        if line.strip().startswith("```"):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if cur:
                paras.append("\n".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        paras.append("\n".join(cur))
    return paras


def _cut(paragraph: str, max_words: int) -> list[str]:
    """A paragraph as pieces of at most ``max_words`` words, cut at sentence ends where possible."""
    if len(paragraph.split()) <= max_words:
        return [paragraph]
    pieces, cur = [], []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        while len(words) > max_words:                            # a sentence longer than a passage
            if cur:
                pieces.append(" ".join(cur))
                cur = []
            pieces.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if cur and len(cur) + len(words) > max_words:
            pieces.append(" ".join(cur))
            cur = []
        cur += words
    if cur:
        pieces.append(" ".join(cur))
    return pieces


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines under it) in order; headings inside code fences are not headings."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    in_fence = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m:
            sections.append((m.group(2).strip(), []))
        else:
            sections[-1][1].append(line)
    return sections


def split_markdown(text: str, source: str, max_words: int = DEFAULT_MAX_WORDS, first_id: int = 0) -> list[Passage]:
    """One Markdown file as passages (ids from ``first_id``)."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    out: list[Passage] = []
    for heading, lines in _sections(text):
        cur: list[str] = []
        words = 0
        for para in (p for raw in _paragraphs(lines) for p in _cut(raw, max_words)):
            n = len(para.split())
            if cur and words + n > max_words:
                out.append(Passage(first_id + len(out), source, heading, "\n\n".join(cur)))
                cur, words = [], 0
            cur.append(para)
            words += n
        if cur:
            out.append(Passage(first_id + len(out), source, heading, "\n\n".join(cur)))
    return out


def build_corpus(root: str | Path, sources: list[str] | None = None,
                 max_words: int = DEFAULT_MAX_WORDS) -> list[Passage]:
    """Every source file under ``root`` as passages with ids 0..N-1 (default: `course_sources`)."""
    root = Path(root)
    passages: list[Passage] = []
    for source in sources if sources is not None else course_sources(root):
        text = (root / source).read_text(encoding="utf-8")
        passages += split_markdown(text, source, max_words, first_id=len(passages))
    return passages


def save_passages(passages: list[Passage], path: str | Path) -> None:
    Path(path).write_text("\n".join(json.dumps(asdict(p)) for p in passages) + "\n", encoding="utf-8")


def load_passages(path: str | Path) -> list[Passage]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Passage(**json.loads(line)) for line in lines if line.strip()]
