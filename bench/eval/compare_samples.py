"""Compare two lm-eval runs of one task, choice by choice (what tests/test_lm_eval.py asserts).

    python bench/eval/compare_samples.py OUT_A OUT_B [--task minisys_facts] [--atol 1e-3]

OUT_A, OUT_B: the ``--output_path`` folders of two ``lm_eval ... --log_samples`` runs. Prints the
largest difference of a choice's summed logprob, and acc / acc_norm of each run; exits 1 if the
difference is over ``--atol`` or the accuracies differ.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(out_dir: Path, task: str) -> dict[int, dict]:
    """doc id -> its sample record, from the newest samples_<task>_*.jsonl under ``out_dir``."""
    files = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no samples_{task}_*.jsonl under {out_dir} (run lm_eval with --log_samples)")
    return {r["doc_id"]: r for r in map(json.loads, files[-1].read_text().splitlines())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--task", default="minisys_facts")
    p.add_argument("--atol", type=float, default=1e-3)
    args = p.parse_args(argv)
    a, b = load(args.a, args.task), load(args.b, args.task)
    if sorted(a) != sorted(b):
        raise SystemExit("the runs scored different documents")
    diff = max(abs(float(x[0][0]) - float(y[0][0])) for d in a for x, y in zip(a[d]["resps"], b[d]["resps"]))
    print(f"{len(a)} documents; max |summed logprob difference| of a choice: {diff:.2e}")
    same = True
    for metric in ("acc", "acc_norm"):
        ma, mb = (sum(r[metric] for r in s.values()) / len(s) for s in (a, b))
        print(f"{metric}: {ma:.4f} vs {mb:.4f}")
        same &= ma == mb
    return 0 if diff <= args.atol and same else 1


if __name__ == "__main__":
    sys.exit(main())
