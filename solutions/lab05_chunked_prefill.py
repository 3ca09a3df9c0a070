# %% [markdown]
# # Lab 05: Chunked prefill
#
# Companion to `lessons/05-chunked-prefill.md`. In lesson 04's engine a new
# prompt is prefilled whole in one step, and every request that is decoding
# waits for that step: a 1,500-token prompt on a laptop CPU holds every
# running chat for seconds (the **generation stall**). Sarathi-Serve gives
# each step a **token budget**: the decodes go first (one token each), and
# what is left of the budget goes to *chunks* of the prompts waiting to be
# prefilled, so no step is much longer than a decode step. You will write:
#
# 1. **the split** (`split_budget`): how one step's budget is shared between
#    decodes and prefill chunks;
# 2. **the chunked scheduler** (`schedule_chunked`): running prefills continue
#    with their next chunk, waiting requests are admitted with a first chunk,
#    and any prompt may be cut over many steps.
#
# The last cells plug your scheduler into the real `LLMEngine`, replay an
# online workload (Poisson arrivals, short chats and long prompts) in wall
# clock time, and plot p99 inter-token latency and p99 time to first token
# against the budget, beside the prefill-first baseline.
#
#     python -m minisys labs start 05     # once: copies this notebook to work/05-chunked-prefill.ipynb
#     python -m minisys grade work/05-chunked-prefill.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import os

import torch

from minisys.engine.config import EngineConfig
from minisys.engine.request import Request, RequestStatus
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

# %% [markdown]
# ## 1. Splitting the budget
#
# One step may feed at most `budget` tokens (`max_num_batched_tokens`). The
# `num_decodes` running requests that decode take one token each, first: a
# decode is never delayed by a prompt. The prompts being prefilled are in
# line, oldest first; `remaining[i]` is how many prompt tokens prefill `i`
# still has to compute. Give each, in order, `min(remaining[i], what is left
# of the budget)` tokens: the first prompts get all they need, one prompt is
# cut (its *chunk*), the rest get 0 this step.
#
# Return the list of chunk sizes (one per entry of `remaining`). Raise
# `ValueError` if the decodes alone do not fit the budget.

# %%
def split_budget(budget: int, num_decodes: int, remaining: list[int]) -> list[int]:
    """Chunk sizes of the prefills in line after `num_decodes` one-token decodes."""
    ### BEGIN SOLUTION
    if num_decodes > budget:
        raise ValueError(f"{num_decodes} decodes do not fit a budget of {budget}")
    left, chunks = budget - num_decodes, []
    for r in remaining:
        chunks.append(min(r, left))
        left -= chunks[-1]
    return chunks
    ### END SOLUTION


# %% tags=["benchmark"]
print(split_budget(256, 8, [1500]))            # a long prompt: a 248-token chunk beside 8 decodes
print(split_budget(16, 2, [5, 20, 7]))         # 5 whole, 9 of 20, nothing for the third yet

# %% [markdown]
# ## 2. The chunked scheduler
#
# `sched` is a minisys `Scheduler` with `enable_chunked_prefill=True`. The
# decode phase is given: `decode_running(sched, out)` gives every decoding
# request its slot (preempting the newest on a block shortage, as in lab 04),
# appends `ScheduledRequest(req, 1)` for each to `out.scheduled`, and returns
# the running requests that are **still prefilling** (oldest first). Their
# blocks were all reserved at admission, so a chunk never needs a new block.
#
# Write `schedule_chunked(sched)`:
#
# 1. the budget left is `sched.config.max_num_batched_tokens` minus the decodes;
# 2. each prefilling request gets its next chunk (use `split_budget`; a
#    request's remaining tokens are `req.num_tokens - req.num_computed_tokens`;
#    schedule only nonzero chunks);
# 3. then, **only if nothing was preempted this step**, admit waiting
#    requests first come first served while budget is left and fewer than
#    `max_num_seqs` run: `alloc = sched.allocator.allocate(req.request_id,
#    req.all_token_ids)` reserves blocks for the whole prompt (stop at the first
#    refusal: nobody jumps the queue); pop it, set `req.num_computed_tokens =
#    alloc.num_cached_tokens`, `req.transition(RequestStatus.RUNNING)`, append
#    it to `sched.running`, and schedule a first chunk of
#    `min(its remaining tokens, budget left)`.
#
# The engine samples a token only for requests whose chunk reaches their
# last known token; the others just write their K/V.

# %%
def decode_running(sched: Scheduler, out: SchedulerOutput) -> list:
    """Schedule the decodes (with preemption); return the running requests still prefilling."""
    return sched._schedule_running(out)


def schedule_chunked(sched: Scheduler) -> SchedulerOutput:
    """One step: decodes first, then prefill chunks of running and newly admitted requests."""
    out = SchedulerOutput()
    prefilling = decode_running(sched, out)
    ### BEGIN SOLUTION
    budget = sched.config.max_num_batched_tokens - len(out.scheduled)
    chunks = split_budget(budget, 0, [r.num_tokens - r.num_computed_tokens for r in prefilling])
    for req, n in zip(prefilling, chunks):
        if n:
            out.scheduled.append(ScheduledRequest(req, n))
    budget -= sum(chunks)
    if out.preempted:
        return out
    while budget > 0 and sched.waiting and len(sched.running) < sched.config.max_num_seqs:
        req = sched.waiting[0]
        alloc = sched.allocator.allocate(req.request_id, req.all_token_ids)
        if not alloc:
            break
        sched.waiting.popleft()
        req.num_computed_tokens = alloc.num_cached_tokens
        req.transition(RequestStatus.RUNNING)
        sched.running.append(req)
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        budget -= n
        out.scheduled.append(ScheduledRequest(req, n))
    ### END SOLUTION
    return out


# %% tags=["benchmark"]
demo = Scheduler(EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=8,
                              max_model_len=64, enable_chunked_prefill=True))
demo.add(Request("chat", [1, 2, 3, 4, 5], SamplingParams(max_tokens=8), max_tokens=8))
for step in range(5):
    if step == 1:
        demo.add(Request("long", list(range(20, 40)), SamplingParams(max_tokens=2), max_tokens=2))
    out = schedule_chunked(demo)
    sampled = [s.request for s in out.scheduled if s.samples]
    demo.update_computed(out)
    for r in sampled:
        r.output_token_ids.append(7)
    print(f"step {step}: {[(s.request.request_id, s.num_tokens) for s in out.scheduled]}, "
          f"{out.num_tokens} tokens, sampled {[r.request_id for r in sampled]}")

# %% [markdown]
# ## 3. Your scheduler online: the stall, measured
#
# `run_online` (from `minisys/bench/chunked.py`) replays a workload in wall
# clock time: requests arrive as a Poisson process, each is added when its
# arrival time has passed, and every step output with new tokens is
# time-stamped. From those times `summarize` computes vLLM's metrics: TTFT
# (arrival to first token), ITL (the gaps between tokens), TPOT and goodput.
# We replay the same arrivals with the prefill-first engine (lesson 04) and
# with yours at a few budgets: the workload and budgets of
# `python -m minisys bench chunked` (its quick size under `MINISYS_QUICK=1`). Watch p99 ITL fall with the budget while TTFT
# of the long prompts grows.

# %% tags=["benchmark"]
from minisys.bench.chunked import compare, defaults, engine_config, make_online_workload, run_online
from minisys.bench.metrics import summarize
from minisys.engine.llm_engine import LLMEngine
from minisys.model import load

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
model, tokenizer = load(device="cpu", attention_backend="paged", quiet=True)
spec, budgets, _, _, slo = defaults(quick)          # the workload of `python -m minisys bench chunked`
print(spec, budgets, slo)
work = make_online_workload(spec)


def replay(budget):
    engine = LLMEngine(model, tokenizer, engine_config(work, budget))
    if budget is not None:
        engine.scheduler.schedule = lambda: schedule_chunked(engine.scheduler)      # your scheduler
    traces, duration = run_online(engine, work)
    res = summarize(traces, duration, slo)
    res["budget"] = budget
    return res


results = {"prefill-first": replay(None)}
for b in budgets:
    results[f"chunked-{b}"] = replay(b)
for name, r in results.items():
    print(f"{name:>14}: p99 ITL {r['p99_itl_ms']:7.0f} ms, p99 TTFT {r['p99_ttft_ms']:7.0f} ms, "
          f"{r['output_throughput']:5.1f} out tok/s, goodput {r['goodput']:.2f} req/s")
print(compare(results))

# %% tags=["benchmark"]
import matplotlib.pyplot as plt

base = results["prefill-first"]
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, key, label in ((axes[0], "p99_itl_ms", "p99 inter-token latency (ms)"),
                       (axes[1], "p99_ttft_ms", "p99 time to first token (ms)")):
    ax.plot(budgets, [results[f"chunked-{b}"][key] for b in budgets], "o-", label="chunked prefill (yours)")
    ax.axhline(base[key], color="tab:red", ls="--", label="prefill-first")
    ax.set(xscale="log", xlabel="token budget per step", ylabel=label)
    ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.legend()
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab05_chunked_prefill.png")
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/
