"""Tensor parallelism (issue 16, lesson 13): TP=2 computes what TP=1 computes, and fails cleanly.

Oracles: the TP=1 model (plain `nn.Linear` math, itself checked against transformers elsewhere), plain
`torch.nn.functional` ops for the parallel layers, the TP=1 engine's greedy tokens, and the operating
system's process table (no process of the server's tree is left).

The two-rank checks run in ONE pair of spawned gloo processes (one thread each): the parallel layers
against torch ops, then the real model and the tiny random Llama and Qwen2 checkpoints.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from minisys.model.loader import load_model, resolve_model_dir
from minisys.parallel import comm
from minisys.parallel.linear import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from minisys.parallel.shard import head_shard, partition, shard_state_dict
from test_server_robust import chat_dir, launch_healthy  # noqa: F401 - chat_dir: the tiny chat model fixture

pytestmark = pytest.mark.timeout(300)
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 2127, 30, 731, 1789, 260, 1028, 28, 7]
TINY_IDS = [5, 77, 300, 12, 499, 8, 256, 41, 7, 100, 3]


# --------------------------------------------------------------------- pure helpers
def test_partition_and_head_split_of_smollm2():
    """SmolLM2-135M: 9 query heads in 3 KV groups; TP=2 puts KV heads {0,1} (q 0-5) on rank 0, {2} (q 6-8)
    on rank 1; TP=4 is refused naming the KV-head count."""
    from minisys.model.config import ModelConfig
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64)
    assert [partition(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    h0, h1 = head_shard(cfg, 2, 0), head_shard(cfg, 2, 1)
    assert (h0.q_start, h0.q_end, h0.kv_start, h0.kv_end) == (0, 6, 0, 2)
    assert (h1.q_start, h1.q_end, h1.kv_start, h1.kv_end) == (6, 9, 2, 3)
    with pytest.raises(ValueError, match="exceeds the model's 3 KV heads"):
        head_shard(cfg, 4, 0)
    full = {"model.layers.0.self_attn.q_proj.weight": torch.arange(576 * 576.).view(576, 576),
            "model.layers.0.self_attn.o_proj.weight": torch.arange(576 * 576.).view(576, 576),
            "model.norm.weight": torch.ones(576)}
    s1 = shard_state_dict(full, cfg, 1, 2)
    assert torch.equal(s1["model.layers.0.self_attn.q_proj.weight"], full["model.layers.0.self_attn.q_proj.weight"][384:])
    assert torch.equal(s1["model.layers.0.self_attn.o_proj.weight"], full["model.layers.0.self_attn.o_proj.weight"][:, 384:])
    assert torch.equal(s1["model.norm.weight"], full["model.norm.weight"])


def test_parallel_layers_at_tp1_are_the_plain_layers():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    col, row = ColumnParallelLinear(8, 6, True), RowParallelLinear(8, 6, True)
    for layer in (col, row):
        layer.weight.data, layer.bias.data = w, b
        assert torch.equal(layer(x), F.linear(x, w, b))
    emb, head = VocabParallelEmbedding(6, 8), ParallelLMHead(6, 8)
    emb.weight.data, head.weight.data = w, w
    ids = torch.tensor([0, 5, 3])
    assert torch.equal(emb(ids), F.embedding(ids, w)) and torch.equal(head(x), F.linear(x, w))


# --------------------------------------------------------------------- two gloo ranks
def _layers_check(rank: int) -> dict:
    """The parallel layers on 2 ranks against torch ops on the whole weights (uneven splits on purpose)."""
    g = torch.Generator().manual_seed(0)
    x, w1, b1 = torch.randn(5, 12, generator=g), torch.randn(20, 12, generator=g), torch.randn(20, generator=g)
    w2, b2 = torch.randn(7, 20, generator=g), torch.randn(7, generator=g)
    sizes = [12, 8]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    col = ColumnParallelLinear(12, 20, True, rank, 2, out_sizes=sizes)
    row = RowParallelLinear(20, 7, True, rank, 2, in_sizes=sizes)
    col.weight.data, col.bias.data = w1[lo:hi].clone(), b1[lo:hi].clone()
    row.weight.data, row.bias.data = w2[:, lo:hi].clone(), b2.clone()
    table = torch.randn(11, 4, generator=g)                   # 11 rows: ranks hold 6 and 5
    emb, head = VocabParallelEmbedding(11, 4, rank, 2), ParallelLMHead(11, 4, False, rank, 2)
    emb.weight.data = head.weight.data = table[emb.vocab_start:emb.vocab_end].clone()
    ids, h = torch.tensor([0, 10, 5, 6, 3]), torch.randn(3, 4, generator=g)
    with torch.no_grad():
        return {"mlp": (row(col(x)), F.linear(F.linear(x, w1, b1), w2, b2)),
                "col": (col(x), F.linear(x, w1, b1)[:, lo:hi]),
                "emb": (emb(ids), F.embedding(ids, table)), "head": (head(h), F.linear(h, table))}


def _two_rank_main(rank: int, port: int, jobs: list, out: str) -> None:
    torch.set_num_threads(1)
    comm.init_process_group(rank, 2, master_port=port)
    results = {"layers": _layers_check(rank), "all_reduce_calls": None}
    comm.ALL_REDUCE_TIMER.reset()
    for name, path, ids in jobs:
        model = load_model(Path(path), "cpu", torch.float32, tp_rank=rank, tp_size=2)
        results[name] = model.forward_sequence(ids)
        if results["all_reduce_calls"] is None:
            results["all_reduce_calls"] = (comm.ALL_REDUCE_TIMER.calls, model.config.num_layers)
    comm.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def tp2_results(tiny_dirs, tmp_path_factory):
    """Everything the two ranks computed (rank 0's view)."""
    import torch.multiprocessing as mp
    out = str(tmp_path_factory.mktemp("tp") / "tp2.pt")
    jobs = [("smol", str(resolve_model_dir(None, quiet=True)), PROMPT_IDS),
            ("llama", str(tiny_dirs["llama"]), TINY_IDS), ("qwen2", str(tiny_dirs["qwen2"]), TINY_IDS)]
    mp.start_processes(_two_rank_main, args=(comm.pick_free_port(), jobs, out), nprocs=2, start_method="spawn")
    return torch.load(out)


def test_parallel_layers_on_two_ranks_equal_torch_ops(tp2_results):
    for name, (got, want) in tp2_results["layers"].items():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    calls, layers = tp2_results["all_reduce_calls"]
    assert calls == 2 * layers + 1, "one all-reduce per attention, one per MLP, one for the embedding"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tp2_logits_equal_tp1_on_tiny_checkpoints(tp2_results, tiny_dirs, name):
    """Qwen2 has q/k/v biases: their column split must follow the weight's rows."""
    ref = load_model(tiny_dirs[name], "cpu", torch.float32).forward_sequence(TINY_IDS)
    torch.testing.assert_close(tp2_results[name], ref, rtol=0, atol=1e-5)


def test_tp2_logits_equal_tp1_on_the_real_model(tp2_results, smol):
    """SmolLM2's 9 heads split 6 + 3 (uneven). The bound is 1e-5 relative to the logits' scale (~30), not
    1e-5 absolute: fp32 rounding alone puts TP=1's own logits ~6e-5 from an fp64 forward of this 30-layer
    model (measured; TP=2's are ~7e-5 from it), and summing the row-parallel partial products in another
    order moves them by that much."""
    model, _ = smol
    ref = model.forward_sequence(PROMPT_IDS)
    got = tp2_results["smol"]
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------- the engine
def _engine_prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([13, 5, 21, 9, 17])]


def test_engine_greedy_tp2_equals_tp1_then_a_dead_worker_fails_fast(tiny_dirs, monkeypatch):
    """Continuous batching + chunked prefill (8-token budget < prompts) + preemption (10 blocks of 4 slots
    for 5 sequences of up to 29 tokens): TP=2 emits exactly TP=1's greedy tokens, also after the engine
    sat idle longer than the collectives' timeout (4 s here). Then a worker is killed: the next generate
    raises within seconds, and shutdown leaves no worker behind."""
    import psutil

    from minisys import LLM, SamplingParams
    from minisys.engine.config import EngineConfig
    from minisys.engine.tp_model_runner import TensorParallelError
    cfg = EngineConfig(num_kv_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _engine_prompts()]
    one = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True, engine_config=cfg)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, sp, use_tqdm=False)]
    assert one.engine.stats.preemptions > 0
    monkeypatch.setenv("MINISYS_TP_TIMEOUT_S", "4")            # the workers inherit it
    two = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True, engine_config=cfg,
              tensor_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, sp, use_tqdm=False)]
        assert two.engine.stats.preemptions > 0
        assert got == want and all(len(t) == 8 for t in got)
        time.sleep(5)                                          # idle: the workers wait for the next step
        again = two.generate(prompts[:2], sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == want[:2]
        (pid,) = two.engine.runner.workers.pids
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="worker rank 1"):
            for _ in range(50):             # the watcher sees the death within a moment
                two.generate(prompts[:1], sp, use_tqdm=False)
                time.sleep(0.2)
        assert time.monotonic() - start < 30
    finally:
        two.shutdown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_head_count_that_does_not_split_is_refused(tiny_dirs):
    """The tiny Llama has 2 KV heads: TP=3 is refused before any process starts, naming the limit."""
    from minisys import LLM
    from minisys.engine.config import EngineConfig
    with pytest.raises(ValueError, match="exceeds the model's 2 KV heads"):
        LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True, tensor_parallel_size=3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            EngineConfig(tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="speculative_method is not supported with tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=2, speculative_method="ngram")


# --------------------------------------------------------------------- the server
def _tree(pid: int) -> list:
    import psutil
    return psutil.Process(pid).children(recursive=True)


def _gone(procs: list) -> bool:
    import psutil
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_server_tp2_serves_then_a_killed_worker_errors_and_nothing_is_left(chat_dir, tmp_path):
    """`serve --tensor-parallel-size 2`: a chat completion through the openai client; then a worker is
    SIGKILLed mid-stream: the stream ends with an error (well before the client's read timeout), /health
    turns 503, a new request fails at once, and after SIGTERM no process of the server's tree is left."""
    import openai

    proc, url = launch_healthy(["--model", str(chat_dir), "--tensor-parallel-size", "2"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        msgs = [{"role": "user", "content": "the quick brown fox"}]
        r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError, match="not with --tensor-parallel-size"):
            client.embeddings.create(model="tiny-chat", input="a shard cannot embed alone")
        tree = _tree(proc.pid)
        workers = [p for p in tree if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in tree]
        stream = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=200, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        start = time.monotonic()
        workers[0].kill()
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                pass
        assert not isinstance(info.value, openai.APITimeoutError)
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=10).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 after a worker died"
            time.sleep(0.2)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=4)
        assert "died with exit code -9" in (tmp_path / "server.log").read_text()
    finally:
        tree = _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while not _gone(tree):
        assert time.monotonic() < deadline, "processes of the server's tree left behind"
        time.sleep(0.2)


def test_server_refuses_a_tensor_parallel_size_the_heads_cannot_take(chat_dir):
    r = subprocess.run([sys.executable, "-m", "minisys", "serve", "--model", str(chat_dir), "--device", "cpu",
                        "--port", "0", "--tensor-parallel-size", "4"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 2 and "exceeds the model's 2 KV heads" in r.stderr, r.stderr


# --------------------------------------------------------------------- the process layer
WORKER_SCRIPT = '''
import os, sys, time
from minisys.parallel.workers import WorkerGroup, report_ready

def block(conn):
    report_ready(conn, os.getpid())
    conn.recv()                        # never sent: the worker waits until it is ended

if __name__ == "__main__":
    group = WorkerGroup(block, [()], name="test-worker")
    group.start()
    print(group.wait_ready(120)[0], flush=True)
    time.sleep(600)
'''


def test_a_worker_ignores_ctrl_c_and_exits_when_its_parent_is_killed(tmp_path):
    """Ctrl-C reaches the whole process group: the worker leaves the shutdown to its parent. A parent
    killed with SIGKILL (no cleanup at all) leaves no orphan: the worker sees it and exits."""
    import psutil
    script = tmp_path / "parent.py"
    script.write_text(WORKER_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        worker = psutil.Process(int(parent.stdout.readline()))
        worker.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE, "SIGINT ended the worker"
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 10
    while not _gone([worker]):
        assert time.monotonic() < deadline, "the worker outlived its killed parent"
        time.sleep(0.1)
