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
# and then replay a skewed workload (most answers short, a few very long) on
# a simulated pair of replicas, routed by round-robin and by your choice,
# to see why round-robin's p99 latency suffers when output lengths are
# long-tailed.
#
#     python -m minisys labs start 14     # once: copies this notebook to work/14-cluster.ipynb
#     python -m minisys grade work/14-cluster.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import itertools
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
