"""POST /v1/programs: a program of LLM calls submitted at once (lesson 16, Parrot's semantic variables).

    {"calls": [{"name", "prompt" (may hold {{var}}), "max_tokens"?, "temperature"?, "top_p"?, "seed"?,
                "stop"?, "chat"?}, ...],
     "inputs"?: {name: text}, "outputs"?: [call names], "model"?, "user"?}
    -> {"id", "object": "program", "created", "model", "outputs": {name: text},
        "calls": [{"name", "text", "token_ids", "finish_reason", "objective", "priority", "prompt_tokens",
                   "completion_tokens", "start_s", "end_s"}], "usage": {...}}

The server sees the whole DAG (`minisys.programs`). It validates it first
(an unknown field, an undefined variable, a cycle, a call no output uses, an input no call uses, more
calls than ``--max-program-calls``: a 400 naming the field; nothing runs),
deduces each call's objective (critical path: priority 0, else 1; it acts
under ``--scheduling-policy priority``), then runs it: every ready call is
added to the engine at once, in priority order, and the moment a call
finishes the calls it unblocks are added while the rest keep running. Each
call goes through `Server.add`, so it is counted in the admission limits
like a completion (a 429 or a prompt too long for the context, met when the
call is ready, ends the program with that error naming the call). A chat
call's prompt goes through the chat template exactly as
``/v1/chat/completions`` renders ``messages=[{"role": "user", "content":
prompt}]``, so greedy outputs equal a client's issuing the calls one by one.

Invariant: when the response is sent (answered, failed, refused, or the
client gone: 499) every call of the program is finished or aborted and its
admission ticket released: no KV block is left held.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from ..engine.sampling_params import RequestOutputKind
from ..programs.graph import Call, Program, ProgramError, ProgramLimits
from ..programs.runner import call_params, call_prompt_text
from ..programs.scheduler import ProgramState, deduce_objectives
from .async_engine import AsyncEagerEngine, EngineDeadError, PromptError, RequestStream, ServerShuttingDown
from .errors import OpenAIError, error_body, internal_error_body
from .openapi import error_responses, json_response
from .protocol import random_id

DISCONNECT_POLL_S = 0.25


class ProgramCallSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    prompt: StrictStr
    max_tokens: StrictInt = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[StrictInt] = None
    stop: list[StrictStr] = []
    chat: StrictBool = True


class ProgramRequest(BaseModel):
    """POST /v1/programs (anything else is a 400 naming it)."""

    model_config = ConfigDict(extra="forbid")
    calls: list[ProgramCallSpec]
    inputs: dict[StrictStr, StrictStr] = {}
    outputs: Optional[list[StrictStr]] = None
    model: Optional[str] = None
    user: Optional[str] = None

    def program(self) -> Program:
        return Program([Call(**{**c.model_dump(), "stop": tuple(c.stop)}) for c in self.calls],
                       dict(self.inputs), self.outputs)


class ProgramCallResult(BaseModel):
    name: str
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    objective: str
    priority: int
    prompt_tokens: int
    completion_tokens: int
    start_s: float
    end_s: float


class ProgramUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ProgramResponse(BaseModel):
    id: str
    object: str = "program"
    created: int
    model: str
    outputs: dict[str, str]
    calls: list[ProgramCallResult]
    usage: ProgramUsage


@dataclass
class _Running:
    """One call in the engine: its stream, admission ticket and what it produced so far."""

    call: Call
    streams: list[RequestStream]
    ticket: object
    prompt_tokens: int
    start_s: float
    end_s: float = 0.0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None


async def _drain(r: _Running) -> _Running:
    async for out in r.streams[0]:               # DELTA outputs: add them up
        c = out.outputs[0]
        r.text += c.text
        r.token_ids += list(c.token_ids)
        r.finish_reason = c.finish_reason
    return r


class ProgramRun:
    """One program on the server (see the module docstring)."""

    def __init__(self, server, program: Program, user: Optional[str]) -> None:
        self.server, self.program, self.user = server, program, user
        self.state = ProgramState(program, deduce_objectives(program))
        self.index = {c.name: i for i, c in enumerate(program.calls)}
        self.id = random_id("prog")
        self.running: dict[asyncio.Task, _Running] = {}
        self.results: dict[str, _Running] = {}
        self.t0 = time.perf_counter()

    async def start_ready(self) -> None:
        """Add every ready call to the engine, in priority order, in ONE trip to the engine thread (one
        add per call would wait behind a step each); each call holds its own admission ticket."""
        calls = self.state.take_ready()
        if not calls:
            return
        if self.server.draining:
            raise OpenAIError("the server is shutting down; retry later or elsewhere", status=503,
                              type="service_unavailable", code="server_shutting_down")
        tickets: list = []
        try:
            try:
                prompts = [self.state.prompt(c) for c in calls]
            except ProgramError as e:
                raise OpenAIError(str(e), param=e.field, code="invalid_program") from None
            ids = await asyncio.to_thread(lambda: [self._ids(c, t) for c, t in zip(calls, prompts)])
            for c, x in zip(calls, ids):
                tickets.append(self._admit(c, len(x)))
            ranked = not isinstance(self.server.engine, AsyncEagerEngine)   # eager: no scheduler, refuses a priority
            items = [(f"{self.id}-{c.name}", x, replace(call_params(c), output_kind=RequestOutputKind.DELTA),
                      None, {"client": self.user, "priority": self.state.objectives[c.name].priority if ranked else 0})
                     for c, x in zip(calls, ids)]          # DELTA outputs: added up in _drain
            streams = await self.server.engine.add_requests(items)       # all or none
        except PromptError as e:
            for t in tickets:
                self.server.admission.release(t)
            raise OpenAIError(f"{self._where(calls[e.index])}: {e.reason}",
                              param=f"calls[{self.index[calls[e.index].name]}].prompt") from None
        except EngineDeadError as e:
            for t in tickets:
                self.server.admission.release(t)
            raise OpenAIError(str(e), status=500, type="internal_error", code="engine_dead") from None
        except BaseException:
            for t in tickets:
                self.server.admission.release(t)
            raise
        now = time.perf_counter() - self.t0
        for c, x, stream, ticket in zip(calls, ids, streams, tickets):
            r = _Running(c, [stream], ticket, len(x), now)
            self.running[asyncio.create_task(_drain(r))] = r

    def _where(self, call: Call) -> str:
        return f"calls[{self.index[call.name]}] ({call.name})"

    def _admit(self, call: Call, num_tokens: int):
        """The call's admission ticket (`Admission.admit`), or its 400/429 naming the call."""
        try:
            return self.server.admission.admit([num_tokens], 1, self.user)
        except OpenAIError as e:
            raise OpenAIError(f"{self._where(call)}: {e.message}", status=e.status, type=e.type,
                              param=f"calls[{self.index[call.name]}].prompt", code=e.code) from None

    def _ids(self, call: Call, text: str) -> list[int]:
        """The call's prompt ids, or a 400 naming the call (a prompt that cannot fit the context)."""
        tok = self.server.tokenizer
        try:
            return tok.encode(call_prompt_text(tok, call, text), limit=self.server.engine.max_model_len)
        except ValueError as e:
            raise OpenAIError(f"{self._where(call)}: {e}", param=f"calls[{self.index[call.name]}].prompt") from None

    async def run(self, raw: Request) -> None:
        """Run to the end; raises `asyncio.CancelledError` if the client goes away meanwhile."""
        try:
            await self.start_ready()
            while self.running:
                done, _ = await asyncio.wait(set(self.running), timeout=DISCONNECT_POLL_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if await raw.is_disconnected():      # every wake-up: calls that keep finishing never time out
                    raise asyncio.CancelledError("client disconnected")
                for task in done:
                    task.result()             # an engine failure raises here (close() then finishes r)
                    r = self.running.pop(task)
                    r.end_s = time.perf_counter() - self.t0
                    self.server.finish(r.streams, r.ticket)
                    self.results[r.call.name] = r
                    self.state.complete(r.call.name, r.text)
                await self.start_ready()
        finally:
            self.close()

    def close(self) -> None:
        """Abort every call still running and release its ticket (idempotent)."""
        for task, r in list(self.running.items()):
            task.cancel()
            self.server.finish(r.streams, r.ticket)
        self.running.clear()

    def response(self) -> ProgramResponse:
        calls = []
        for c in self.program.calls:
            r, obj = self.results[c.name], self.state.objectives[c.name]
            calls.append(ProgramCallResult(name=c.name, text=r.text, token_ids=r.token_ids, finish_reason=r.finish_reason,
                                           objective=obj.kind, priority=obj.priority,
                                           prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids),
                                           start_s=r.start_s, end_s=r.end_s))
        prompt = sum(c.prompt_tokens for c in calls)
        completion = sum(c.completion_tokens for c in calls)
        return ProgramResponse(id=self.id, created=int(time.time()), model=self.server.model_name,
                               outputs=self.state.outputs(), calls=calls,
                               usage=ProgramUsage(prompt_tokens=prompt, completion_tokens=completion,
                                                  total_tokens=prompt + completion))


def check_program(server, req: ProgramRequest) -> Program:
    """The request's program, validated (400 naming the field; nothing runs)."""
    program = req.program()
    limits = ProgramLimits(max_calls=server.admission.limits.max_program_calls,
                           max_tokens=server.engine.max_model_len)
    try:
        program.validate(limits)
    except ProgramError as e:
        raise OpenAIError(str(e), param=e.field, code="invalid_program") from None
    for i, c in enumerate(program.calls):
        try:
            call_params(c)
        except ValueError as e:
            raise OpenAIError(f"calls[{i}] ({c.name}): {e}", param=f"calls[{i}]", code="invalid_program") from None
    return program


def install_programs(app: FastAPI, server, parse) -> None:
    """Register POST /v1/programs on ``app`` (``parse``: the app's body parser, ``await parse(raw, Model)``)."""
    auth = (401,) if server.api_key else ()

    @app.post("/v1/programs", responses={**json_response(ProgramResponse, "every call's output"),
                                         **error_responses(400, *auth, 404, 413, 429, 500, 503)})
    async def programs(raw: Request):
        req = await parse(raw, ProgramRequest)
        server.check_model(req.model)
        program = await asyncio.to_thread(check_program, server, req)
        run = ProgramRun(server, program, req.user)
        try:
            await run.run(raw)
        except asyncio.CancelledError:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        except OpenAIError:
            raise
        except ServerShuttingDown as exc:
            return JSONResponse(error_body(str(exc), "service_unavailable", code="server_shutting_down"),
                                status_code=503)
        except Exception as exc:      # an engine failure: the log has it under the error id
            return JSONResponse(internal_error_body(exc, f"program {run.id} failed"), status_code=500)
        return JSONResponse(run.response().model_dump())

    from .embeddings import _document_body
    _document_body(app, "/v1/programs", ProgramRequest)
