"""Reporting for the serving benchmark: a text table, strict JSON, a latency-vs-rate plot.

Input everywhere: ``{system name: [summary per rate]}``, each summary a
`metrics.summarize` dict with its ``rate`` added.
"""
from __future__ import annotations

import math
from pathlib import Path

ROWS = [("completed", "completed requests", "{:.0f}"), ("duration_s", "duration (s)", "{:.1f}"),
        ("output_throughput", "output throughput (tok/s)", "{:.1f}"),
        ("request_throughput", "request throughput (req/s)", "{:.2f}"), ("goodput", "goodput (req/s)", "{:.2f}"),
        ("mean_ttft_ms", "mean TTFT (ms)", "{:.0f}"), ("p50_ttft_ms", "p50 TTFT (ms)", "{:.0f}"),
        ("p99_ttft_ms", "p99 TTFT (ms)", "{:.0f}"), ("mean_tpot_ms", "mean TPOT (ms)", "{:.1f}"),
        ("p50_tpot_ms", "p50 TPOT (ms)", "{:.1f}"), ("p99_tpot_ms", "p99 TPOT (ms)", "{:.1f}"),
        ("mean_itl_ms", "mean ITL (ms)", "{:.1f}"), ("p50_itl_ms", "p50 ITL (ms)", "{:.1f}"),
        ("p99_itl_ms", "p99 ITL (ms)", "{:.1f}"), ("mean_e2el_ms", "mean E2EL (ms)", "{:.0f}"),
        ("p50_e2el_ms", "p50 E2EL (ms)", "{:.0f}"), ("p99_e2el_ms", "p99 E2EL (ms)", "{:.0f}")]


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def table(results: dict[str, list[dict]], baseline: str | None = None) -> str:
    """One column per (system, rate); with ``baseline``, a ratio row of output throughput."""
    cols = [(name, s) for name, runs in results.items() for s in runs]
    head = ["metric"] + [f"{name}@{fmt_rate(s['rate'])}" for name, s in cols]
    lines = [head]
    for key, label, fmt in ROWS:
        if any(key in s for _, s in cols):
            lines.append([label] + [fmt.format(s[key]) if key in s else "-" for _, s in cols])
    if baseline in results:
        base = {s["rate"]: s["output_throughput"] for s in results[baseline]}
        lines.append([f"throughput / {baseline}"] +
                     [f"{s['output_throughput'] / base[s['rate']]:.2f}x" if base.get(s["rate"]) else "-"
                      for _, s in cols])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


def jsonable(obj):
    """``obj`` with non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity/NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def plot(results: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Latency (p50 solid, p99 dashed) and throughput against request rate, one line per system."""
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook
    rates = sorted({s["rate"] for runs in results.values() for s in runs})
    pos = {r: i for i, r in enumerate(rates)}
    fig = Figure(figsize=(17, 3.8))
    axes = fig.subplots(1, 4)
    for ax, metric, label in zip(axes, ["ttft", "tpot", "e2el"], ["TTFT (ms)", "TPOT (ms)", "E2EL (ms)"]):
        for name, runs in results.items():
            xs = [pos[s["rate"]] for s in runs]
            line, = ax.plot(xs, [s[f"p50_{metric}_ms"] for s in runs], "o-", label=f"{name} p50")
            ax.plot(xs, [s[f"p99_{metric}_ms"] for s in runs], "x--", color=line.get_color(), label=f"{name} p99")
        ax.set(ylabel=label, yscale="log")
    for name, runs in results.items():
        axes[3].plot([pos[s["rate"]] for s in runs], [s["output_throughput"] for s in runs], "o-", label=name)
    axes[3].set(ylabel="output tokens/s")
    for ax in axes:
        ax.set_xticks(range(len(rates)), [fmt_rate(r) for r in rates])
        ax.set_xlabel("request rate (req/s)")
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
