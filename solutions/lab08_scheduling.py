# %% [markdown]
# # Lab 08: Who goes next — fair share (VTC) and quality of experience (Andes)
#
# Companion to `lessons/08-scheduling.md`. Lessons 04–05 built the mechanics
# of a serving step (seats, KV blocks, the token budget, preemption by
# recompute) and always served **first come, first served**. This lab swaps
# the one thing FCFS decides — *who goes next* — through minisys's policy
# interface, `SchedulingPolicy` (`minisys/scheduling/policy.py`), and plugs
# your policies into the real `Scheduler`. You will write:
#
# 1. **the virtual token counter** (`VTC`, Sheng et al., OSDI 2024): a counter
#    per client of the service it got, admission to the backlogged client
#    with the smallest counter, and the *lift* that keeps idle time from
#    being banked;
# 2. **the QoE of a streamed answer** (`qoe`, Andes, Liu et al. 2024): how
#    much of the text a reader expected to be reading they actually could;
# 3. **Andes' greedy choice** (`Andes`): serve the reader whose next token is
#    due soonest, and pause one who is far ahead of their reader.
#
# The last cells replay a heavy and a light client under FCFS and your VTC,
# and a burst of readers under FCFS and your Andes, on the scheduler alone
# with a step clock (no model: the numbers are exact and repeat), then run
# your Andes once inside the real `LLMEngine`.
#
#     python -m minisys labs start 08     # once: copies this notebook to work/08-scheduling.ipynb
#     python -m minisys grade work/08-scheduling.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import os

from minisys.engine.config import EngineConfig
from minisys.engine.request import Request
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import Scheduler
from minisys.scheduling.policy import SchedulingPolicy
from minisys.scheduling.qoe import QoESpec

# %% [markdown]
# ## 0. The interface, and a scheduler without a model
#
# The scheduler calls a policy at a few points of its one code path
# (`minisys/engine/scheduler.py`):
#
# | hook | called | FCFS (`SchedulingPolicy`) |
# |---|---|---|
# | `on_arrival(req, waiting)` | in `Scheduler.add`, after `req` joined `waiting` | nothing |
# | `pick(waiting)` | each admission try (`_admit_waiting_chunked`) and in `_displace` | `waiting[0]` |
# | `order_running(running)` | start of `_schedule_running`; a block shortage preempts from the end | admission order |
# | `displace(candidate, running)` | `_displace`, when `preempts_for_waiting` and the pick does not fit | `None` |
# | `charge(req, prefill, decode)` | `_put`, as each request is scheduled | nothing |
# | `on_finish(req)` | `Scheduler.finish` | nothing |
#
# `waiting` is a `WaitingQueue`: iterate it head first; `waiting.clients()`
# lists the clients with at least one waiting request (the *backlogged*
# clients) and `waiting.num_waiting(c)` counts client `c`'s. A request
# carries `req.client_key` (its client, `""` when none), `req.arrival` (its
# admission-order number), `req.arrival_time` (the scheduler's clock when it
# was added), `req.output_token_ids` and `req.qoe` (a `QoESpec` or `None`).
#
# `simulate` below drives a real `Scheduler` step by step with a fake model
# (every sampling request gets token 7) and a **step clock**: each step takes
# `dt` seconds of virtual time. It records what each step scheduled, so the
# service each client received is measured from what ran, not from any
# policy's own counters.

# %%
def lab_config(**kw) -> EngineConfig:
    """A small engine: 4 seats, 32 tokens per step, chunked prefill (lesson 05)."""
    base = dict(block_size=4, num_kv_blocks=128, max_num_seqs=4, max_num_batched_tokens=32,
                max_model_len=128, enable_chunked_prefill=True)
    base.update(kw)
    return EngineConfig(**base)


class StepClock:
    """Virtual seconds: ``dt`` per scheduler step."""

    def __init__(self, dt: float = 0.05) -> None:
        self.now, self.dt = 0.0, dt

    def __call__(self) -> float:
        return self.now


def simulate(make_policy, arrivals, config=None, dt=0.05, max_steps=3000):
    """Replay ``arrivals`` = [(step, client, prompt_len, max_tokens), ...] on a `Scheduler` whose
    policy is ``make_policy(clock)``. Returns a dict: per-step ``service`` {client: weighted
    tokens} (prompt x 1 + decode x 2) and ``backlogged`` client sets, each request's
    ``arrival``/``token_times``, and the number of ``steps`` and ``preemptions``."""
    config = config or lab_config()
    clock = StepClock(dt)
    sched = Scheduler(config, clock=clock, policy=make_policy(clock))
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    reqs, times, service, backlogged, k, step = {}, {}, [], [], 0, 0
    while step < max_steps and (k < len(pending) or sched.has_unfinished()):
        while k < len(pending) and pending[k][1][0] <= step:
            i, (_, client, n_prompt, n_out) = pending[k]
            r = Request(str(i), [1 + (i + j) % 50 for j in range(n_prompt)],
                        SamplingParams(max_tokens=n_out), max_tokens=n_out, client=client)
            sched.add(r)
            reqs[r.request_id], times[r.request_id], k = r, [], k + 1
        backlogged.append({r.client_key for r in sched.waiting})
        out = sched.schedule()
        served, sampled = {}, []
        for s in out.scheduled:
            c = s.request.client_key
            served[c] = served.get(c, 0.0) + (1.0 if s.is_prefill else 2.0) * s.num_tokens
            if s.samples:
                sampled.append(s.request)
        service.append(served)
        sched.update_computed(out)
        clock.now += dt
        for r in sampled:
            r.output_token_ids.append(7)
            times[r.request_id].append(clock.now)
            if len(r.output_token_ids) >= r.max_tokens:
                sched.finish(r, "length")
        step += 1
    return {"service": service, "backlogged": backlogged, "steps": step,
            "preemptions": sched.num_preemptions, "token_times": times,
            "arrival": {rid: r.arrival_time for rid, r in reqs.items()}}


# %% [markdown]
# ## 1. The virtual token counter (VTC)
#
# Every client `u` has a counter `c_u`: the service it has received, in
# weighted tokens (each prompt token computed costs `w_in`, each decode token
# `w_out`; the paper's defaults 1 and 2). Write the three rules:
#
# - **`charge(req, prefill_tokens, decode_tokens)`**: add
#   `w_in * prefill_tokens + w_out * decode_tokens` to the counter of
#   `req.client_key`. The scheduler calls it as each request is scheduled,
#   prompt chunk by prompt chunk, so the counter follows service as it runs.
# - **`pick(waiting)`**: the earliest waiting request (queue order) of the
#   backlogged client with the **smallest** counter; ties go to the request
#   nearest the head of the queue. Remember the picked client in
#   `self.last_picked`.
# - **`on_arrival(req, waiting)`** (the **lift**): `req` is already in
#   `waiting`. If its client already had a waiting request, nothing changes.
#   Otherwise the client just became backlogged: raise its counter to at
#   least the smallest counter among the *other* backlogged clients; if no
#   other client is backlogged, to at least the counter of the client picked
#   last (`self.last_picked`, if any and not this client). Never lower a
#   counter.
#
# Without the lift a client that stayed away while others were served would
# come back with a small counter and take every admission until it caught up.

# %%
class VTC(SchedulingPolicy):
    """Fair share per client by the virtual token counter (use: ``Scheduler(config, policy=VTC(clock))``)."""

    name = "vtc (yours)"

    def __init__(self, clock, w_in: float = 1.0, w_out: float = 2.0) -> None:
        super().__init__(clock)
        self.w_in, self.w_out = w_in, w_out
        self.counters: dict[str, float] = {}       # c_u
        self.last_picked: str | None = None

    def counter(self, client: str) -> float:
        return self.counters.get(client, 0.0)

    def order_running(self, running):
        """On a block shortage, preempt the newest request of the client with the largest counter."""
        return sorted(running, key=lambda r: (self.counter(r.client_key), r.arrival))

    def charge(self, req, prefill_tokens: int, decode_tokens: int) -> None:
        ### BEGIN SOLUTION
        u = req.client_key
        self.counters[u] = self.counter(u) + self.w_in * prefill_tokens + self.w_out * decode_tokens
        ### END SOLUTION

    def pick(self, waiting):
        ### BEGIN SOLUTION
        best = None
        for req in waiting:
            if best is None or self.counter(req.client_key) < self.counter(best.client_key):
                best = req
        self.last_picked = best.client_key
        return best
        ### END SOLUTION

    def on_arrival(self, req, waiting) -> None:
        ### BEGIN SOLUTION
        u = req.client_key
        if waiting.num_waiting(u) > 1:
            return
        others = [self.counter(v) for v in waiting.clients() if v != u]
        if others:
            floor = min(others)
        elif self.last_picked is not None and self.last_picked != u:
            floor = self.counter(self.last_picked)
        else:
            return
        self.counters[u] = max(self.counter(u), floor)
        ### END SOLUTION


# %% tags=["benchmark"]
demo = VTC(StepClock())
demo.charge(Request("x", [1, 2, 3], SamplingParams(max_tokens=4), max_tokens=4, client="a"), 3, 0)
print(demo.counters)          # {'a': 3.0}: three prompt tokens at w_in = 1

# %% [markdown]
# ## 2. Quality of experience of a streamed answer
#
# A reader who asked at time `arrival` expects the first token `ttft`
# seconds later and then `tds` tokens per second: token `j` (1-based) is due
# at `e_j = arrival + ttft + (j - 1) / tds`. The **expected** curve `E(t)`
# counts the tokens due by `t`; the **actual** curve `A(t)` counts those
# delivered by `t`. Text that arrives early cannot be read early, so the
# reader experiences `min(A, E)`, and
#
#     QoE = ∫ min(A(t), E(t)) dt / ∫ E(t) dt    over [arrival, T],  T = max(t_L, e_L).
#
# Both curves are staircases, and `min(A, E)` counts the tokens `j` with
# `max(t_j, e_j) <= t`, so the integrals are sums:
#
#     QoE = Σ_j (T − max(t_j, e_j)) / Σ_j (T − e_j).
#
# Write `qoe(arrival, token_times, ttft, tds)` with this closed form
# (`token_times` sorted, one time per token). If the denominator is 0 (a
# single token due at `T`), return 1.0 when it came in time, else 0.0.
# Worked example (lesson 08): `ttft=1`, `tds=2`, tokens at 2, 2.5, 3 — each
# one second late — give `(1 + 0.5 + 0) / (2 + 1.5 + 1) = 1/3`.

# %%
def qoe(arrival: float, token_times, ttft: float = 1.0, tds: float = 5.0) -> float:
    """Andes' QoE in [0, 1] of one answer whose tokens were delivered at ``token_times``."""
    ### BEGIN SOLUTION
    n = len(token_times)
    due = [arrival + ttft + j / tds for j in range(n)]
    end = max(token_times[-1], due[-1])
    expected = sum(end - e for e in due)
    if expected == 0:
        return 1.0 if token_times[-1] <= due[-1] else 0.0
    return sum(end - max(t, e) for t, e in zip(token_times, due)) / expected
    ### END SOLUTION


# %% tags=["benchmark"]
print(qoe(0.0, [2.0, 2.5, 3.0], ttft=1.0, tds=2.0))            # 1/3: every token a second late
print(qoe(0.0, [1.0, 1.5, 3.5, 4.0], ttft=1.0, tds=2.0))       # 2/3: on time, then a 1.5 s stall
print(qoe(0.0, [0.2, 0.3, 0.4], ttft=1.0, tds=2.0))            # 1.0: early text is read on schedule

# %% [markdown]
# ## 3. Andes' greedy choice
#
# A token delivered now is worth the wait it saves the reader: nothing to a
# request whose reader is still behind, the most to the one whose reader has
# waited longest. Andes approximates its knapsack with a greedy rank; here
# every request is ranked by its **next token's due time**, earliest first
# (ties by `req.arrival`). Write:
#
# - **`due(req)`**: `e_{d+1} = req.arrival_time + ttft + d / tds`, with `d =
#   len(req.output_token_ids)` tokens delivered and `ttft`, `tds` from
#   `req.qoe` when it is set, else from `self.default` (a `QoESpec`);
# - **`pick(waiting)`**: the waiting request due soonest;
# - **`displace(candidate, running)`**: the scheduler asks this when the
#   picked `candidate` does not fit. Return the running request due
#   **latest** (the one furthest ahead of its reader) if it is at least
#   `self.preempt_ahead_s` seconds ahead of now (`due - self.clock() >=
#   preempt_ahead_s`) and ranks after the candidate; otherwise `None`
#   (also for an empty `running`). The scheduler pauses it by recompute: its
#   blocks are freed and its prompt and output are prefilled again later, so
#   the threshold keeps that cost paid for by seconds of reading.

# %%
class Andes(SchedulingPolicy):
    """Next-token-due-first, pausing readers far ahead (use: ``Scheduler(config, policy=Andes(clock))``)."""

    name = "andes (yours)"
    preempts_for_waiting = True        # the scheduler calls `displace` when the pick does not fit

    def __init__(self, clock, ttft: float = 1.0, tds: float = 5.0, preempt_ahead_s: float = 2.0) -> None:
        super().__init__(clock)
        self.default = QoESpec(ttft, tds)
        self.preempt_ahead_s = preempt_ahead_s

    def order_running(self, running):
        """Due soonest first: a block shortage preempts the request furthest ahead of its reader."""
        return sorted(running, key=lambda r: (self.due(r), r.arrival))

    def due(self, req) -> float:
        ### BEGIN SOLUTION
        spec = req.qoe or self.default
        return req.arrival_time + spec.ttft + len(req.output_token_ids) / spec.tds
        ### END SOLUTION

    def pick(self, waiting):
        ### BEGIN SOLUTION
        return min(waiting, key=lambda r: (self.due(r), r.arrival))
        ### END SOLUTION

    def displace(self, candidate, running):
        ### BEGIN SOLUTION
        if not running:
            return None
        key = lambda r: (self.due(r), r.arrival)
        victim = max(running, key=key)
        if self.due(victim) - self.clock() >= self.preempt_ahead_s and key(candidate) < key(victim):
            return victim
        return None
        ### END SOLUTION


# %% [markdown]
# ## 4. Fair share, measured: a heavy and a light client
#
# Client `heavy` sends four requests for each one of client `light`, every
# other step, so both always have requests waiting. `W_u(t)` is the weighted
# service client `u` received up to step `t`, summed from what each step
# scheduled. The paper's theorem: for two clients backlogged throughout an
# interval, VTC keeps `|W_f − W_g|` over that interval within `2U`, `U =
# w_in · L_in + w_out · M` (`L_in` the longest prompt, `M` the most tokens
# the running batch can hold: here `min(num_kv_blocks · block_size,
# max_num_seqs · max_model_len)`). Under FCFS the gap grows with time.

# %% tags=["benchmark"]
import matplotlib.pyplot as plt

from minisys.scheduling.service import max_service_gap

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
steps = 200 if quick else 600
cfg = lab_config(max_model_len=16)
heavy_light = [(t, c, 6, 6) for t in range(0, steps, 2) for c in ["heavy"] * 4 + ["light"]]


def max_gap(run, a="heavy", b="light"):
    """max over intervals inside one backlogged stretch of |W_a - W_b| (`max_service_gap`: max D - min D)."""
    return max_service_gap(run["service"], a, b, [{a, b} <= waiting for waiting in run["backlogged"]])


fair = {"fcfs": simulate(SchedulingPolicy, heavy_light, cfg, max_steps=steps),
        "vtc (yours)": simulate(VTC, heavy_light, cfg, max_steps=steps)}
M = min(cfg.num_kv_blocks * cfg.block_size, cfg.max_num_seqs * cfg.max_model_len)
bound = 2 * (1.0 * 6 + 2.0 * M)
for name, run in fair.items():
    total = {c: sum(s.get(c, 0.0) for s in run["service"]) for c in ("heavy", "light")}
    print(f"{name:>12}: W heavy {total['heavy']:6.0f}, W light {total['light']:6.0f}, "
          f"max gap while both backlogged {max_gap(run):6.0f} (2U = {bound:.0f})")

# %% [markdown]
# ## 5. QoE under a burst: FCFS against your Andes
#
# Twelve readers arrive at once at an engine with four seats; each wants 60
# tokens, expects its first token within 1 s and then 5 tokens/s. The
# engine steps every 0.05 s, so a seat produces 20 tokens/s: four times what
# one reader reads. FCFS serves the burst in waves (the third wave waits
# seconds for its first token); Andes pauses readers far ahead and gives
# everyone an early start. Their QoE uses your `qoe`.

# %% tags=["benchmark"]
burst = [(0, f"reader{i}", 6, 60) for i in range(12)]
qoes, runs = {}, {}
for name, make in (("fcfs", SchedulingPolicy), ("andes (yours)", Andes)):
    runs[name] = run = simulate(make, burst)
    qoes[name] = sorted(qoe(run["arrival"][r], run["token_times"][r], 1.0, 5.0) for r in run["token_times"])
    q = qoes[name]
    print(f"{name:>14}: mean QoE {sum(q) / len(q):.3f}, QoE < 0.9 for {sum(v < 0.9 for v in q)}/{len(q)}, "
          f"{run['steps']} steps, {run['preemptions']} paused")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
for (name, run), style in zip(fair.items(), ("--", "-")):
    for c, color in (("heavy", "tab:red"), ("light", "tab:blue")):
        w, series = 0.0, []
        for s in run["service"]:
            w += s.get(c, 0.0)
            series.append(w)
        ax.plot([0.05 * i for i in range(len(series))], series, style, color=color, label=f"{name}: {c}")
ax.set(xlabel="time (s, step clock)", ylabel="weighted tokens served W(t)", title="heavy sends 4x light")
ax.legend(fontsize=8)
ax = axes[1]
for name, color in (("fcfs", "tab:red"), ("andes (yours)", "tab:green")):
    q = qoes[name]
    ax.step(q, [(i + 1) / len(q) for i in range(len(q))], where="post", color=color, label=name)
ax.axvline(0.9, color="grey", lw=0.8)
ax.set(xlabel="QoE of a request", ylabel="fraction of requests <= x", xlim=(0, 1.02),
       title="burst of 3x the seats: QoE CDF")
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab08_scheduling.png")
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/

# %% [markdown]
# ## 6. Your Andes in the real engine
#
# The same `policy=` argument works for `LLMEngine`. A small burst on the
# real model (four requests, two seats), replayed on a step clock: the order
# of work changes, the text does not — every greedy answer is identical
# under FCFS and under your Andes.

# %% tags=["benchmark"]
from minisys.engine.llm_engine import LLMEngine
from minisys.model import load

model, tokenizer = load(device="cpu", quiet=True)
n_tokens, n_requests = (6, 4) if quick else (32, 6)


def engine_run(make_policy):
    clock = StepClock(0.1)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2), clock=clock, policy=make_policy(clock))
    for i in range(n_requests):
        engine.add_request(str(i), tokenizer.encode(f"Tell me one fact about the number {i}."),
                           SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True))
    texts, times = {}, {str(i): [] for i in range(n_requests)}
    while engine.has_unfinished():
        outs = engine.step()
        clock.now += clock.dt
        for o in outs:
            times[o.request_id] += [clock.now] * (len(o.outputs[0].token_ids) - len(times[o.request_id]))
            if o.finished:
                texts[o.request_id] = o.outputs[0].text
    return texts, [qoe(0.0, times[str(i)], 0.5, 5.0) for i in range(n_requests)]


fcfs_texts, fcfs_q = engine_run(SchedulingPolicy)
andes_texts, andes_q = engine_run(lambda clock: Andes(clock, ttft=0.5, tds=5.0, preempt_ahead_s=0.4))
print("same text under both policies:", fcfs_texts == andes_texts)
print(f"mean QoE: fcfs {sum(fcfs_q) / n_requests:.3f}, andes (yours) {sum(andes_q) / n_requests:.3f}")
