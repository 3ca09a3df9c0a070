"""Run a program in process: the DAG at once on `LLMEngine`, or its calls one by one (the naive path).

    from minisys import LLM
    from minisys.programs import run_program, run_sequential
    llm = LLM()
    result = run_program(llm, prog)          # ready calls submitted together, each started on the step
    naive = run_sequential(llm, prog)        # one call at a time, in declaration order: what a client
    assert result.outputs == naive.outputs   # issuing requests one by one does (greedy: the same tokens)

`run_program` adds every ready call to the engine, steps it, and the moment
a call finishes adds the calls that became ready, while the others keep
running: independent calls share batches, and calls whose prompts share a
prefix share its KV blocks through the prefix cache (lesson 03: the first
call registers its full blocks at admission, later ones hit them).
Invariant: whatever happens (an error, a refused call, Ctrl-C) every
request it added is finished or aborted before it returns or raises, so no
KV block is left held.

A call's prompt becomes token ids the way the server's routes make them
(`call_prompt_ids`): a chat call is one user message through the model's
chat template (what ``/v1/chat/completions`` does with ``messages=[{"role":
"user", "content": prompt}]``), a raw call the text itself (``/v1/completions``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..engine.sampling_params import RequestOutputKind, SamplingParams
from .graph import Call, Program, ProgramLimits
from .scheduler import Objective, ProgramState, deduce_objectives


def call_params(call: Call) -> SamplingParams:
    """The call's sampling parameters (validated by `SamplingParams`: ValueError naming the field)."""
    return SamplingParams(max_tokens=call.max_tokens, temperature=call.temperature, top_p=call.top_p,
                          seed=call.seed, stop=list(call.stop) or None)


def call_prompt_text(tokenizer, call: Call, prompt: str) -> str:
    """The text the model reads: the chat template around one user message, or the raw prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], True) if call.chat else prompt


@dataclass
class CallResult:
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    objective: Optional[Objective] = None
    start_s: float = 0.0             # since the program started
    end_s: float = 0.0
    completion_tokens: int = 0
    start_step: int = -1             # engine steps taken before it was added / when it finished (run_program)
    end_step: int = -1


@dataclass
class ProgramResult:
    outputs: dict[str, str]
    calls: dict[str, CallResult] = field(default_factory=dict)
    wall_s: float = 0.0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0        # prompt tokens the engine computed (the rest hit the prefix cache)

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens


def _engine_of(llm_or_engine: Any):
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    if engine is None or not hasattr(engine, "step"):
        raise ValueError("programs run on the engine: LLM(engine='llm') or an LLMEngine")
    return engine


def run_program(llm_or_engine: Any, program: Program, limits: ProgramLimits = ProgramLimits(),
                use_priority: bool = True) -> ProgramResult:
    """The DAG submitted at once (see the module). ``use_priority``: pass each call's deduced priority
    to the engine (it acts under ``scheduling_policy="priority"``). The engine must be idle."""
    program.validate(limits)
    engine = _engine_of(llm_or_engine)
    if engine.has_unfinished():
        raise RuntimeError("run_program needs an idle engine (it steps it until the program is done)")
    tok = engine.tokenizer
    state = ProgramState(program, deduce_objectives(program), limits.max_rendered_chars)
    result = ProgramResult({})
    rid_of: dict[str, str] = {}
    call_of: dict[str, str] = {}
    prefilled0 = engine.stats.prefill_tokens
    t0 = time.perf_counter()
    try:
        while not state.finished:
            for call in state.take_ready():
                ids = tok.encode(call_prompt_text(tok, call, state.prompt(call)))
                rid = f"prog-{id(state):x}-{call.name}"
                obj = state.objectives[call.name]
                engine.add_request(rid, ids, replace(call_params(call), output_kind=RequestOutputKind.FINAL_ONLY),
                                   priority=obj.priority if use_priority else 0)
                rid_of[call.name], call_of[rid] = rid, call.name
                result.calls[call.name] = CallResult("", [], None, len(ids), obj, time.perf_counter() - t0,
                                                     start_step=engine.stats.steps)
                result.prompt_tokens += len(ids)
            for out in engine.step():
                name = call_of.get(out.request_id)
                if name is None or not out.finished:
                    continue
                c, r = out.outputs[0], result.calls[name]
                r.text, r.token_ids, r.finish_reason = c.text, list(c.token_ids), c.finish_reason
                r.completion_tokens = len(c.token_ids)
                r.end_s, r.end_step = time.perf_counter() - t0, engine.stats.steps
                state.complete(name, c.text)
    finally:
        for name, rid in rid_of.items():              # an error leaves no request (and no block) behind
            if name not in state.done:
                engine.abort(rid)
    result.outputs = state.outputs()
    result.wall_s = time.perf_counter() - t0
    result.prefilled_tokens = engine.stats.prefill_tokens - prefilled0
    return result


def run_sequential(llm, program: Program, limits: ProgramLimits = ProgramLimits()) -> ProgramResult:
    """The naive path: one call at a time in declaration order (each after the calls it names, which
    `Program.validate` guarantees only for a topological declaration order: else the next call whose
    inputs exist), through ``llm.generate`` as a client would issue requests one by one."""
    program.validate(limits)
    state = ProgramState(program, {n: Objective("latency", 0, 0) for n in program.deps()}, limits.max_rendered_chars)
    tok = llm.tokenizer
    result = ProgramResult({})
    engine = getattr(llm, "engine", None)
    prefilled0 = engine.stats.prefill_tokens if engine is not None else 0
    t0 = time.perf_counter()
    while not state.finished:
        call = state.take_ready_one()
        ids = tok.encode(call_prompt_text(tok, call, state.prompt(call)))
        start = time.perf_counter() - t0
        out = llm.generate([{"prompt_token_ids": ids}], call_params(call), use_tqdm=False)[0].outputs[0]
        result.calls[call.name] = CallResult(out.text, list(out.token_ids), out.finish_reason, len(ids), None,
                                             start, time.perf_counter() - t0, len(out.token_ids))
        result.prompt_tokens += len(ids)
        state.complete(call.name, out.text)
    result.outputs = state.outputs()
    result.wall_s = time.perf_counter() - t0
    result.prefilled_tokens = (engine.stats.prefill_tokens - prefilled0) if engine is not None else result.prompt_tokens
    return result
