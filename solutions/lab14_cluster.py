# %% [markdown]
# # Lab 14: Beyond one engine — routing requests over replicas
#
# Companion to `lessons/14-beyond-one-engine.md`. One engine on one device
# has a ceiling; past it you run **N replicas** of the same server and put a
# **router** in front (`python -m minisys serve --replicas 2`). The router's
# one decision is *where the next request goes*, and it makes it knowing
# only what each replica last reported (`GET /minisys/load`): its free KV
# blocks, its running and waiting requests, and the blocks its waiting
# queue will ask for. You will write:
#
# 1. **freeness** (`freeness`): Llumnix's measure of how much room a replica
#    has: its free KV blocks, net of what its queue will take, per running
#    sequence;
# 2. **the least-loaded choice** (`pick_least_loaded`): the replica of highest
#    freeness, with the router's tie-breaks;
#
# then replay a skewed workload (most answers short, a few very long) on
# a simulated pair of replicas, routed by round-robin and by your choice,
# to see why round-robin's p99 latency suffers when output lengths are
# long-tailed. Then the router's other tool, **live migration** (Llumnix):
# a running request moves to another replica while it keeps decoding,
# its KV blocks copied in rounds, the request stopped only for the last one
# (what `POST /minisys/cluster/migrate` and `/drain` do). You will write:
#
# 3. **the round plan** (`plan_copy_round`): which blocks go in the next
#    round, and whether it is the stop-and-copy;
# 4. **the rounds on a clock** (`simulate_migration`): how long is the
#    request stopped (the downtime), and how long does the whole move take?
#
#     python -m minisys labs start 14     # once: copies this notebook to work/14-cluster.ipynb
#     python -m minisys grade work/14-cluster.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import itertools
import math
import os
import random
from collections import deque
from dataclasses import dataclass

from minisys.cluster.policies import LoadReport

# %% [markdown]
# ## 1. What a replica reports
#
# Every replica answers `GET /minisys/load` with a small JSON object, read
# here into a `LoadReport`:
#
# | field | meaning |
# |---|---|
# | `free_blocks`, `total_blocks`, `block_size` | its KV pool (lesson 03): free blocks now, all blocks, tokens per block |
# | `running`, `waiting` | requests in its running batch, and in its queue (lesson 04) |
# | `queued_demand_blocks` | the blocks its waiting requests will take when admitted (their tokens, rounded up to blocks) |
#
# Free blocks alone mislead: a replica with 80 free blocks and a queue that
# will take 60 of them has 20 to offer. And blocks are shared: the same 100
# free blocks are a lot for one running sequence and little for ten, each of
# which grows by a token per step. **Llumnix** (Sun et al., OSDI 2024) names
# the measure *freeness*:
#
#     freeness = (free_blocks − queued_demand_blocks) / (running + 1)
#
# Llumnix writes it `F = (M − ΣV) / B`: memory less the *virtual usage*
# (what is used, plus what the queue will need), over the batch size. The
# router counts the request it is placing in the batch (`+ 1`), so an idle
# replica (running 0) beats one with a single sequence and the same free
# blocks. Freeness can be negative: the queue wants more than is free.
#
# Write `freeness(report)`.

# %%
def freeness(report: LoadReport) -> float:
    """Free KV blocks net of queued demand, per running sequence counting the newcomer."""
    ### BEGIN SOLUTION
    return (report.free_blocks - report.queued_demand_blocks) / (report.running + 1)
    ### END SOLUTION


# %% [markdown]
# ## 2. The least-loaded choice
#
# The router keeps a `LoadReport` per replica *in rotation* (a replica that
# died is not in the dict), keyed by the replica's index; indices need not be
# consecutive (`{0: ..., 2: ...}` after replica 1 died). Write
# `pick_least_loaded(loads)`: the index of the replica with the **highest
# freeness**; among equal freeness, the one with **fewer requests** (`running
# + waiting`); among those, the **lower index**. An empty dict is a
# `ValueError` (no replica to send to: the router answers 503).

# %%
def pick_least_loaded(loads: dict[int, LoadReport]) -> int:
    """The index of the replica of highest freeness; ties: fewer running + waiting, then the lower index."""
    ### BEGIN SOLUTION
    if not loads:
        raise ValueError("no replica in rotation")
    return min(loads, key=lambda i: (-freeness(loads[i]), loads[i].running + loads[i].waiting, i))
    ### END SOLUTION


# %% [markdown]
# ## 3. Why round-robin fails on long-tailed lengths
#
# Round-robin sends requests to the replicas in turn, blind to load. When
# every request costs the same, that is balanced. But answer lengths are
# long-tailed: most are a few dozen tokens, a few are hundreds. A replica that
# drew two long answers by chance holds their KV blocks and runs a bigger
# batch for a long time, and round-robin keeps sending it every other
# request; their first tokens wait behind the long ones while the other
# replica has room.
#
# The simulation below replays the same requests on two replicas, on a
# **step clock** (each engine step takes `step_s + per_seq_s × batch`
# seconds; a step gives each running sequence one token; a request is
# admitted when its whole prompt + answer fits in the free blocks and fewer
# than `max_num_seqs` run, first come first served, as a replica that
# reserves its answer's blocks would). It
# routes each arrival with a policy that sees the replicas' load reports at
# that moment. It needs no model: it is the router's problem alone.

# %%
@dataclass
class SimRequest:
    arrival: float
    prompt_len: int
    output_len: int


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def simulate(requests, choose, num_replicas=2, num_blocks=128, block_size=16, step_s=0.02, per_seq_s=0.008,
             max_num_seqs=8):
    """(ttft, e2el) per request, routed by ``choose(request, loads)``, on ``num_replicas`` replicas."""
    reps = [{"t": 0.0, "running": [], "waiting": deque(), "free": num_blocks} for _ in range(num_replicas)]
    pending = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival))
    ttft, e2el = [None] * len(requests), [None] * len(requests)

    def report(r):
        demand = sum(blocks_for(requests[i].prompt_len, block_size) for i in r["waiting"])
        return LoadReport(r["free"], num_blocks, block_size, len(r["running"]), len(r["waiting"]), demand)

    while pending or any(r["running"] or r["waiting"] for r in reps):
        rep = min(reps, key=lambda r: r["t"] if (r["running"] or r["waiting"]) else float("inf"))
        now = rep["t"] if (rep["running"] or rep["waiting"]) else requests[pending[0]].arrival
        while pending and requests[pending[0]].arrival <= now:           # route what has arrived by now
            i = pending.popleft()
            target = reps[choose(requests[i], {k: report(r) for k, r in enumerate(reps)})]
            target["waiting"].append(i)
            target["t"] = max(target["t"], requests[i].arrival)
        if not (rep["running"] or rep["waiting"]):
            continue
        while rep["waiting"] and len(rep["running"]) < max_num_seqs:     # admit FCFS while the blocks fit
            req = requests[rep["waiting"][0]]
            need = blocks_for(req.prompt_len + req.output_len, block_size)
            if need > rep["free"]:
                break
            rep["free"] -= need
            rep["running"].append([rep["waiting"].popleft(), 0])
        rep["t"] += step_s + per_seq_s * len(rep["running"])
        for seq in list(rep["running"]):
            i, done = seq
            seq[1] = done + 1
            if done == 0:
                ttft[i] = rep["t"] - requests[i].arrival
            if seq[1] == requests[i].output_len:
                e2el[i] = rep["t"] - requests[i].arrival
                rep["running"].remove(seq)
                rep["free"] += blocks_for(requests[i].prompt_len + requests[i].output_len, block_size)
    return ttft, e2el


def skewed_workload(n, rate, long_fraction=0.15, seed=0):
    """Poisson arrivals; prompts of 32-128 tokens; answers 8-32 tokens, except a long tail of 200-400."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        span = (200, 400) if rng.random() < long_fraction else (8, 32)
        out.append(SimRequest(t, rng.randint(32, 128), rng.randint(*span)))
    return out


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def round_robin():
    turn = itertools.count()
    return lambda req, loads: sorted(loads)[next(turn) % len(loads)]


def least_loaded(req, loads):
    return pick_least_loaded(loads)


# %% tags=["benchmark"]
quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
n = 600 if quick else 2000
print(f"{n} requests, 2 replicas of 128 blocks, at most 8 running each; p99 in seconds (step clock)")
print(f"{'rate/s':>7} {'policy':>13} {'p99 TTFT':>9} {'p99 E2EL':>9}")
results = {}
for rate in (1.0, 1.5, 2.0):
    for name, policy in (("round_robin", round_robin()), ("least_loaded", least_loaded)):
        ttft, e2el = simulate(skewed_workload(n, rate), policy)
        results[rate, name] = (p99(ttft), p99(e2el))
        print(f"{rate:7.1f} {name:>13} {p99(ttft):9.2f} {p99(e2el):9.2f}")

# %% tags=["benchmark"]
from matplotlib.figure import Figure  # noqa: E402
from IPython.display import display  # noqa: E402

fig = Figure(figsize=(9, 3.4))
axes = fig.subplots(1, 2)
rates = sorted({r for r, _ in results})
for ax, k, label in ((axes[0], 0, "p99 TTFT (s)"), (axes[1], 1, "p99 E2EL (s)")):
    for name, style in (("round_robin", "o--"), ("least_loaded", "s-")):
        ax.plot(rates, [results[r, name][k] for r in rates], style, label=name)
    ax.set(xlabel="arrival rate (requests/s)", ylabel=label)
    ax.legend()
fig.tight_layout()
display(fig)

# %% [markdown]
# Read the table. At low load both policies are fine: neither replica is
# ever full. As the rate rises, round-robin's p99 time to first token grows
# first: a short request lands behind two long ones whose blocks fill its
# replica, while the other replica idles. The least-loaded router sees the
# queued demand and the batch, and sends it where there is room. The mean
# moves much less than the tail: long-tailed lengths hurt the tail.
#
# Now the real thing, on this machine (2 replicas of SmolLM2, 1 thread each,
# the three policies side by side; a few minutes):
#
#     python -m minisys bench cluster --part a --quick
#
# Try, in the simulation: `long_fraction=0.0` (every answer short): does
# round-robin still lose? `num_blocks=1000` (memory never binds): which
# term of freeness does the work then?

# %% [markdown]
# The router's other tool, when a replica is overloaded or must go away
# (a spot instance's preemption notice, SpotServe): move a running request
# to another replica. minisys runs the plan below between two real engines
# (`minisys/cluster/migration.py`, over torch.distributed); the router
# calls it (`POST /minisys/cluster/migrate {"request_id": ..., "dst": 1}`,
# `POST /minisys/cluster/drain {"replica": 0}`) and follows the stream to
# its new replica, so the client sees one stream.

# %% [markdown]
# ## 4. Live migration: which blocks go in the next round
#
# A request's K/V live in `ceil(num_computed_tokens / block_size)` blocks; the
# first `num_computed_tokens // block_size` are **full**, and a full block never
# changes again, so it can be copied while the request goes on decoding (the
# partial last block is still being written). Blocks `0 .. num_copied_blocks-1`
# went in earlier rounds (always full ones).
#
# The rule: if at most `stop_threshold_blocks` blocks are left to copy (or
# `force_final`), this is the **final** round: the request is stopped and *all*
# remaining blocks go, the partial one included. Otherwise copy every full block
# not copied yet (maybe none, if no block filled since the last round).
#
# Return `(block_indices, final)`: the indices (into the request's block table,
# ascending) and whether the request stops for this round.

# %%
def plan_copy_round(num_computed_tokens: int, block_size: int, num_copied_blocks: int,
                    stop_threshold_blocks: int = 1, force_final: bool = False) -> tuple[list[int], bool]:
    """The next migration round: (block indices to copy, is it the stop-and-copy)."""
    ### BEGIN SOLUTION
    num_full = num_computed_tokens // block_size
    num_blocks = -(-num_computed_tokens // block_size)
    if force_final or num_blocks - num_copied_blocks <= stop_threshold_blocks:
        return list(range(num_copied_blocks, num_blocks)), True
    return list(range(num_copied_blocks, num_full)), False
    ### END SOLUTION


# %% tags=["benchmark"]
print(plan_copy_round(37, 16, 0))      # 2 full blocks, 1 partial: copy the 2 full ones
print(plan_copy_round(40, 16, 2))      # only the partial block left: stop and copy it

# %% [markdown]
# ## 5. The rounds on a clock
#
# Copying `b` blocks takes `b * seconds_per_block`. Meanwhile the request
# decodes one token every `seconds_per_token` (keep the fractional progress:
# after a round of `t` seconds, `num_computed_tokens` has grown by
# `t / seconds_per_token`; plan with its integer part). Run rounds with your
# plan until the final one; round number `max_rounds` is forced final (a
# request decoding faster than the copy would never converge).
#
# Return `(round_blocks, downtime_s, total_s)`: blocks copied per round, the
# final round's duration (the request is stopped only then), and the time from
# the first round's start to the final round's end.

# %%
def simulate_migration(num_computed_tokens: int, block_size: int, seconds_per_block: float,
                       seconds_per_token: float, stop_threshold_blocks: int = 1,
                       max_rounds: int = 8) -> tuple[list[int], float, float]:
    """Llumnix's rounds on a clock: (blocks per round, downtime in s, total time in s)."""
    ### BEGIN SOLUTION
    clock, copied, progress, rounds = 0.0, 0, float(num_computed_tokens), []
    while True:
        blocks, final = plan_copy_round(int(progress), block_size, copied, stop_threshold_blocks,
                                        force_final=len(rounds) + 1 >= max_rounds)
        took = len(blocks) * seconds_per_block
        rounds.append(len(blocks))
        if final:
            return rounds, took, clock + took
        clock += took
        copied += len(blocks)
        progress += took / seconds_per_token
    ### END SOLUTION


# %% tags=["benchmark"]
# SmolLM2 on this machine: ~46 KB of fp32 K/V per token, 16 tokens a block, a transport of ~0.5 GB/s
# (lesson 14's measurement) -> ~1.5 ms a block; decoding ~30 ms a token.
per_block = 16 * 46_080 / 0.5e9
for tokens in (256, 2048, 16384):
    rounds, down, total = simulate_migration(tokens, 16, per_block, 0.030)
    _, stop_all, _ = simulate_migration(tokens, 16, per_block, 0.030, stop_threshold_blocks=math.inf)
    print(f"{tokens:>6} tokens: rounds {rounds}, downtime {down * 1000:.1f} ms "
          f"(stop-and-copy of everything: {stop_all * 1000:.1f} ms), total {total * 1000:.1f} ms")

# %% tags=["benchmark"]
from minisys.cluster.migration import plan_copy_round as minisys_plan

same = all(plan_copy_round(c, 4, k, t) == (minisys_plan(c, 4, k, t).block_indices, minisys_plan(c, 4, k, t).final)
           for c in range(1, 40) for k in range(c // 4 + 1) for t in (1, 2))
print("your plan is minisys's plan:", same)
