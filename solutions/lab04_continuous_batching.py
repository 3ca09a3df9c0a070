# %% [markdown]
# # Lab 04: Continuous batching
#
# Companion to `lessons/04-continuous-batching.md`. Static batching runs a
# fixed batch until its longest request ends: finished rows keep burning
# compute and waiting requests cannot take their place. Orca's
# **iteration-level scheduling** decides again at every step who runs;
# vLLM adds **admission under a KV-block budget** and **preemption by
# recompute** when the blocks run out. You will write the two pieces of
# minisys's engine that carry the idea:
#
# 1. **the scheduler's step decision** (`schedule`): decode the running
#    requests, preempting the newest when no block is free; admit waiting
#    requests while `max_num_seqs`, the token budget and the blocks allow;
# 2. **the batch assembly** (`build_batch`): the flat batch of one step —
#    token ids, positions, KV slots, logits indices — for one forward over
#    prefills and decodes together.
#
# The last cells plug your `schedule` into the real `LLMEngine`, serve a
# workload with SmolLM2 and compare throughput and per-request latency with
# static batching and the eager baseline as the batch limit grows.
#
#     python -m minisys labs start 04     # once: copies this notebook to work/04-continuous-batching.ipynb
#     python -m minisys grade work/04-continuous-batching.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import os
import time

import torch

from minisys.engine.config import EngineConfig
from minisys.engine.request import RequestStatus
from minisys.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

# %% [markdown]
# ## 1. The step decision
#
# `sched` is a minisys `Scheduler`. You use its state and two primitives:
#
# * `sched.running` — running requests in admission order (oldest first);
#   `sched.waiting` — a deque of waiting requests (head first);
# * `sched.allocator` — the block allocator of lesson 03:
#   `append_slot(req.request_id, token)` reserves the slot of one more token
#   and returns a falsy `Refusal` when no block is free (nothing changed);
#   `allocate(req.request_id, token_ids)` gives a sequence blocks for all its
#   tokens (falsy when they do not fit; `.num_cached_tokens` = prefix-cache hit);
# * `sched.config.max_num_seqs`, `sched.config.max_num_batched_tokens`;
# * `sched.preempt(req, out)` — frees `req`'s blocks, keeps its tokens,
#   puts it at the head of `sched.waiting` and records it in `out.preempted`.
#
# Write `schedule(sched)` returning a `SchedulerOutput` whose `scheduled` lists
# `ScheduledRequest(req, num_tokens)`:
#
# **Decode.** For each running request, oldest first: reserve a slot for the
# token it feeds, `req.all_token_ids[-1]`. While that is refused, preempt the
# *newest* running request still in line (it has waited least; recomputing it
# is cheapest); if the request itself is the newest left, preempt it and move
# on. A request that got its slot runs 1 token; append the `(src, dst)` of a
# copy-on-write (`res.copy`) to `out.block_copies`. `sched.running` becomes the
# requests that kept running, in the same order.
#
# **Admit** (only if nothing was preempted this step). The token budget is
# `max_num_batched_tokens` minus the decode tokens. While `sched.waiting` is
# not empty and fewer than `max_num_seqs` run: look at the head; stop if its
# `req.num_tokens` exceeds the remaining budget or `allocate` refuses it
# (first come, first served: nobody jumps the queue). Otherwise pop it, set
# `req.num_computed_tokens = alloc.num_cached_tokens`, move it to RUNNING with
# `req.transition(RequestStatus.RUNNING)`, append it to `sched.running`, and
# schedule its `req.num_tokens - req.num_computed_tokens` tokens.

# %%
def schedule(sched: Scheduler) -> SchedulerOutput:
    """One step's decision: decodes (with preemption), then admissions."""
    out = SchedulerOutput()
    ### BEGIN SOLUTION
    line = list(sched.running)
    kept = []
    while line:
        req = line.pop(0)
        while not (res := sched.allocator.append_slot(req.request_id, req.all_token_ids[-1])):
            if line:
                sched.preempt(line.pop(), out)
            else:
                sched.preempt(req, out)
                break
        else:
            if res.copy is not None:
                out.block_copies.append(res.copy)
            kept.append(req)
            out.scheduled.append(ScheduledRequest(req, 1))
    sched.running = kept
    if out.preempted:
        return out
    budget = sched.config.max_num_batched_tokens - len(kept)
    while sched.waiting and len(sched.running) < sched.config.max_num_seqs:
        req = sched.waiting[0]
        if req.num_tokens > budget:
            break
        alloc = sched.allocator.allocate(req.request_id, req.all_token_ids)
        if not alloc:
            break
        sched.waiting.popleft()
        req.num_computed_tokens = alloc.num_cached_tokens
        req.transition(RequestStatus.RUNNING)
        sched.running.append(req)
        n = req.num_tokens - req.num_computed_tokens
        budget -= n
        out.scheduled.append(ScheduledRequest(req, n))
    ### END SOLUTION
    return out


# %% tags=["benchmark"]
from minisys.engine.request import Request
from minisys.engine.sampling_params import SamplingParams

demo = Scheduler(EngineConfig(block_size=4, num_kv_blocks=6, max_num_seqs=4, max_num_batched_tokens=64,
                              max_model_len=64, enable_prefix_caching=False, enable_chunked_prefill=False))
for i in range(3):
    demo.add(Request(f"r{i}", list(range(10 * i, 10 * i + 8)), SamplingParams(max_tokens=8), max_tokens=8))
for step in range(3):
    out = schedule(demo)
    demo.update_computed(out)
    for s in out.scheduled:
        s.request.output_token_ids.append(1)
    print(f"step {step}: ran {[(s.request.request_id, s.num_tokens) for s in out.scheduled]}, "
          f"preempted {[r.request_id for r in out.preempted]}, free blocks {demo.allocator.num_free}")

# %% [markdown]
# ## 2. The batch assembly
#
# The model's forward takes one flat batch. For each `ScheduledRequest(req,
# n)` in order, the fed tokens are positions `start = req.num_computed_tokens`
# to `start + n - 1` of `req.all_token_ids`. Their K/V go to slots of the
# request's block table `allocator.tables[req.request_id].block_ids`
# (`slot = table[pos // bs] * bs + pos % bs`, `bs = allocator.block_size`).
# The LM head runs only at each request's **last** fed token: its row in the
# flat batch is the logits index.
#
# Return a dict of lists: `input_ids`, `positions`, `slot_mapping` (one per
# fed token), `seqlens_q` (n per request), `context_lens` (start per request)
# and `logits_indices` (one per request).

# %%
def build_batch(scheduled: list, allocator) -> dict:
    """The flat batch of one step as lists."""
    ### BEGIN SOLUTION
    b = {k: [] for k in ("input_ids", "positions", "slot_mapping", "seqlens_q", "context_lens", "logits_indices")}
    bs = allocator.block_size
    for s in scheduled:
        req, start = s.request, s.request.num_computed_tokens
        table = allocator.tables[req.request_id].block_ids
        b["input_ids"] += req.all_token_ids[start:start + s.num_tokens]
        b["positions"] += list(range(start, start + s.num_tokens))
        b["slot_mapping"] += [table[p // bs] * bs + p % bs for p in range(start, start + s.num_tokens)]
        b["seqlens_q"].append(s.num_tokens)
        b["context_lens"].append(start)
        b["logits_indices"].append(len(b["input_ids"]) - 1)
    return b
    ### END SOLUTION


# %% tags=["benchmark"]
demo2 = Scheduler(EngineConfig(block_size=4, num_kv_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                               max_model_len=64, enable_chunked_prefill=False))
demo2.add(Request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4), max_tokens=4))
first = schedule(demo2)
demo2.update_computed(first)
first.scheduled[0].request.output_token_ids.append(42)
demo2.add(Request("b", [1, 2, 3], SamplingParams(max_tokens=4), max_tokens=4))
print(build_batch(schedule(demo2).scheduled, demo2.allocator))   # a decodes 42 while b prefills

# %% [markdown]
# ## 3. Your scheduler in the real engine
#
# `LLMEngine` calls `engine.scheduler.schedule()` every step. Replace it with
# yours, serve a workload shaped like nano-vllm's benchmark (random prompt
# and output lengths, `ignore_eos`, temperature 0.6), and compare with static
# batching (fixed batches that wait for their longest request) and with the
# eager baseline (one request at a time) as the batch limit grows.

# %% tags=["benchmark"]
from minisys.bench.throughput import make_workload, params_for
from minisys.engine.eager import EagerGenerator
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.static_batching import StaticBatchGenerator
from minisys.model import load

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
model, tokenizer = load(device="cpu", attention_backend="paged", quiet=True)
work = make_workload(6 if quick else 32, 4 if quick else 8, 12 if quick else 128, seed=1)
out_tokens = sum(n for _, n in work)


def serve(max_num_seqs):
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, num_kv_blocks=512,
                                                      enable_chunked_prefill=False))   # prefill-first, like yours
    engine.scheduler.schedule = lambda: schedule(engine.scheduler)          # your scheduler
    t0, done = time.perf_counter(), {}
    for i, ((p, _), sp) in enumerate(zip(work, params_for(work))):
        engine.add_request(str(i), p, sp)
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = time.perf_counter() - t0
    return time.perf_counter() - t0, sorted(done.values())


def serve_static(batch):
    gen = StaticBatchGenerator(model, tokenizer, batch)
    t0 = time.perf_counter()
    gen.generate([p for p, _ in work], params_for(work))
    return time.perf_counter() - t0


eager = EagerGenerator(model, tokenizer)
t0 = time.perf_counter()
for (p, _), sp in list(zip(work, params_for(work)))[:1 if quick else 4]:
    eager.generate(p, sp)
eager_tps = sum(n for _, n in work[:1 if quick else 4]) / (time.perf_counter() - t0)
limits = [1, 6] if quick else [1, 4, 8, 16, 32]
results = {}
for m in limits:
    secs, lat = serve(m)
    results[m] = {"engine": out_tokens / secs, "static": out_tokens / serve_static(m), "latency": lat}
    print(f"max_num_seqs {m:3d}: engine {results[m]['engine']:7.1f} tok/s, static {results[m]['static']:7.1f} "
          f"tok/s, eager {eager_tps:6.1f} tok/s, median latency {lat[len(lat) // 2]:.1f} s")

# %% tags=["benchmark"]
import matplotlib.pyplot as plt

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax1.plot(limits, [results[m]["engine"] for m in limits], "o-", label="continuous batching (yours)")
ax1.plot(limits, [results[m]["static"] for m in limits], "s--", label="static batching")
ax1.axhline(eager_tps, color="gray", ls=":", label="eager")
ax1.set(xlabel="batch limit (max_num_seqs)", ylabel="output tokens/s", title="throughput")
ax1.legend()
for m in limits:
    ax2.plot(results[m]["latency"], [(i + 1) / len(work) for i in range(len(work))], label=f"max_num_seqs={m}")
ax2.set(xlabel="request latency (s)", ylabel="fraction of requests done", title="per-request latency (CDF)")
ax2.legend()
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab04_throughput.png")
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/
