"""lm-evaluation-harness end to end: a loglikelihood task through `python -m minisys serve`.

The task is `minisys_facts` (bench/eval/minifacts: 32 four-way questions, a local JSONL; nothing is
fetched). It runs twice through lm-eval's own `simple_evaluate`:

* ``local-completions`` against a live server on the default model (what ``make serve`` runs,
  fp32 on CPU): lm-eval tokenizes context + choice with the model's Hugging Face tokenizer, sends
  the token ids with ``echo: true, logprobs: 1, max_tokens: 1`` and sums the echoed prompt
  logprobs of the choice's tokens;
* ``hf`` (lm-eval's `HFLM`) on the independent oracle: Hugging Face transformers' own load of the
  same GGUF (the ``hf_smol`` fixture), fp32.

Both sides see the same token ids (the same tokenizer, the same `_encode_pair`), so the numbers
differ only by the two forward passes. Asserted: every choice's summed logprob agrees within
`ATOL`, and acc and acc_norm are equal. ``ATOL`` = 1e-3 on a sum of at most ~6 token logprobs: fp32
reductions in a different order (minisys's paged attention vs transformers' eager) differ by
~1e-5 per token (tests/test_logprobs.py holds single tokens to 1e-4); 1e-3 is far below the gap
that decides an answer, and the test also checks that no answer is decided by a gap that small.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")        # nothing from a hub, ever
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "bench" / "eval" / "minifacts"
TASK = "minisys_facts"
ATOL = 1e-3
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m minisys serve` on the default model, fp32 on CPU, starting in the background (it
    loads while the oracle does); the test waits for /health."""
    from minisys.bench.server_process import free_port
    port = free_port()
    log = tmp_path_factory.mktemp("lm_eval") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "minisys", "serve", "--device", "cpu", "--dtype", "float32",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    yield proc, f"http://127.0.0.1:{port}", log
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _by_doc(result) -> dict[int, list[float]]:
    """doc id -> the summed logprob of each choice (lm-eval's ``--log_samples`` records)."""
    return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in result["samples"][TASK]}


def test_local_completions_against_the_server_equals_hf_on_the_same_weights(server, hf_smol, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minisys.bench.server_process import wait_healthy

    proc, url, log = server
    hf_model, hf_tok = hf_smol
    hf_tok.save_pretrained(tmp_path / "tokenizer")           # the tokenizer lm-eval uses for the server side
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)    # not its ~10k tasks: 27 s to index

    t0 = time.perf_counter()
    oracle = lm_eval.simple_evaluate(model=HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=32),
                                     tasks=[TASK], task_manager=tasks, log_samples=True)
    t1 = time.perf_counter()
    wait_healthy(url, proc, 300, log)
    t2 = time.perf_counter()
    args = ",".join([f"base_url={url}/v1/completions", "model=SmolLM2-135M-Instruct", "tokenizer_backend=huggingface",
                     f"tokenizer={tmp_path / 'tokenizer'}", "tokenized_requests=True", "batch_size=32",
                     "max_retries=1"])
    served = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[TASK],
                                     task_manager=tasks, log_samples=True)

    print(f"\nhf {t1 - t0:.1f} s; waited {t2 - t1:.1f} s for the server; local-completions "
          f"{time.perf_counter() - t2:.1f} s")
    want, got = _by_doc(oracle), _by_doc(served)
    assert sorted(want) == sorted(got) == list(range(32))
    diffs = [abs(a - b) for d in want for a, b in zip(want[d], got[d], strict=True)]
    print(f"max |summed logprob difference| over {len(diffs)} choices: {max(diffs):.2e}")
    assert max(diffs) < ATOL
    for d, lls in want.items():                               # no answer decided within the tolerance
        top = sorted(lls, reverse=True)
        assert top[0] - top[1] > 2 * ATOL, (d, lls)
    for metric in ("acc,none", "acc_norm,none"):
        a, b = oracle["results"][TASK][metric], served["results"][TASK][metric]
        print(f"{metric}: hf {a:.4f}  minisys serve {b:.4f}")
        assert a == b
