"""`python -m minisys bench gpu --dry-run`: the GPU check's code paths at tiny size on CPU, so it cannot rot.

The dry run uses the tiny random Llama (conftest) for both minisys and the
transformers oracle: logits vs transformers, greedy engine == eager, the
server through the ``openai`` client, the throughput table, and batch-1 decode
with the CUDA-graph runner's static path (uncaptured on CPU).
"""
from __future__ import annotations

import json

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_torch_thread")     # tests/conftest.py


def test_dry_run_passes_and_writes_its_json(tiny_dirs, tmp_path):
    """In bf16, as on a GPU: the bf16 engine-vs-eager run is reported, the fp32 one is the check."""
    from minisys.bench.gpu_check import main
    assert main(["--dry-run", "--dtype", "bfloat16", "--random-weights", str(tiny_dirs["llama"]),
                 "--out", str(tmp_path)]) == 0                      # random weights: what a bare GPU machine runs
    res = json.loads((tmp_path / "gpu_check_dryrun_cpu.json").read_text())
    assert res["weights"].startswith("random")
    assert res["gpu"]["torch"] == torch.__version__ and "driver" in res["gpu"] and res["command"]
    assert res["dtype"] == "bfloat16" and res["logits"]["dtype"] == "bfloat16" and res["logits"]["ok"]
    assert res["logits"]["tolerance"] == 2.0 and res["logits"]["argmax_agreement"] > 0.9
    assert res["engine_equals_eager_bf16"]["dtype"] == "bfloat16" and "ok" not in res["engine_equals_eager_bf16"]
    assert res["engine_equals_eager"]["dtype"] == "float32" and res["engine_equals_eager"]["ok"]
    assert res["server"]["ok"] and res["server"]["completion_tokens"] == 8
    systems = res["throughput"]["systems"]
    assert systems["minisys"]["tok_s"] > 0 and systems["transformers_generate"]["tok_s"] > 0
    assert "skipped" in systems["transformers_continuous"]            # the dry run says why, never silently
    ops = res["decode_ops"]
    assert ops["layers"] == 2 and ops["kernel_ops"] > 20 * ops["layers"] and ops["host_syncs"] >= 1      # RoPE's range check, once per forward
    lat = res["decode_latency"]
    assert lat["eager_ms_per_token"] > 0 and lat["graphs_ms_per_token"] > 0 and lat["graphs_captured"] is False


def test_logits_check_fails_on_other_weights(tiny_dirs):
    """The correctness check can fail: the same tokens through a different model are far outside tolerance."""
    from minisys.bench.gpu_check import check_logits, load_oracle
    from minisys.model import load
    model, tok = load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, quiet=True)
    other = load_oracle(str(tiny_dirs["llama-tied"]), "cpu", torch.float32)
    res = check_logits(model, other, tok)
    assert res["ok"] is False and res["max_abs_diff"] > res["tolerance"]


def test_without_a_gpu_the_real_run_refuses(capsys):
    from minisys.bench.gpu_check import main
    if torch.cuda.is_available():
        return
    assert main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
