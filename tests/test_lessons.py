"""The lesson texts as a student reads them: no unfinished text, every picture and link present,
figures regenerable, quoted benchmark tables in step with their JSON. Fast: no model is loaded."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]-*.md")) + sorted((ROOT / "lessons").glob("[A-Z]-*.md"))  # + appendices
FIGURES = ROOT / "lessons" / "figures"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")                 # [text](target) and ![alt](target)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MARKERS = re.compile(r"\b(TODO|TBD|FIXME|XXX|PLACEHOLDER|MEASURED_[A-Z_]*|lorem ipsum)\b", re.I)
TRACKER = re.compile(r"\bissues?\b", re.I)                      # a course text speaks of the course


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code removed (identifiers may look like markers)."""
    return re.sub(r"`[^`]*`", " ", re.sub(r"```.*?```", " ", text, flags=re.S))   # inline code may wrap


def test_there_are_lessons():
    assert len(LESSONS) >= 7, LESSONS


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_no_placeholder_or_tracker_wording(lesson):
    text = lesson.read_text()
    prose = without_code(text)
    assert not MARKERS.findall(text), f"{lesson.name}: unfinished text {MARKERS.findall(text)}"
    caps = re.findall(r"\b[A-Z]{2,}(?:_[A-Z]+)+\b", prose)      # SOME_NAME outside code: a marker (not Q4_1)
    assert not caps, f"{lesson.name}: placeholder-like names outside code: {caps}"
    hits = [ln.strip() for ln in text.splitlines() if TRACKER.search(ln)]
    assert not hits, f"{lesson.name}: tracker wording ('issue'): {hits}"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_every_local_link_and_image_exists(lesson):
    missing = []
    for target in LINK.findall(lesson.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                             # http(s), mailto, in-page anchors
        if not (lesson.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{lesson.name} links to files that are not in the repository: {missing}"


@pytest.mark.parametrize("lesson", [p for p in LESSONS if "01" < p.name[:2] <= "07"], ids=lambda p: p.name)
def test_lessons_02_to_07_embed_a_diagram_and_a_benchmark_plot(lesson):
    text = lesson.read_text()
    images = IMAGE.findall(text)
    diagrams = [i for i in images if i.startswith("figures/")] + re.findall(r"```mermaid", text)
    plots = [i for i in images if i.startswith("../bench/results/") and i.endswith(".png")]
    assert diagrams, f"{lesson.name} embeds no diagram (lessons/figures/*.svg or a mermaid block)"
    assert plots, f"{lesson.name} embeds no benchmark plot from bench/results/"


def test_every_embedded_benchmark_plot_has_its_json_and_command():
    for lesson in LESSONS:
        for image in IMAGE.findall(lesson.read_text()):
            if not image.startswith("../bench/results/"):
                continue
            png = lesson.parent / image
            candidates = [png.with_suffix(".json"), png.with_name(png.stem + "_quick.json")]
            found = [c for c in candidates if c.exists()]
            assert found, f"{lesson.name}: {image} has no result JSON beside it"
            result = json.loads(found[0].read_text())
            assert result.get("command") and result.get("machine"), f"{found[0].name}: no command or machine"


def test_lesson_01_table_and_figure_are_the_benchmark_run_the_lab_repeats():
    """Lesson 01 section 7 quotes kv_cache_quick.json (the lab's own lengths), and embeds its plot."""
    text = (ROOT / "lessons" / "01-tokens-to-text.md").read_text()
    section = text.split("## 7.")[1].split("\n## ")[0]
    assert "../bench/results/kv_cache.png" in section
    result = json.loads((ROOT / "bench" / "results" / "kv_cache_quick.json").read_text())
    lab = (ROOT / "solutions" / "lab01_tokens_to_text.py").read_text()
    quick_lengths = [r["total_len"] for r in result["rows"]]
    assert f"lengths = {quick_lengths} if quick" in lab, "the lab and the benchmark measure different lengths"
    for row in result["rows"]:
        for key in ("tok_s_cache", "tok_s_no_cache"):
            assert f"{row[key]:.1f}" in section, f"lesson 01 section 7 does not quote {key} of {row}"


def svg_texts(svg: bytes) -> list[str]:
    """The labels of an SVG drawn with svg.fonttype 'none' (text kept as text)."""
    return re.findall(r"<text[^>]*>(.*?)</text>", svg.decode(), flags=re.S)


def test_diagrams_are_regenerated_by_the_script(tmp_path):
    """Each lessons/figures/*.svg a lesson shows is what make_figures.py draws now (not a hand-edited file):
    byte for byte with the matplotlib version that drew the committed file, the same labels with another."""
    import matplotlib

    shown = {Path(i).name for lesson in LESSONS for i in IMAGE.findall(lesson.read_text()) if i.startswith("figures/")}
    assert shown, "no lesson shows a diagram"
    subprocess.run([sys.executable, str(FIGURES / "make_figures.py"), "--out", str(tmp_path), "--diagrams-only"],
                   check=True, cwd=ROOT, capture_output=True)
    for name in sorted(shown):
        fresh = tmp_path / name
        assert fresh.exists(), f"{name} is shown by a lesson but make_figures.py does not draw it"
        committed = (FIGURES / name).read_bytes()
        hint = f"lessons/figures/{name} differs from what make_figures.py draws: re-run it and commit"
        if f"Matplotlib v{matplotlib.__version__},".encode() in committed:
            assert fresh.read_bytes() == committed, hint
        else:
            assert svg_texts(fresh.read_bytes()) == svg_texts(committed), hint
