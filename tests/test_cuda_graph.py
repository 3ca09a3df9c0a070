"""The CUDA-graph decode path, checked on CPU: buckets, padding, static buffers, and the logits.

On CPU `GraphRunner.run` calls the same static-buffer forward a graph would
replay, so everything but the capture itself is tested here: a batch is padded
into its bucket's buffers, padding rows write only the scratch block, and the
logits of every step equal the eager engine's (the oracle: the engine without
graphs, on the same model), for batch sizes that need padding.
"""
from __future__ import annotations

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_torch_thread")     # tests/conftest.py

from minisys.engine.config import EngineConfig
from minisys.engine.cuda_graph import (CudaGraphSpec, UncheckedRope, capture_sizes, cuda_graph_spec,
                                       pick_bucket)
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.model_runner import ModelRunner
from minisys.engine.sampling_params import SamplingParams


def test_buckets_are_vllm_sizes_and_cover_the_batch_limit():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]
    sizes = capture_sizes(64)
    assert [pick_bucket(sizes, n) for n in (1, 3, 5, 9, 17, 33, 64, 65)] == [1, 4, 8, 16, 32, 48, 64, None]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from minisys.model import load
    return load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, quiet=True)


def test_unchecked_rope_is_the_models_rope(tiny):
    model, _ = tiny
    x = torch.randn(11, 6, model.config.head_dim)
    pos = torch.randint(0, model.config.max_position_embeddings, (11,))
    torch.testing.assert_close(UncheckedRope(model.rope)(x, pos), model.rope(x, pos), rtol=0, atol=0)


def _engine(model, tok, graphs: bool) -> tuple[LLMEngine, list[torch.Tensor], list[int]]:
    """An engine whose runner records every forward's logits (and the bucket of each graph step)."""
    cfg = EngineConfig(num_kv_blocks=40, block_size=16, max_num_seqs=8, max_model_len=200)
    engine = LLMEngine(model, tok, cfg)
    if graphs:
        engine.runner = ModelRunner(model, engine.config.num_kv_blocks, 16,
                                    CudaGraphSpec(max_num_seqs=8, max_model_len=200))
    log: list[torch.Tensor] = []
    buckets: list[int] = []
    forward = engine.runner.forward
    engine.runner.forward = lambda *a, **k: log.append(forward(*a, **k).clone()) or log[-1]
    if graphs:
        prepare = engine.runner.graphs.prepare
        engine.runner.graphs.prepare = lambda *a: buckets.append(prepare(*a)) or buckets[-1]
    return engine, log, buckets


def test_graph_steps_equal_eager_steps_across_padded_buckets(tiny):
    """7 sequences of different lengths finishing at different steps: batches of 7, 6, 4, 3, 2, 1 decode
    through buckets 8, 8, 4, 4, 2, 1; every step's logits match the eager engine's."""
    model, tok = tiny
    prompts = [[(7 * i + j) % 400 + 3 for j in range(5 + 9 * i)] for i in range(7)]   # 5..59 tokens
    max_tokens = [3, 6, 6, 8, 10, 12, 14]
    runs = {}
    for graphs in (False, True):
        engine, log, buckets = _engine(model, tok, graphs)
        for i, (p, n) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        outs = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
        runs[graphs] = (outs, log, buckets, engine)
    (eager_out, eager_log, _, _), (graph_out, graph_log, buckets, engine) = runs[False], runs[True]
    assert graph_out == eager_out
    assert len(graph_log) == len(eager_log)
    for a, b in zip(eager_log, graph_log):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert {8, 4, 2, 1} <= set(buckets), buckets                 # padded buckets were exercised
    runner = engine.runner
    assert runner.cache.num_blocks == engine.config.num_kv_blocks + 1      # + the scratch block
    assert runner.graphs.scratch_block == engine.config.num_kv_blocks
    assert engine.scheduler.allocator.num_free == engine.config.num_kv_blocks   # all freed; scratch never lent


def test_padding_rows_write_only_the_scratch_block(tiny):
    """After a padded step the pool differs from before only in the real rows' slots and the scratch block."""
    model, tok = tiny
    engine, _, buckets = _engine(model, tok, graphs=True)
    for i in range(3):
        engine.add_request(str(i), [5 + i, 6, 7, 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()                                                         # the prefills
    cache = engine.runner.cache
    before = cache.k.clone()
    engine.step()                                                         # one decode step: 3 rows in bucket 4
    assert buckets == [4]
    changed = (cache.k != before).flatten(2).any(-1)                      # (layers, blocks)
    blocks_changed = set(changed.any(0).nonzero().flatten().tolist())
    real = {b for t in engine.scheduler.allocator.tables.values() for b in t.block_ids}
    assert len(engine.scheduler.allocator.tables) == 3
    assert blocks_changed & real and blocks_changed - real == {engine.runner.graphs.scratch_block}


def test_enforce_eager_and_cpu_mean_no_graphs(tiny):
    model, _ = tiny
    cfg = EngineConfig(num_kv_blocks=8, max_num_seqs=4).resolve(model.config)
    assert cuda_graph_spec(cfg, model) is None                           # CPU: nothing to capture
    with pytest.raises(ValueError, match="enforce_eager must be a bool"):
        EngineConfig(enforce_eager="yes")
    from minisys.server.engine_args import add_engine_args, engine_config_from_args
    import argparse
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--enforce-eager"])).enforce_eager is True


def test_a_failed_capture_leaves_decode_eager_and_says_why(tiny, monkeypatch):
    import minisys.engine.model_runner as mr
    model, tok = tiny

    def broken(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(mr, "GraphRunner", broken)
    runner = ModelRunner(model, 8, 16, CudaGraphSpec(max_num_seqs=2, max_model_len=64))
    assert runner.graphs is None and "stream is capturing" in runner.graph_error
    cfg = EngineConfig(num_kv_blocks=8, max_num_seqs=2, max_model_len=64)
    engine = LLMEngine(model, tok, cfg)
    engine.runner = runner
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


class _DeviceOnly(torch.Tensor):
    """A tensor (and everything computed from it) whose values may not be read on the host: what a
    CUDA-graph capture forbids (``int(t)``, ``t.item()``, ``t.tolist()``, ``bool(t)`` synchronize)."""

    HOST_READS = (torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__bool__, torch.Tensor.__float__,
                  torch.Tensor.item, torch.Tensor.tolist)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST_READS:
            raise RuntimeError(f"host read of a static buffer during a graph step ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs)


def test_a_graph_step_reads_no_static_buffer_on_the_host(tiny):
    """The captured step must not sync on its inputs (a capture fails, and decode silently runs eagerly):
    on CPU the static forward runs with positions that refuse every host read, and still equals eager."""
    model, tok = tiny
    engine, log, buckets = _engine(model, tok, graphs=True)
    graphs = engine.runner.graphs
    graphs.positions = graphs.positions.as_subclass(_DeviceOnly)
    with pytest.raises(RuntimeError, match="host read"):                   # the guard itself works
        int(graphs.positions.max())
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert buckets == [1, 1]                                              # two decode steps, through the graph path
    eager, _, _ = _engine(model, tok, graphs=False)
    eager.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    want = []
    while eager.has_unfinished():
        want += [o for o in eager.step() if o.finished]
    assert outs[0].outputs[0].token_ids == want[0].outputs[0].token_ids
