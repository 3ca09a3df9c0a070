"""Programs of LLM calls (`minisys.programs`, POST /v1/programs; lesson 16, Parrot).

Oracles: `graphlib.TopologicalSorter` (the standard library's) for the ready
set; brute-force path enumeration for the critical path; the sequential
client for the outputs — one call at a time through ``LLM.generate`` in
process and through the OpenAI API (the official ``openai`` client) on the
server — greedy, token for token; the allocator's own counts for leaks.
"""
from __future__ import annotations

import graphlib
import random

import openai
import pytest

from minisys.engine.config import EngineConfig
from minisys.programs import (Call, Program, ProgramError, ProgramLimits, deduce_objectives, ready_set,
                              run_program, run_sequential)
from minisys.programs.client import ProgramClient, SequentialClient
from minisys.programs.examples import map_reduce_program

KEY = "sk-prog"
H = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def diamond(chat: bool = False, tokens: int = 6) -> Program:
    """x -> a, b (independent, same prefix) -> c (both) ; plus d (only x) -> c."""
    p = Program()
    x = p.input("x", "the quick brown fox")
    a = p.call("a", f"the lazy dog {x}", max_tokens=tokens, chat=chat)
    b = p.call("b", f"the lazy dog jumps {x}", max_tokens=tokens + 2, chat=chat)
    d = p.call("d", f"over {x}", max_tokens=2, chat=chat)
    p.call("c", f"{a} and {b} then {d}", max_tokens=tokens, chat=chat)
    return p


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("edit, field, words", [
    (lambda p: p.call("e", "uses {{nope}}"), "calls[4].prompt", "undefined variable {{nope}}"),
    (lambda p: p.call("a", "again"), "calls[4].name", "defined twice"),
    (lambda p: p.call("x", "shadows an input"), "calls[4].name", "defined twice"),
    (lambda p: p.call("bad name", "hi"), "calls[4].name", "a name is"),
    (lambda p: p.call("e", ""), "calls[4].prompt", "non-empty"),
    (lambda p: p.call("e", "{{e}}"), "calls[4].prompt", "its own output"),
    (lambda p: p.call("e", "hi", max_tokens=0), "calls[4].max_tokens", "[1,"),
    (lambda p: p.input("unused", "given, named by no prompt"), "inputs.unused", "used by no call"),
])
def test_bad_programs_are_refused_naming_the_field(edit, field, words):
    p = diamond()
    edit(p)
    with pytest.raises(ProgramError) as e:
        p.validate()
    assert e.value.field == field and words in str(e.value)


def test_cycles_too_many_calls_and_dead_calls_are_refused():
    p = Program(calls=[Call("a", "{{c}}"), Call("b", "{{a}}"), Call("c", "{{b}}"), Call("out", "{{c}}")])
    with pytest.raises(ProgramError, match=r"cycle: (a|b|c) -> .* -> \1") as e:
        p.validate()
    assert e.value.field == "calls"
    with pytest.raises(ProgramError, match="over the limit of 3") as e:
        diamond().validate(ProgramLimits(max_calls=3))
    p = diamond()
    p.outputs = ["a"]                           # b, d and c are then used by no output
    with pytest.raises(ProgramError, match="used by no output"):
        p.validate()
    p.outputs = ["zz"]
    with pytest.raises(ProgramError, match="'zz' is not a call"):
        p.validate()
    with pytest.raises(ProgramError, match="at least one call"):
        Program().validate()


# ------------------------------------------------------------------ the ready set and objectives
def random_dag(rng: random.Random, n: int) -> dict[str, list[str]]:
    names = [f"c{i}" for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)                          # the declaration order is not the dependency order
    return {names[i]: [names[j] for j in range(i) if rng.random() < 0.3] for i in order}


@pytest.mark.parametrize("seed", range(20))
def test_ready_set_matches_graphlib_step_by_step(seed):
    """Completing calls in a random order, the ready set is graphlib's ready set after the same completions."""
    rng = random.Random(seed)
    deps = random_dag(rng, rng.randint(1, 12))
    rank = {n: (rng.randint(0, 1), i) for i, n in enumerate(deps)}
    oracle = graphlib.TopologicalSorter(deps)
    oracle.prepare()
    done, started, running = set(), set(), []
    while len(done) < len(deps):
        ready = ready_set(deps, done, started, rank)
        assert set(ready) == set(oracle.get_ready())
        assert ready == sorted(ready, key=rank.get)
        started.update(ready)
        running += ready
        assert running, "nothing ready and nothing running: the step would stall"
        finished = running.pop(rng.randrange(len(running)))
        done.add(finished)
        oracle.done(finished)
    assert ready_set(deps, done, started, rank) == []


def _paths(deps, outputs):
    """Every chain of calls ending at an output (brute force)."""
    users = {n: [u for u, ds in deps.items() if n in ds] for n in deps}
    sources = [n for n, ds in deps.items() if not ds]
    out = []

    def walk(path):
        if path[-1] in outputs:
            out.append(path)
        for u in users[path[-1]]:
            walk(path + [u])
    for s in sources:
        walk([s])
    return out


@pytest.mark.parametrize("seed", range(10))
def test_objectives_mark_exactly_the_calls_on_a_longest_chain(seed):
    rng = random.Random(seed)
    deps = random_dag(rng, rng.randint(2, 9))
    p = Program(calls=[Call(n, " ".join("{{%s}}" % d for d in ds) or "start", max_tokens=rng.randint(1, 20))
                       for n, ds in deps.items()])
    cost = {c.name: c.max_tokens for c in p.calls}
    paths = _paths(deps, set(p.output_names()))
    longest = max(sum(cost[n] for n in path) for path in paths)
    critical = {n for path in paths if sum(cost[n] for n in path) == longest for n in path}
    obj = deduce_objectives(p)
    assert {n for n, o in obj.items() if o.kind == "latency"} == critical
    assert all((o.priority == 0) == (o.slack == 0) for o in obj.values())
    for n, o in obj.items():      # slack: how much shorter the longest chain through n is
        through = max(sum(cost[m] for m in path) for path in paths if n in path)
        assert o.slack == longest - through


# ------------------------------------------------------------------ in process (tiny model)
@pytest.fixture(scope="module")
def tiny_llm(tiny_dirs):
    from minisys.llm import LLM
    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=64, max_num_seqs=4, block_size=4))
    llm.tokenizer.chat_template = TEMPLATE
    return llm


def _no_blocks_held(engine) -> None:
    alloc = engine.scheduler.allocator
    assert not engine.has_unfinished() and engine.num_unfinished == 0
    assert alloc.num_free == alloc.num_blocks, (alloc.num_free, alloc.num_blocks)


@pytest.mark.parametrize("chat", [False, True])
def test_in_process_dag_equals_sequential_token_for_token(tiny_llm, chat):
    prog = diamond(chat=chat)
    seq = run_sequential(tiny_llm, prog)
    dag = run_program(tiny_llm, prog)
    assert dag.outputs == seq.outputs and set(dag.calls) == set(seq.calls)
    for name in seq.calls:
        assert dag.calls[name].token_ids == seq.calls[name].token_ids, name
        assert dag.calls[name].token_ids, name
    # a, b and d started together at the first step; c only after the last of them ended
    assert len({dag.calls[n].start_step for n in "abd"}) == 1
    assert dag.calls["c"].start_step == max(dag.calls[n].end_step for n in "abd")
    _no_blocks_held(tiny_llm.engine)


def test_a_call_refused_mid_program_leaves_no_request_and_no_block(tiny_llm):
    """c's prompt (a's output repeated) cannot fit the context: refused when c becomes ready, while d runs."""
    p = Program()
    a = p.call("a", "the quick brown", max_tokens=8, chat=False)
    p.call("d", "lazy", max_tokens=40, chat=False)
    p.call("c", f"{a} the fox " * 100, max_tokens=4, chat=False)
    p.outputs = ["c", "d"]
    with pytest.raises(ValueError, match="context|max_model_len|long"):
        run_program(tiny_llm, p)
    _no_blocks_held(tiny_llm.engine)
    assert run_program(tiny_llm, diamond()).outputs        # and the engine still serves


# ------------------------------------------------------------------ through the server (tiny model)
@pytest.fixture(scope="module")
def served(tiny_app):
    limits = {"limits": __import__("minisys.server.limits", fromlist=["ServerLimits"]).ServerLimits(
        max_program_calls=6, max_queued_sequences=3)}
    with tiny_app(KEY, chat_template=TEMPLATE, app_args=limits, block_size=4) as (c, llm):
        yield c, llm, openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0)


def _metrics(c) -> dict[str, float]:
    from minisys.server.metrics import parse_metrics
    return parse_metrics(c.get("/metrics", headers=H).text)


def _server_idle(c, timeout: float = 10.0) -> None:
    """No request left in the engine and every KV block free, within ``timeout`` (the engine applies
    finishes and aborts between its steps, on its own thread: poll, as tests/test_server.py does)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(c)
        idle = m["minisys:num_requests_in_engine"] == 0 and m["minisys:kv_blocks_free"] == m["minisys:kv_blocks_total"]
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert m["minisys:num_requests_in_engine"] == 0
    assert m["minisys:kv_blocks_free"] == m["minisys:kv_blocks_total"]


@pytest.mark.parametrize("chat", [False, True])
def test_server_dag_equals_the_sequential_openai_client(served, tiny_llm, chat):
    c, _, client = served
    prog = diamond(chat=chat)
    seq = SequentialClient(client, "tiny").run(prog)
    before = _metrics(c)
    dag = ProgramClient("http://testserver", KEY, http=c).run(prog)
    after = _metrics(c)
    assert dag.outputs == seq.outputs
    oracle = run_sequential(tiny_llm, prog)          # token ids, one call at a time in process
    for name in seq.calls:
        assert dag.calls[name].text == seq.calls[name].text, name
        assert dag.calls[name].token_ids == oracle.calls[name].token_ids, name
        assert dag.calls[name].completion_tokens == seq.calls[name].completion_tokens == \
            len(oracle.calls[name].token_ids)
        assert dag.calls[name].prompt_tokens == seq.calls[name].prompt_tokens
    # a and b share "the lazy dog" (plus the template's head): whole blocks found in the prefix cache
    assert after["minisys:prefix_cache_hits_total"] > before["minisys:prefix_cache_hits_total"]
    _server_idle(c)


def test_server_reports_objectives_and_timing(served):
    c, _, _ = served
    body = diamond().to_json()
    r = c.post("/v1/programs", json=body, headers=H)
    assert r.status_code == 200, r.text
    calls = {x["name"]: x for x in r.json()["calls"]}
    # b (8 tokens) is the longer branch into c; d (2 tokens) has slack: throughput, priority 1
    assert {n: (x["objective"], x["priority"]) for n, x in calls.items()} == {
        "a": ("throughput", 1), "b": ("latency", 0), "d": ("throughput", 1), "c": ("latency", 0)}
    assert len({calls[n]["start_s"] for n in "abd"}) == 1           # the ready set went in together
    assert calls["c"]["start_s"] >= max(calls[n]["end_s"] for n in "abd")
    assert list(r.json()["outputs"]) == ["c"]


@pytest.mark.parametrize("mutate, status, param, words", [
    (lambda b: b.update(stream=True), 400, None, "stream"),
    (lambda b: b["calls"][0].update(logprobs=1), 400, None, "logprobs"),
    (lambda b: b["calls"][3].update(prompt="{{a}} {{ghost}}"), 400, "calls[3].prompt", "ghost"),
    (lambda b: b["calls"][0].update(prompt="{{c}}"), 400, "calls", "cycle"),
    (lambda b: b["calls"].extend({"name": f"e{i}", "prompt": "{{c}}"} for i in range(3)), 400, "calls",
     "--max-program-calls"),
    (lambda b: b["calls"][1].update(temperature=-1.0), 400, "calls[1]", "temperature"),
    (lambda b: b.update(model="gpt-9"), 404, "model", "gpt-9"),
    (lambda b: (b["calls"].append({"name": "e", "prompt": "fox", "chat": False}),      # 4 ready, 3 seats queued
                b["calls"][3].update(prompt=b["calls"][3]["prompt"] + " {{e}}")), 429, "calls[2].prompt",
     "calls[2] (d): the server is busy"),              # d, the one call with slack, is admitted last
    (lambda b: (b["inputs"].update(big="x" * 600_000), b["calls"][2].update(prompt="{{big}}{{big}}")), 400,
     "calls[2].prompt", "1200000 characters, over the limit"),
    (lambda b: b["calls"][3].update(prompt="{{a}} the fox " * 100), 400, "calls[3].prompt", "calls[3] (c)"),
    (lambda b: b["inputs"].update(questoin="a misspelt input"), 400, "inputs.questoin", "used by no call"),
    (lambda b: (b["inputs"].update(big="x" * 600_000), b["calls"][2].update(prompt="{{big}}")), 400,
     "calls[2].prompt", "calls[2] (d): the prompt has at least"),        # over the context, seen before tokenizing
])
def test_the_endpoint_refuses_bad_programs_by_name(served, mutate, status, param, words):
    c, _, _ = served
    body = diamond().to_json()
    mutate(body)
    r = c.post("/v1/programs", json=body, headers=H)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] + str(err.get("param")), err
    if param is not None:
        assert err["param"] == param, err
    _server_idle(c)
    assert c.post("/v1/programs", json=diamond().to_json(), headers=H).status_code == 200


# ------------------------------------------------------------------ the real model, once
def test_smollm2_map_reduce_dag_equals_the_sequential_openai_client(smol):
    """SmolLM2 over HTTP (bench compound part b, small): the map-reduce program as one request vs one
    OpenAI call at a time on a second server; then each call alone on a fresh engine, token for token."""
    from minisys.bench.compound_programs import map_reduce_side_by_side
    from minisys.engine.llm_engine import LLMEngine
    model, tok = smol
    chunks = ["Paged attention keeps the KV cache in fixed-size blocks, so memory is not reserved in advance.",
              "Continuous batching adds new requests to the running batch at every step.",
              "Speculative decoding drafts several tokens cheaply and verifies them in one forward."]
    res = map_reduce_side_by_side(model, tok, chunks, 6, 8, reps=1, warmup=False, log=lambda *_: None)
    assert res["same_outputs"] and res["runs"][0]["final"]
    spans = res["runs"][0]["dag_calls"]
    assert max(spans[f"s{i}"][0] for i in range(3)) < min(spans[f"s{i}"][1] for i in range(3))  # maps overlapped
    assert spans["final"][0] >= max(spans[f"s{i}"][1] for i in range(3))
    assert res["prefix_cache"]["dag"]["hit_tokens"] > 0           # the maps' shared instruction prefix
    from minisys.programs.examples import map_reduce_program
    prog = map_reduce_program([f"(document 1)\n{c}" for c in chunks], 6, 8)
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=256, max_num_seqs=8))
    assert res["runs"][0]["dag_token_ids"] == _one_at_a_time(engine, tok, prog)


def _one_at_a_time(engine, tok, prog: Program) -> dict[str, list[int]]:
    """Each call alone on the (idle) engine, in declaration order, its prompt filled from earlier outputs."""
    from dataclasses import replace

    from minisys.engine.sampling_params import RequestOutputKind
    from minisys.programs.runner import call_params, call_prompt_text
    values, ids_of = dict(prog.inputs), {}
    for call in prog.calls:
        ids = tok.encode(call_prompt_text(tok, call, prog.render(call, values)))
        engine.add_request(f"check-{call.name}", ids,
                           replace(call_params(call), output_kind=RequestOutputKind.FINAL_ONLY))
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    values[call.name], ids_of[call.name] = out.outputs[0].text, list(out.outputs[0].token_ids)
    return ids_of


def test_a_client_gone_mid_program_aborts_every_call_and_frees_its_blocks(tiny_dirs):
    """The route's runner with a client that has left: every call in flight is aborted, every ticket
    released, every KV block free again (the allocator's own count)."""
    import asyncio

    from minisys.llm import LLM
    from minisys.server.app import Server
    from minisys.server.async_engine import AsyncLLMEngine
    from minisys.server.programs import ProgramRun

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=64, max_num_seqs=4, block_size=4))
    prog = diamond(tokens=150)

    async def main():
        engine = AsyncLLMEngine(llm.engine)
        await engine.start()
        try:
            server = Server(engine, llm.tokenizer, "tiny")
            run = ProgramRun(server, prog, None)
            with pytest.raises(asyncio.CancelledError):
                await run.run(Gone())
            assert "c" not in run.results and "a" not in run.results and run.running == {}
            assert server.admission.queued_sequences == server.admission.queued_tokens == 0
            for _ in range(200):                         # aborts are applied between engine steps
                if llm.engine.num_unfinished == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            await engine.shutdown()

    asyncio.run(main())
    _no_blocks_held(llm.engine)


def test_an_engine_step_failure_mid_program_releases_every_ticket(tiny_dirs):
    """A failed engine step ends the program with the error (the server keeps serving), and every call's
    admission ticket is released: the call whose failure was read first included (it was leaked)."""
    import asyncio

    from minisys.llm import LLM
    from minisys.server.app import Server
    from minisys.server.async_engine import AsyncLLMEngine, EngineDeadError
    from minisys.server.programs import ProgramRun

    class Here:
        async def is_disconnected(self) -> bool:
            return False

    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=64, max_num_seqs=4, block_size=4))
    real_step, steps = llm.engine.step, {"n": 0}

    def flaky_step():
        steps["n"] += 1
        if steps["n"] == 2:
            raise RuntimeError("injected failure")
        return real_step()

    llm.engine.step = flaky_step

    async def main():
        engine = AsyncLLMEngine(llm.engine)
        await engine.start()
        try:
            server = Server(engine, llm.tokenizer, "tiny")
            run = ProgramRun(server, diamond(tokens=20), None)
            with pytest.raises(EngineDeadError):
                await run.run(Here())
            assert run.running == {}
            assert server.admission.queued_sequences == server.admission.queued_tokens == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_program_with_slack_runs_on_the_eager_engine(tiny_dirs, tiny_llm):
    """--engine eager has no scheduler, so it refuses a priority; the priority of a call with slack is the
    server's own deduction, not the client's ask: the program runs (it was a 400 naming a priority)."""
    from fastapi.testclient import TestClient

    from minisys.llm import LLM
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncEagerEngine

    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True, engine="eager")
    prog = diamond(tokens=3)
    with TestClient(build_app(AsyncEagerEngine(llm.runner), llm.tokenizer, "tiny", api_key=KEY)) as c:
        r = c.post("/v1/programs", json=prog.to_json(), headers=H)
    assert r.status_code == 200, r.text
    assert {x["name"]: x["priority"] for x in r.json()["calls"]}["d"] == 1      # d has slack
    assert r.json()["outputs"] == run_sequential(tiny_llm, prog).outputs


def test_a_client_gone_is_noticed_even_while_calls_keep_finishing(tiny_llm):
    """A chain of quick calls: one finishes every few milliseconds, so the wait never times out; the
    disconnect was polled only on a timeout, and the whole program ran for a client long gone."""
    import asyncio

    from minisys.server.app import Server
    from minisys.server.async_engine import AsyncLLMEngine
    from minisys.server.programs import ProgramRun

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    p = Program()
    prev = p.input("x", "the quick brown fox")
    for i in range(8):
        prev = p.call(f"c{i}", f"go on: {prev}", max_tokens=1, chat=False)

    async def main():
        engine = AsyncLLMEngine(tiny_llm.engine)
        await engine.start()
        try:
            run = ProgramRun(Server(engine, tiny_llm.tokenizer, "tiny"), p, None)
            with pytest.raises(asyncio.CancelledError):
                await run.run(Gone())
            assert len(run.results) <= 1, sorted(run.results)        # noticed after the first call at most
            for _ in range(200):
                if tiny_llm.engine.num_unfinished == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            await engine.shutdown()

    asyncio.run(main())
    _no_blocks_held(tiny_llm.engine)
