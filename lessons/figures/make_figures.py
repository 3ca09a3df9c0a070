"""Draw the lessons' diagrams (lessons/figures/*.svg) and re-plot stored benchmark results.

    python lessons/figures/make_figures.py            # from the repository root; a few seconds, no model
    python lessons/figures/make_figures.py --out DIR --diagrams-only   # what tests/test_lessons.py runs

Every figure is drawn from the small example written down in its function
(and, for the batching and chunked-prefill timelines, scheduled by the same
rules as minisys: `split_budget` is minisys's own), so a figure is regenerated,
never edited by hand. SVG output is deterministic (fixed hash salt, no date),
so a re-run that changes nothing leaves git clean. The stored benchmark
results ``bench/results/throughput.json`` and ``kv_cache_quick.json`` are
re-plotted into ``throughput.png`` and ``kv_cache.png`` with the benchmarks'
own plot functions.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                               # a script: no display needed
import matplotlib.pyplot as plt                     # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = Path(__file__).resolve().parent
plt.rcParams.update({"svg.hashsalt": "minisys", "svg.fonttype": "none", "font.size": 9,
                     "font.family": "DejaVu Sans"})

BLUE, ORANGE, GREY, GREEN, RED, PURPLE = "#4c78a8", "#f58518", "#d9d9d9", "#54a24b", "#e45756", "#b279a2"


def save(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    return path


def box(ax, x, y, w, h, color, text="", hatch=None, fc=None, fontsize=8, ec="black", lw=0.6):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=fc or color, edgecolor=ec, hatch=hatch, lw=lw))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, xy0, xy1, color="black", style="-|>", rad=0.0, lw=0.8):
    ax.add_patch(FancyArrowPatch(xy0, xy1, arrowstyle=style, mutation_scale=8, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}"))


# ---------------------------------------------------------------- lesson 02
def flash_tiling() -> Path:
    """Left: causal prefill tiles (skipped / masked / full). Right: split-K decode and its merge."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    n = 6                                            # 6 query blocks x 6 key blocks
    for i in range(n):                               # i: query block (row, top = 0)
        for j in range(n):
            y = n - 1 - i
            if j > i:
                box(ax, j, y, 1, 1, "white", "skip", fontsize=7, ec="#bbbbbb")
            elif j == i:
                box(ax, j, y, 1, 1, ORANGE, "mask", hatch="//", fontsize=7)
            else:
                box(ax, j, y, 1, 1, BLUE, "", fontsize=7)
    row = 3                                          # the inner loop of one query block
    y = n - 1 - row
    for j in range(row + 1):
        ax.text(j + 0.5, y + 0.5, f"{j + 1}", ha="center", va="center", color="white" if j < row else "black",
                fontsize=9, weight="bold")
    arrow(ax, (0.1, y + 0.15), (row + 0.9, y + 0.15), color=RED, lw=1.4)
    ax.text(0, -0.25, "inner loop over key blocks 1, 2, 3, 4 of query block i: m, l, acc\n"
                      "updated per tile (online softmax); O = acc / l once, at the end",
            fontsize=8, color=RED, va="top")
    ax.text(-0.2, y + 0.5, "query\nblock i", ha="right", va="center", fontsize=8)
    ax.set_xlim(-1.7, n + 0.1), ax.set_ylim(-2.6, n + 0.6)
    ax.text(n / 2, n + 0.3, "keys (blocks of block_k) \u2192", ha="center", fontsize=9)
    ax.text(-1.65, n - 0.5, "queries\n(blocks of\nblock_q)\n\u2193", ha="left", va="top", fontsize=9)
    ax.set_title("Prefill: FlashAttention tiles of Q K\u1d40 (never stored whole)", fontsize=10)
    ax.axis("off")
    legend = [Rectangle((0, 0), 1, 1, fc=BLUE, ec="black"), Rectangle((0, 0), 1, 1, fc=ORANGE, hatch="//", ec="black"),
              Rectangle((0, 0), 1, 1, fc="white", ec="#bbbbbb")]
    ax.legend(legend, ["full tile", "diagonal tile: causal mask", "above the diagonal: never computed"],
              loc="lower right", fontsize=7, frameon=False, bbox_to_anchor=(1.02, -0.1))

    # split-K decode
    chunks = 4
    box(bx, 0, 4.2, 1.2, 0.7, PURPLE, "q (1 token)", fontsize=8)
    for c in range(chunks):
        x = 1.8 + c * 1.35
        box(bx, x, 4.2, 1.2, 0.7, BLUE, f"K,V chunk {c + 1}", fontsize=7)
        box(bx, x, 2.6, 1.2, 0.9, GREY, f"worker {c + 1}:\no_{c + 1}, lse_{c + 1}", fontsize=7)
        arrow(bx, (x + 0.6, 4.2), (x + 0.6, 3.5))
        arrow(bx, (x + 0.6, 2.6), (4.1 + 0.6, 1.5), rad=0.0)
    bx.text(1.8, 5.1, "the cache of one sequence: S keys, split in chunks \u2192", fontsize=8)
    box(bx, 3.4, 0.6, 2.8, 0.9, GREEN, "merge:  w_c = exp(lse_c \u2212 max lse)\nO = \u03a3 w_c o_c / \u03a3 w_c",
        fontsize=8)
    bx.text(0.0, 2.0, "each worker: softmax\nwithin its chunk only\n(in parallel)", fontsize=8, va="center")
    bx.set_xlim(-0.2, 7.4), bx.set_ylim(0.3, 5.5)
    bx.set_title("Decode: split-K (FlashDecoding) then an exact log-sum-exp merge", fontsize=10)
    bx.axis("off")
    return save(fig, "flash_tiling_splitk.svg")


# ---------------------------------------------------------------- lesson 03
def paged_memory() -> Path:
    """Top: three contiguous reservations and their waste. Bottom: block tables into a pool, fork + CoW."""
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 6.6), gridspec_kw={"height_ratios": [1, 1.45]})
    # contiguous: slots 0..39, three requests reserved for prompt + max_tokens
    reqs = [("A", 0, 7, 12), ("B", 14, 4, 10), ("C", 26, 9, 12)]   # name, start, used, reserved
    for x in range(40):
        box(ax, x, 0, 1, 1, "white", ec="#bbbbbb", lw=0.4)
    for name, start, used, reserved in reqs:
        for x in range(start, start + reserved):
            if x < start + used:
                box(ax, x, 0, 1, 1, BLUE, name if x == start else "", fontsize=8)
            else:
                box(ax, x, 0, 1, 1, "white", fc="#fde0c5", hatch="//", lw=0.4)
    for a, b in ((12, 14), (24, 26), (38, 40)):
        ax.annotate("", (a, -0.15), (b, -0.15), arrowprops=dict(arrowstyle="<->", color=RED, lw=0.8))
    ax.text(13, -0.75, "gaps: external\nfragmentation", ha="center", fontsize=7, color=RED, va="top")
    ax.text(9.5, 1.3, "reserved for prompt + max_tokens, never written\n(internal fragmentation)",
            ha="center", fontsize=7, color=ORANGE)
    ax.text(34, -0.75, "D (needs 4 slots) does not fit:\n6 slots are free, at most 2 adjacent", ha="center",
            fontsize=7, va="top")
    ax.set_xlim(-0.5, 40.5), ax.set_ylim(-2.0, 2.3)
    ax.set_title("Contiguous KV cache: one region per request, sized for its maximum", fontsize=10)
    ax.axis("off")

    # paged: pool of 12 blocks x 4 slots; A has 7 tokens, B = fork(A) then 2 own tokens
    bs, nblocks = 4, 12
    px, py = 14, 0.3
    content = {3: ("A,B", 4, GREEN), 7: ("A", 3, BLUE), 1: ("B", 4, PURPLE), 9: ("B", 1, PURPLE), 10: ("C", 2, BLUE)}
    for b in range(nblocks):
        x = px + (b % 6) * 4.6
        y = py + (1 - b // 6) * 1.6
        filled = content.get(b, ("", 0, None))
        for s in range(bs):
            color = filled[2] if s < filled[1] else "white"
            box(bx, x + s, y, 1, 1, color, ec="black" if s < filled[1] else "#bbbbbb", lw=0.4)
        bx.text(x + 2, y + 1.15, f"block {b}" + (f" ({filled[0]})" if filled[0] else ""), ha="center", fontsize=7)
    bx.text(px + 13.5, 3.85, "the pool: num_blocks \u00d7 block_size slots, preallocated (block_size = 4 here)",
            ha="center", fontsize=8)
    tables = [("A: [3, 7]", 2.6, [3, 7]), ("B = fork(A): [3, 1, 9]", 1.3, [3, 1, 9]), ("C: [10]", 0.0, [10])]
    for label, y, blocks in tables:
        bx.text(0, y + 0.5, label, fontsize=8, va="center")
        for k, b in enumerate(blocks):
            tx = 7.6 + k * 1.2
            box(bx, tx, y + 0.1, 1.0, 0.8, "white", str(b), fontsize=8)
            x = px + (b % 6) * 4.6
            yy = py + (1 - b // 6) * 1.6
            arrow(bx, (tx + 1.0, y + 0.5), (x, yy + 0.5), color="#555555", lw=0.6, rad=-0.05)
    bx.text(0, -1.0, "B was forked from A after 7 tokens: both tables share block 3 (ref_count 2, green).\n"
                     "A's block 7 was partial and shared, so B's first append copied it to block 1 "
                     "(copy-on-write) and went on in block 9.", fontsize=8, va="top")
    bx.set_xlim(-0.3, px + 6 * 4.6), bx.set_ylim(-2.0, 4.2)
    bx.set_title("Paged KV cache: block tables map positions to blocks anywhere in one pool", fontsize=10)
    bx.axis("off")
    return save(fig, "paged_memory.svg")


# ---------------------------------------------------------------- lesson 04
REQUESTS = [(0, 3), (0, 9), (0, 5), (0, 4), (1, 6), (2, 3), (3, 7), (5, 4)]   # (arrival step, output tokens)


def static_schedule(batch: int = 4):
    """Static batching: batches of `batch` in arrival order, each runs until its longest is done."""
    t, rows = 0, []
    for start in range(0, len(REQUESTS), batch):
        group = REQUESTS[start:start + batch]
        t = max(t, max(a for a, _ in group))
        longest = max(n for _, n in group)
        for k, (a, n) in enumerate(group):
            rows.append((start + k, a, t, n, longest))
        t += longest
    return rows


def continuous_schedule(batch: int = 4):
    """Iteration-level scheduling: finished requests leave, waiting ones join at the next step."""
    waiting, running, t, out = list(range(len(REQUESTS))), {}, 0, {}
    while waiting or running:
        for r in [r for r, left in running.items() if left == 0]:
            del running[r]
        while waiting and len(running) < batch and REQUESTS[waiting[0]][0] <= t:
            r = waiting.pop(0)
            running[r] = REQUESTS[r][1]
            out[r] = t
        for r in running:
            running[r] -= 1
        t += 1
    return out


def batching_timeline() -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    static = static_schedule()
    cont = continuous_schedule()
    for ax, title in zip(axes, ("Static (request-level) batching, batch of 4",
                                "Continuous (iteration-level) batching, at most 4")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("engine step (iteration)")
        ax.set_ylim(len(REQUESTS) - 0.5, -0.7)
        ax.set_yticks(range(len(REQUESTS)), [f"R{i + 1}" for i in range(len(REQUESTS))])
    for i, a, start, n, longest in static:
        ax = axes[0]
        if start > a:
            box(ax, a, i - 0.35, start - a, 0.7, "white", "wait", fc="#fff3c4", fontsize=7, ec="#bbbbbb")
        box(ax, start, i - 0.35, 1, 0.7, PURPLE)
        if n > 1:
            box(ax, start + 1, i - 0.35, n - 1, 0.7, BLUE)
        if longest > n:
            box(ax, start + n, i - 0.35, longest - n, 0.7, GREY, "padding" if longest - n >= 3 else "",
                hatch="..", fontsize=7)
    for i, start in cont.items():
        a, n = REQUESTS[i]
        ax = axes[1]
        if start > a:
            box(ax, a, i - 0.35, start - a, 0.7, "white", "wait" if start - a > 1 else "", fc="#fff3c4",
                fontsize=7, ec="#bbbbbb")
        box(ax, start, i - 0.35, 1, 0.7, PURPLE)
        if n > 1:
            box(ax, start + 1, i - 0.35, n - 1, 0.7, BLUE)
    end_static = max(s + longest for _, _, s, _, longest in static)
    end_cont = max(cont[i] + REQUESTS[i][1] for i in cont)
    for ax, end in zip(axes, (end_static, end_cont)):
        ax.set_xlim(0, max(end_static, end_cont) + 0.5)
        ax.axvline(end, color=RED, lw=0.8, ls="--")
        ax.text(end - 0.2, -0.5, f"all done: step {end}", color=RED, fontsize=8, ha="right")
        for a in sorted({a for a, _ in REQUESTS}):
            ax.plot([a], [-0.6], marker="v", color="black", ms=4)
    from matplotlib.lines import Line2D
    handles = [Rectangle((0, 0), 1, 1, fc=PURPLE), Rectangle((0, 0), 1, 1, fc=BLUE),
               Rectangle((0, 0), 1, 1, fc=GREY, hatch=".."), Rectangle((0, 0), 1, 1, fc="#fff3c4", ec="#bbbbbb"),
               Line2D([], [], marker="v", color="black", ls="", ms=4)]
    fig.legend(handles, ["prefill (first token)", "decode steps", "padding (wasted rows)", "waiting in the queue",
                         "arrival steps"],
               loc="lower center", ncol=5, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.06))
    return save(fig, "batching_timeline.svg")


# ---------------------------------------------------------------- lesson 05
def sarathi_steps() -> Path:
    """Tokens per step: prefill-first vs Sarathi's token budget, on one small example."""
    from minisys.engine.scheduler import split_budget

    budget, decodes, prompts = 64, 6, [150, 40]          # 6 running decodes; two prompts arrive at step 2
    arrive = 2
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)

    def draw(ax, steps, title):
        for t, (d, chunks) in enumerate(steps):
            box(ax, t, 0, 0.8, d, BLUE, lw=0.4)
            y = d
            for k, c in enumerate(chunks):
                if c:
                    box(ax, t, y, 0.8, c, (ORANGE, PURPLE)[k], lw=0.4)
                    y += c
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("engine step")
        ax.set_xlim(-0.4, 9), ax.set_ylim(0, 210)

    first = [(decodes, []) for _ in range(arrive)] + [(decodes, prompts)] + [(decodes + 2, []) for _ in range(5)]
    draw(axes[0], first, "Prefill-first: both prompts whole in one step")
    axes[0].annotate("one long step:\nevery stream stalls", (arrive + 0.4, 190), (arrive + 2.2, 170), fontsize=8,
                     arrowprops=dict(arrowstyle="->"))
    chunked, remaining, running = [], list(prompts), decodes
    for t in range(9):
        if t < arrive:
            chunked.append((decodes, []))
            continue
        chunks = split_budget(budget, running, remaining)
        chunked.append((running, chunks))
        for k, c in enumerate(chunks):
            remaining[k] -= c
            if c and remaining[k] == 0:
                running += 1                          # its last chunk produced the first token: it decodes now
    draw(axes[1], chunked, f"Chunked prefill (Sarathi-Serve): token budget {budget}")
    axes[1].axhline(budget, color=RED, ls="--", lw=0.8)
    axes[1].text(8.9, budget + 4, "budget", color=RED, fontsize=8, ha="right")
    axes[0].set_ylabel("tokens in the step (\u2248 its duration)")
    handles = [Rectangle((0, 0), 1, 1, fc=BLUE), Rectangle((0, 0), 1, 1, fc=ORANGE),
               Rectangle((0, 0), 1, 1, fc=PURPLE)]
    fig.legend(handles, ["decodes (1 token each, scheduled first)", "prompt 1 (150 tokens)", "prompt 2 (40 tokens)"],
               loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.07))
    return save(fig, "sarathi_steps.svg")


# ---------------------------------------------------------------- lesson 06
def spec_tree() -> Path:
    """Left: one draft sequence verified in one forward. Right: a SpecInfer token tree and its mask."""
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(12, 3.9), gridspec_kw={"width_ratios": [1.35, 1, 0.8]})
    ctx = ["The", "cat"]
    drafts = ["sat", "on", "a", "mat"]
    verdict = [GREEN, GREEN, RED, GREY]
    for k, w in enumerate(ctx):
        box(ax, k * 1.1, 2.6, 1.0, 0.7, "white", w, fc="#eeeeee")
    for k, w in enumerate(drafts):
        box(ax, (k + 2) * 1.1, 2.6, 1.0, 0.7, ORANGE, w)
    ax.text(2.2, 3.55, "k = 4 drafts (n-gram or a draft model)", fontsize=8)
    ax.text(0, 1.95, "one target forward over [last token] + drafts \u2192 p\u2080 \u2026 p\u2084", fontsize=8)
    outs = [("sat", GREEN), ("on", GREEN), ("the", PURPLE)]
    for k, w in enumerate(drafts):
        box(ax, (k + 2) * 1.1, 0.9, 1.0, 0.7, verdict[k], {GREEN: "accept", RED: "reject", GREY: "drop"}[verdict[k]],
            fontsize=7)
    for k, (w, c) in enumerate(outs):
        box(ax, (k + 2) * 1.1, -0.1, 1.0, 0.7, c, w)
    ax.text(0, 0.25, "emitted:", fontsize=8, va="center")
    ax.text(0, -0.75, "2 drafts accepted + 1 token of the target's own\n('the', drawn from the residual) "
                      "= 3 tokens for one forward;\nthe K/V written for 'a' and 'mat' are rolled back",
            fontsize=8, va="top")
    ax.set_xlim(-0.1, 6.7), ax.set_ylim(-2.0, 3.9)
    ax.set_title("Draft, verify, roll back (one sequence)", fontsize=10)
    ax.axis("off")

    # token tree: root "cat" -> sat / is ; sat -> on / down ; on -> the
    nodes = {"cat": (1.5, 3), "sat": (0.7, 2), "is": (2.3, 2), "on": (0.2, 1), "down": (1.2, 1), "the": (0.2, 0)}
    edges = [("cat", "sat"), ("cat", "is"), ("sat", "on"), ("sat", "down"), ("on", "the")]
    for a, b in edges:
        arrow(bx, nodes[a], nodes[b], style="-", lw=0.8)
    for name, (x, y) in nodes.items():
        color = GREEN if name in ("sat", "on", "the") else ("#eeeeee" if name == "cat" else ORANGE)
        bx.add_patch(Rectangle((x - 0.35, y - 0.2), 0.7, 0.4, fc=color, ec="black", lw=0.6, zorder=3))
        bx.text(x, y, name, ha="center", va="center", fontsize=8, zorder=4)
    bx.text(1.3, -0.65, "SpecInfer: candidates from several\nspeculators merged into one tree;\n"
                       "the target accepts the longest path\nit agrees with (green)", fontsize=8, ha="center",
            va="top")
    bx.set_xlim(-0.4, 3), bx.set_ylim(-1.9, 3.5)
    bx.set_title("Token tree", fontsize=10)
    bx.axis("off")

    order = ["sat", "is", "on", "down", "the"]
    parent = {"sat": None, "is": None, "on": "sat", "down": "sat", "the": "on"}

    def ancestors(n):
        out = {n}
        while parent[n]:
            n = parent[n]
            out.add(n)
        return out

    for i, q in enumerate(order):
        for j, k in enumerate(order):
            box(cx, j, len(order) - 1 - i, 1, 1, BLUE if k in ancestors(q) else "white", lw=0.4)
    for i, name in enumerate(order):
        cx.text(-0.15, len(order) - 1 - i + 0.5, name, ha="right", va="center", fontsize=8)
        cx.text(i + 0.5, len(order) + 0.15, name, ha="center", va="bottom", fontsize=8, rotation=45)
    cx.set_xlim(-1.2, len(order) + 0.2), cx.set_ylim(-0.8, len(order) + 1.2)
    cx.text(len(order) / 2, -0.5, "query (row) attends to key (column):\nits ancestors and itself only "
                                  "(+ the whole context)", ha="center", fontsize=7, va="top")
    cx.set_title("Tree attention mask", fontsize=10)
    cx.axis("off")
    return save(fig, "spec_tree.svg")


def replot_throughput() -> Path | None:
    from minisys.bench.throughput import plot
    src = ROOT / "bench" / "results" / "throughput.json"
    if not src.exists():
        return None
    import json
    path = ROOT / "bench" / "results" / "throughput.png"
    plot(json.loads(src.read_text()), str(path))
    return path


def replot_kv_cache() -> Path | None:
    from minisys.bench.kv_cache import KVCacheRow, plot
    src = ROOT / "bench" / "results" / "kv_cache_quick.json"
    if not src.exists():
        return None
    import json
    rows = [KVCacheRow(r["total_len"], r["new_tokens"], r["tok_s_cache"], r["tok_s_no_cache"])
            for r in json.loads(src.read_text())["rows"]]
    path = ROOT / "bench" / "results" / "kv_cache.png"
    plot(rows, str(path))
    return path


# ---------------------------------------------------------------- lesson 13
def tp_split() -> Path:
    """One Llama layer at TP=2 (SmolLM2: 9 Q / 3 KV heads, intermediate 1536), and one step's timeline."""
    fig, (ax, tx) = plt.subplots(2, 1, figsize=(11, 6.4), gridspec_kw={"height_ratios": [2.3, 1]})
    ranks = [("rank 0", "Q heads 0\u20135\nKV heads 0\u20131", "6 heads", "o_proj cols\nof heads 0\u20135",
              "gate/up rows\n0\u2013767", "down cols\n0\u2013767"),
             ("rank 1", "Q heads 6\u20138\nKV head 2", "3 heads", "o_proj cols\nof heads 6\u20138",
              "gate/up rows\n768\u20131535", "down cols\n768\u20131535")]
    for r, (name, qkv, heads, o, gu, down) in enumerate(ranks):
        y = 3.2 - 2.6 * r
        ax.text(-0.15, y + 0.6, name, ha="right", va="center", fontsize=9, weight="bold")
        box(ax, 0, y, 1.3, 1.2, GREY, "x (T \u00d7 576)\nreplicated", fontsize=7)
        box(ax, 1.7, y, 1.6, 1.2, BLUE, "q/k/v: column-\nparallel\n" + qkv, fontsize=7)
        box(ax, 3.7, y, 1.3, 1.2, "#9ecae9", "attention\n" + heads + "\n(local KV cache)", fontsize=7)
        box(ax, 5.4, y, 1.4, 1.2, ORANGE, "row-parallel\n" + o + "\n\u2192 partial", fontsize=7)
        box(ax, 8.6, y, 1.5, 1.2, GREEN, "column-parallel\n" + gu + "\nsilu(g)\u00b7u", fontsize=7)
        box(ax, 10.5, y, 1.4, 1.2, ORANGE, "row-parallel\n" + down + "\n\u2192 partial", fontsize=7)
        for x0, x1 in [(1.3, 1.7), (3.3, 3.7), (5.0, 5.4), (6.8, 7.2), (8.1, 8.6), (10.1, 10.5), (11.9, 12.3)]:
            arrow(ax, (x0, y + 0.6), (x1, y + 0.6))
    for x, label in [(7.2, "all-reduce \u03a3\n+ residual"), (12.3, "all-reduce \u03a3\n+ residual")]:
        box(ax, x, 0.6, 0.9, 3.8, RED, label, fontsize=7)
    ax.text(4.25, 4.9, "attention: whole KV-head groups per rank", ha="center", fontsize=8)
    ax.text(10.25, 4.9, "MLP: a block of the intermediate size", ha="center", fontsize=8)
    ax.set_xlim(-1.0, 13.4), ax.set_ylim(0.2, 5.4)
    ax.set_title("Megatron's split of one layer at TP=2: a column-parallel linear, then a row-parallel one, "
                 "then one all-reduce", fontsize=10)
    ax.axis("off")
    t = 0.0                                              # two layers of one step, the same on both ranks
    for layer in range(2):
        for part, w, color in [("attn", 2.2, "#9ecae9"), ("AR", 0.6, RED), ("MLP", 2.6, GREEN), ("AR", 0.6, RED)]:
            for r in range(2):
                box(tx, t, 1.2 - 1.0 * r, w, 0.7, color, part if part == "AR" else f"L{layer} {part}", fontsize=7)
            t += w
    tx.text(t + 0.3, 1.55, "\u2026 30 layers; logits gathered on rank 0", fontsize=8, va="center")
    for r in range(2):
        tx.text(-0.15, 1.55 - 1.0 * r, f"rank {r}", ha="right", va="center", fontsize=8)
    tx.set_xlim(-1.0, t + 4.2), tx.set_ylim(0, 2.1)
    tx.set_title("One step: every all-reduce (AR) is a barrier \u2014 compute halves, communication is added",
                 fontsize=10)
    tx.axis("off")
    return save(fig, "tp_split.svg")


def pipeline_parallel() -> Path:
    """Pipeline parallelism (not in minisys): 2 stages, 4 micro-batches, the bubble at fill and drain."""
    fig, ax = plt.subplots(figsize=(9, 2.4))
    stages, micro = 2, 4
    colors = [BLUE, ORANGE, GREEN, PURPLE]
    for s in range(stages):
        ax.text(-0.15, 1.4 - 1.0 * s, f"device {s}\nlayers {15 * s}\u2013{15 * s + 14}", ha="right", va="center",
                fontsize=8)
        for m in range(micro):
            box(ax, s + m, 1.05 - 1.0 * s, 1, 0.7, colors[m], f"mb {m}", fontsize=7)
        if s:
            box(ax, 0, 1.05 - 1.0 * s, 1, 0.7, "white", "idle", hatch="//", fontsize=7, ec="#999999")
        else:
            box(ax, micro, 1.05, 1, 0.7, "white", "idle", hatch="//", fontsize=7, ec="#999999")
    for m in range(micro):
        arrow(ax, (m + 1, 1.05), (m + 1.15, 0.75), color=RED)
    ax.text(micro + 1.3, 0.9, "one activation (T \u00d7 hidden)\nsent per micro-batch per stage boundary",
            fontsize=8, color=RED, va="center")
    ax.set_xlim(-1.6, micro + 4.6), ax.set_ylim(-0.1, 1.9)
    ax.set_title("Pipeline parallelism (left out of minisys): layers split between devices; "
                 "micro-batches fill the pipeline", fontsize=10)
    ax.axis("off")
    return save(fig, "pipeline_parallel.svg")


DIAGRAMS = [flash_tiling, paged_memory, batching_timeline, sarathi_steps, spec_tree, tp_split, pipeline_parallel]


def main(argv: list[str] | None = None) -> int:
    import argparse
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help="folder for the SVG diagrams (default: lessons/figures)")
    p.add_argument("--diagrams-only", action="store_true", help="skip re-plotting bench/results/throughput.png")
    a = p.parse_args(argv)
    OUT = a.out
    OUT.mkdir(parents=True, exist_ok=True)
    for f in DIAGRAMS + ([] if a.diagrams_only else [replot_throughput, replot_kv_cache]):
        path = f()
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
