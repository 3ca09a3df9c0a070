# %% [markdown]
# # Lab 16: Compound AI — retrieval in the latency budget, document KV reuse, programs as DAGs
#
# Companion to `lessons/16-compound-ai.md`. An application built on an LLM
# rarely makes one call: it retrieves passages, builds a prompt, calls the
# model several times and feeds one answer into the next (Zaharia et al.,
# *The Shift from Models to Compound AI Systems*, 2024). This lab measures
# what that costs on minisys and writes the two pieces that let a server do
# better. You will write:
#
# 1. **the canonical RAG prompt** (`canonical_prompt`): retrieved passages in
#    a canonical order (sorted by passage id, duplicates dropped), each padded
#    to whole KV blocks, so two queries that retrieve the same passages share
#    a prefix whose KV the prefix cache computes once (RAGCache's idea);
# 2. **the DAG scheduler's ready-set step** (`ready_set`): which calls of a
#    program can start now, in priority order (Parrot's semantic variables
#    make the application's DAG visible to the server).
#
# Around them the lab times retrieval against time-to-first-token, counts the
# prompt tokens your order lets the prefix cache skip, and runs a map-reduce
# summarisation program call by call and as a DAG on the real model.
#
#     python -m minisys labs start 16     # once: copies this notebook to work/16-compound-ai.ipynb
#     python -m minisys grade work/16-compound-ai.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import os
import time

from minisys.engine.config import EngineConfig
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams

# %% [markdown]
# ## 1. The order problem
#
# The engine's prefix cache (lesson 03) reuses the KV of a *whole block* of
# `block_size` tokens when every token from the start of the prompt up to the
# end of that block is the same as in a block it already holds. A RAG prompt
# is `head | passage | passage | ... | question`. Two queries that retrieve
# passages {7, 3} and {3, 7} in that (score) order give different prompts
# after the head, so the second recomputes everything; sorted by passage id
# they are the same up to the question.
#
# A second detail: a passage's last block is shared only if it is *full*. Pad
# the head and every passage with `pad_id` tokens up to a multiple of
# `block_size`, so each segment starts on a block boundary and a passage's
# blocks do not depend on what follows it.
#
# Write `canonical_prompt(head, passages, retrieved, question, block_size, pad_id)`:
# `head` and `question` are token-id lists, `passages` maps a passage id to
# its token ids, `retrieved` lists the ids a query retrieved (best first,
# possibly with duplicates). Return `head` padded, then each distinct
# retrieved passage in ascending id order, each padded, then `question`
# (not padded). A retrieved id missing from `passages` is a `KeyError`;
# `block_size < 1` is a `ValueError`.

# %%
def canonical_prompt(head: list[int], passages: dict[int, list[int]], retrieved: list[int],
                     question: list[int], block_size: int, pad_id: int) -> list[int]:
    """head | passages in ascending id order, each segment padded to whole blocks | question."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ### BEGIN SOLUTION
    def pad(ids):
        return list(ids) + [pad_id] * (-len(ids) % block_size)

    out = pad(head)
    for pid in sorted(set(retrieved)):
        out += pad(passages[pid])
    return out + list(question)
    ### END SOLUTION


# %% [markdown]
# ## 2. The model, and retrieval in the latency budget
#
# A RAG request pays for retrieval before its prefill starts: embed the
# question (one forward of the model, here the served model's mean-pooled
# hidden states, `LLM.embed`), search the index, build the prompt. The cell
# below indexes lesson 03's passages with faiss (flat: exact search) and
# times each stage against the time to first token of the answer.

# %% tags=["benchmark"]
import numpy as np

from minisys import LLM
from minisys.rag.cli import REPO_ROOT
from minisys.rag.corpus import build_corpus
from minisys.rag.index import IndexConfig, VectorIndex

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
llm = LLM(quiet=True, dtype="float32")
tok = llm.tokenizer
passages = build_corpus(REPO_ROOT, ["lessons/03-paged-kv.md"], max_words=40 if quick else 80)[: 8 if quick else 40]
vectors = np.asarray([o.outputs.embedding for o in llm.embed([p.embedding_text() for p in passages])],
                     dtype=np.float32)
index = VectorIndex.build(vectors, IndexConfig(kind="flat"))

question = "How many bytes of KV cache does one token need?"
t0 = time.perf_counter()
qvec = np.asarray(llm.embed([question])[0].outputs.embedding, dtype=np.float32)
t_embed = time.perf_counter() - t0
t0 = time.perf_counter()
_, found = index.search(qvec[None, :], 2 if quick else 3)
t_search = time.perf_counter() - t0
segments = {p.id: tok.encode(f"[{p.title()}]\n{p.text}\n\n") for p in passages}
chat_head, chat_tail = tok.apply_chat_template([{"role": "user", "content": "\x00"}], True).split("\x00")
head_ids = tok.encode(chat_head + "Answer from these passages.\n\n")
pad = tok.encode("\n")[-1]
prompt = canonical_prompt(head_ids, segments, [int(i) for i in found[0]],
                          tok.encode(f"Question: {question}{chat_tail}"), 16, pad)
engine = LLMEngine(llm.model, tok, EngineConfig(num_kv_blocks=1024, enable_prefix_caching=False))
t0 = time.perf_counter()
engine.add_request("ttft", prompt, SamplingParams(temperature=0, max_tokens=1))
while engine.has_unfinished():
    engine.step()
t_ttft = time.perf_counter() - t0
print(f"{len(passages)} passages indexed; retrieved {sorted(int(i) for i in found[0])}")
print(f"embed the question {t_embed * 1e3:6.1f} ms | search {t_search * 1e3:6.2f} ms | "
      f"TTFT of the {len(prompt)}-token prompt {t_ttft * 1e3:6.1f} ms")

# %% [markdown]
# The search itself is microseconds at this size (a flat index over a few
# dozen vectors); embedding the question is one short forward; the prefill of
# the passages dominates. At billions of vectors the search no longer fits in
# memory and moves to disk or over the network: that is where the NSDI 2024
# reordered-pipelining paper starts.

# %% [markdown]
# ## 3. Your order, measured: tokens the prefix cache skips
#
# A stream of queries retrieves 2 of 6 passages each, some passages far more
# often than others. Each prompt is served alone on an engine with the prefix
# cache on; `prefill_tokens` counts what the engine computed. Retrieval order
# against your canonical order, the same passages and questions.

# %% tags=["benchmark"]
rng = np.random.default_rng(0)
pool = [p.id for p in passages[:6]]
weights = 1.0 / np.arange(1, 7) ** 1.2
stream = [list(rng.choice(pool, size=2, replace=False, p=weights / weights.sum())) for _ in range(3 if quick else 12)]


def served_tokens(order_fn):
    eng = LLMEngine(llm.model, tok, EngineConfig(num_kv_blocks=1024, max_num_seqs=4))
    total = 0
    for q, picks in enumerate(stream):
        ids = order_fn(picks, tok.encode(f"Question: what is point {q}?{chat_tail}"))
        total += len(ids)
        eng.add_request(f"q{q}", ids, SamplingParams(temperature=0, max_tokens=1))
        while eng.has_unfinished():
            eng.step()
    return total, eng.stats.prefill_tokens


def retrieval_order(picks, q):
    out = list(head_ids)
    for pid in picks:
        out += segments[int(pid)]
    return out + q


reuse = {"retrieval order": served_tokens(retrieval_order),
         "canonical (yours)": served_tokens(lambda picks, q: canonical_prompt(
             head_ids, segments, [int(x) for x in picks], q, 16, pad))}
for name, (total, computed) in reuse.items():
    print(f"{name:>18}: {computed:5d} of {total:5d} prompt tokens computed ({1 - computed / total:5.1%} reused)")

# %% [markdown]
# ## 4. A program's DAG: the ready-set step
#
# A program is a set of calls whose prompts name other calls' outputs:
# `deps[name]` lists the calls `name` needs. A request-at-a-time client runs
# them one by one; a server that sees the DAG starts each call **the moment
# its inputs exist**, and starts independent calls together so they share
# batches. The step it repeats: after some calls finished, which can start?
#
# Write `ready_set(deps, done, started, rank)`: the names not yet in
# `started` whose dependencies are all in `done`, sorted by `rank[name]`
# (a tuple: the call's priority, then its position in the program; lower
# first). Parrot's objective deduction sets the priority: 0 for calls on the
# critical path to the final output, 1 for calls with slack.

# %%
def ready_set(deps: dict[str, list[str]], done: set[str], started: set[str],
              rank: dict[str, tuple]) -> list[str]:
    """Calls not started whose dependencies are all done, sorted by rank."""
    ### BEGIN SOLUTION
    ready = [n for n, ds in deps.items() if n not in started and all(d in done for d in ds)]
    return sorted(ready, key=lambda n: rank[n])
    ### END SOLUTION


# %% [markdown]
# ## 5. Map-reduce on the real model: one call at a time vs the DAG
#
# The program summarises chunks of lesson 04 one by one (map) and combines
# the summaries (reduce). `run_dag` is a small runner over `LLMEngine` built
# on your `ready_set`: it adds every ready call, steps the engine, and adds
# the calls a finished one unblocks at once. `run_one_by_one` is what a
# client issuing requests one at a time does. Greedy outputs must agree.

# %%
from minisys.programs.examples import course_chunks, map_reduce_program  # noqa: E402
from minisys.programs.runner import call_params, call_prompt_text  # noqa: E402
from minisys.programs.scheduler import deduce_objectives  # noqa: E402


def run_dag(engine, tok, prog):
    """{call: text} with every ready call in the engine together (your `ready_set`); wall seconds."""
    deps, calls = prog.deps(), prog.by_name()
    objectives = deduce_objectives(prog)
    rank = {c.name: (objectives[c.name].priority, i) for i, c in enumerate(prog.calls)}
    values, done, started = dict(prog.inputs), set(), set()
    t0 = time.perf_counter()
    while len(done) < len(deps):
        for name in ready_set(deps, done, started, rank):
            started.add(name)
            call = calls[name]
            ids = tok.encode(call_prompt_text(tok, call, prog.render(call, values)))
            engine.add_request(name, ids, call_params(call), priority=objectives[name].priority)
        for out in engine.step():
            if out.finished:
                values[out.request_id] = out.outputs[0].text
                done.add(out.request_id)
    return {n: values[n] for n in deps}, time.perf_counter() - t0


def run_one_by_one(engine, tok, prog):
    """{call: text}, one call at a time in program order (the request-at-a-time client); wall seconds."""
    values = dict(prog.inputs)
    t0 = time.perf_counter()
    for call in prog.calls:
        ids = tok.encode(call_prompt_text(tok, call, prog.render(call, values)))
        engine.add_request(call.name, ids, call_params(call))
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    values[call.name] = out.outputs[0].text
    return {c.name: values[c.name] for c in prog.calls}, time.perf_counter() - t0


# %% tags=["benchmark"]
import matplotlib.pyplot as plt  # noqa: E402

n_chunks, map_tokens, reduce_tokens = (3, 3, 4) if quick else (8, 24, 48)
prog = map_reduce_program(course_chunks(n_chunks, max_words=30 if quick else 40), map_tokens, reduce_tokens)
times = {}
for name, runner in (("one by one", run_one_by_one), ("DAG (your ready_set)", run_dag)):
    eng = LLMEngine(llm.model, tok, EngineConfig(num_kv_blocks=1024, max_num_seqs=16))
    eng.add_request("warm-up", tok.encode("Warm up"), SamplingParams(max_tokens=2))
    while eng.has_unfinished():
        eng.step()
    outputs, times[name] = runner(eng, tok, prog)
    print(f"{name:>22}: {times[name]:6.2f} s, {eng.stats.steps - 2} steps, "
          f"{eng.stats.prefill_tokens} prompt tokens computed")
    times[name + " outputs"] = outputs
same = times["one by one outputs"] == times["DAG (your ready_set) outputs"]
print(f"same greedy outputs: {same}; speed-up {times['one by one'] / times['DAG (your ready_set)']:.2f}x")
print("final:", times["DAG (your ready_set) outputs"]["final"][:200])

fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(["one by one", "DAG"], [times["one by one"], times["DAG (your ready_set)"]], color=["tab:red", "tab:green"])
ax.set(ylabel="end-to-end latency (s)", title=f"map-reduce: {n_chunks} summaries + a combine")
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab16_compound_ai.png")
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/

# %% [markdown]
# Read the numbers. The DAG runs the maps as one batch: a decode step costs
# about the same for 1 sequence or 8 on this CPU, so the map phase takes
# about as many steps as one map call. The prompt tokens computed are the
# same or fewer: the maps share the instruction's blocks either way. What to
# try: give one map call a much larger `max_tokens` (it becomes the only
# latency call, the others get slack: `deduce_objectives(prog)`), and run
# the engine with `EngineConfig(scheduling_policy="priority", max_num_seqs=2)`
# so calls compete for seats.
