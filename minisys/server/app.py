"""The FastAPI app: OpenAI's routes over an async engine (vLLM's `api_server`, small).

    GET  /v1/models              the one served model
    POST /v1/completions         text or token-id prompts (a list of them -> one choice set each)
    POST /v1/chat/completions    messages -> the model's chat template -> completion
    POST /v1/embeddings          text or token ids -> vectors (`embeddings`, lesson 16)
    POST /v1/programs            a DAG of LLM calls with semantic variables, run at once (`programs`, lesson 16)
    GET  /health                 200 while the engine loop is alive
    GET  /metrics                Prometheus text (see `metrics`)
    GET  /minisys/load           free KV blocks, queue, prefix hits: what a router reads (`load`, lesson 14)

A request may name itself with the header ``X-Request-Id`` (as vLLM
honours it): that id is its engine request id and its response ``id``
(a router uses it to address the request later); an id already in flight
here is a 400 (``duplicate_request_id``), and so is one that is not 1-128
printable ASCII characters.

Streaming is server-sent events: ``data: {chunk}\\n\\n`` per choice delta,
the choice's ``finish_reason`` on its last chunk, an optional usage chunk
(``stream_options.include_usage``) and ``data: [DONE]``. The deltas of a
choice add up to exactly the text a non-streamed request returns (the
engine holds back text that could still become a stop string).

Invariant: every request added to the engine either finishes or is
aborted; the generator's ``finally`` aborts it when the client goes away
mid-stream or while queued (starlette cancels the stream on disconnect), and
non-streamed requests poll ``is_disconnected``. Each HTTP request's
admission `Ticket` (`limits`) is released exactly when its engine requests
are finished or aborted (`Server.finish`). On shutdown (`shutdown`)
`Server.drain` refuses new requests (503) and, at the end of the grace
period, ends the open ones with `ServerShuttingDown` (an SSE error event
or a 503), aborting them in the engine.

Nothing heavy runs on the event loop: the body is parsed and validated,
the chat template applied and the prompts tokenized in a worker thread
(`asyncio.to_thread`; HF ``tokenizers`` is thread-safe and releases the
GIL), the engine steps and detokenizes on its own thread, and a body over
``--max-body-bytes`` is refused with a 413 before it is parsed
(`middleware`). So ``/health`` and the other streams keep being served
while any request is being prepared.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from ..model.tokenizer import Tokenizer
from ..streaming import ClosingStreamingResponse
from .async_engine import EngineDeadError, PromptError, RequestMigrated, RequestStream, ServerShuttingDown
from .body_text import check_body_text
from .embeddings import install_embeddings
from .programs import install_programs
from .interpreter import collections_paused
from .kv_routes import check_kv_request, install_kv_routes, pull_prefilled
from .errors import OpenAIError, error_body, install_error_handlers, internal_error_body
from .load import load_report
from .limits import Admission, ServerLimits, Ticket
from .metrics import ServerMetrics
from .middleware import PROTECTED, ApiKeyMiddleware, BodyLimitMiddleware, ErrorCountMiddleware
from .openapi import error_responses, install_openapi, json_response
from .timeouts import ServerTimeouts
from .tools import StreamDelta, ToolMode, hermes
from . import protocol as P

DISCONNECT_POLL_S = 0.25
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"[!-~]{1,128}")     # printable ASCII, no spaces
VALIDATE_CHUNK = 1000      # chat messages validated per call (pydantic holds the GIL while it validates)
_MESSAGES = TypeAdapter(list[P.ChatMessage])


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    echoed: bool = False                       # the prompt (echo) already put in front of the text
    pending: list = field(default_factory=list)   # (token id, {id: Logprob} or None) not yet sent
    offset: int = 0                            # text_offset of the next token (completions logprobs)

    def take_logprobs(self) -> list:
        out, self.pending = self.pending, []
        return out


@dataclass
class _Tracker:
    """Per-request bookkeeping: each choice's text so far (the non-streamed body), usage, latency metrics.

    Choice ``index = prompt_index * n + choice_index`` (as vLLM numbers batched prompts).
    """

    n: int
    prompt_lens: list[int]
    metrics: ServerMetrics
    arrival: float
    choices: list[_Choice] = field(default_factory=list)
    last_token_time: Optional[float] = None
    continuous_usage: bool = False            # usage so far on every streamed chunk
    want_logprobs: bool = False               # collect each token's logprobs (params.logprobs is set)
    num_top: int = 0                          # alternatives per token (params.logprobs)
    echo: Optional[list[tuple[str, list[int]]]] = None   # per prompt: its text and ids, put before the output
    prompt_logprobs: dict = field(default_factory=dict)  # prompt index -> its prompt logprobs (echo, prompt_logprobs)
    kv_transfer_params: Optional[dict] = None  # a disaggregated prefill's: where its KV waits (lesson 14)

    def __post_init__(self) -> None:
        self.choices = [_Choice() for _ in range(self.n * len(self.prompt_lens))]
        self.metrics.prompt_tokens.inc(sum(self.prompt_lens))

    def update(self, prompt_index: int, out: RequestOutput) -> list[tuple[int, str, _Choice]]:
        """(index, text delta, choice) for each choice that has new text or just finished.

        With ``echo`` a choice's first delta starts with its prompt (and its logprobs with the
        prompt's: they arrive, whole, with or before the request's first token)."""
        events, new_tokens = [], 0
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        if out.kv_transfer_params is not None:
            self.kv_transfer_params = out.kv_transfer_params
        for c in out.outputs:
            idx = prompt_index * self.n + c.index
            ch = self.choices[idx]
            if ch.finish_reason is not None:
                continue
            new_tokens += len(c.token_ids)                     # outputs are deltas (RequestOutputKind.DELTA)
            text = c.text
            if self.echo is not None and not ch.echoed:
                ch.echoed = True
                prompt_text, prompt_ids = self.echo[prompt_index]
                text = prompt_text + text
                if self.want_logprobs:
                    ch.pending += list(zip(prompt_ids, self.prompt_logprobs[prompt_index]))
            if self.want_logprobs:
                ch.pending += list(zip(c.token_ids, c.logprobs or []))
            ch.text += text
            ch.num_tokens += len(c.token_ids)
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
            if text or ch.finish_reason is not None:
                events.append((idx, text, ch))
        self._observe(new_tokens)
        return events

    def _observe(self, new_tokens: int) -> None:
        if not new_tokens:
            return
        now = time.perf_counter()
        m = self.metrics
        if self.last_token_time is None:
            m.ttft.observe(now - self.arrival)
        else:
            m.itl.observe(now - self.last_token_time)
        self.last_token_time = now
        m.generation_tokens.inc(new_tokens)
        if self.done:
            m.e2e.observe(now - self.arrival)
            m.finished([c.finish_reason for c in self.choices])

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> P.UsageInfo:
        prompt = sum(self.prompt_lens)
        completion = sum(c.num_tokens for c in self.choices)
        return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several request streams, as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _param_of(message: str) -> Optional[str]:
    """The request field a `SamplingParams` message is about (its first word, up to a ``.`` or ``[``:
    ``tools[0].function.name`` -> ``tools``), if it names one."""
    word = re.match(r"[A-Za-z_]*", message).group(0)
    fields = set(P.CompletionRequest.model_fields) | set(P.ChatCompletionRequest.model_fields) \
        | set(P.TokenizeRequest.model_fields)
    return word if word in fields else None


def _sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


class Server:
    """The routes' shared state: engine, tokenizer, served model name, API key, metrics, admission."""

    def __init__(self, engine, tokenizer: Tokenizer, model_name: str, api_key: Optional[str] = None,
                 limits: Optional[ServerLimits] = None, tool_call_parser: Optional[str] = None) -> None:
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.tool_call_parser = tool_call_parser     # None: tool_choice "auto" is refused (vLLM's rule)
        self.metrics = ServerMetrics(model_name, engine.stats, getattr(engine, "client_service", None))
        self.admission = Admission(limits or ServerLimits())
        self.draining = False        # shutting down: new requests get 503 (`drain`)
        self.kv = None               # `kv_routes.KVState` when started with --kv-connector (lesson 14)

    async def drain(self, abort_after_s: float, poll_s: float = 0.05) -> None:
        """Shutdown (`shutdown`): refuse new requests (503); let those in flight finish for up to
        ``abort_after_s`` seconds, then end the rest with `ServerShuttingDown` (an SSE error event, or a
        503) and abort them in the engine, which frees their KV blocks."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + abort_after_s
        while self.engine.num_open and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        aborted = self.engine.fail_all(ServerShuttingDown())
        self.metrics.requests_aborted.inc(aborted)

    # ------------------------------------------------------------ request in
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                              status=404, param="model", code="model_not_found")

    async def add(self, base_id: str, prompts: list[tuple[Optional[str], list[int]]],
                  params: SamplingParams, meta: Optional[dict] = None, imported=None
                  ) -> tuple[list[RequestStream], Ticket]:
        """Admit (`Admission`: 400/429 naming the limit) and add one engine request per prompt, all in
        one engine call; on a refusal nothing stays queued or reserved (400 naming the prompt).
        ``meta``: ``client`` (the OpenAI ``user``), ``priority``, ``qoe`` for the scheduling policy.
        ``imported``: (snapshot, k, v) of a request prefilled elsewhere (lesson 14): it continues here."""
        if self.draining:
            raise OpenAIError("the server is shutting down; retry later or elsewhere", status=503,
                              type="service_unavailable", code="server_shutting_down")
        meta = meta or {}
        self.check_request_id(base_id, len(prompts))
        ticket = self.admission.admit([len(ids) for _, ids in prompts], params.n, meta.get("client"))
        items = [(base_id if len(prompts) == 1 else f"{base_id}-{i}", ids, params, text, meta)
                 for i, (text, ids) in enumerate(prompts)]
        try:
            if imported is not None:
                streams = [await self.engine.add_imported(base_id, *imported, streamed=False)]
            else:
                streams = await self.engine.add_requests(items)       # all or none
        except ValueError as e:                      # an import this engine cannot take
            self.admission.release(ticket)
            if isinstance(e, PromptError):
                where = f"prompt {e.index}: " if len(prompts) > 1 else ""
                raise OpenAIError(where + e.reason, param=_param_of(e.reason) or "prompt") from None
            raise OpenAIError(f"kv_transfer_params: {e}", param="kv_transfer_params") from None
        except EngineDeadError as e:                 # the engine cannot step (a tensor-parallel worker died)
            self.admission.release(ticket)
            raise OpenAIError(str(e), status=500, type="internal_error", code="engine_dead") from None
        except BaseException:
            self.admission.release(ticket)
            raise
        return streams, ticket

    def check_request_id(self, base_id: str, num_prompts: int) -> None:
        """400 if one of the engine ids this request would take is in flight (a client's X-Request-Id
        used twice). Checked and taken without an await in between (`add`): no race on the loop."""
        ids = [base_id] if num_prompts == 1 else [f"{base_id}-{i}" for i in range(num_prompts)]
        in_flight = getattr(self.engine, "_queues", {})
        if any(rid in in_flight for rid in ids):
            raise OpenAIError(f"request id {base_id!r} (header X-Request-Id) is already in flight on this "
                              f"server; use a new id", param="X-Request-Id", code="duplicate_request_id")

    def abort(self, streams: list[RequestStream]) -> None:
        """Abort the unfinished streams (no-op for finished ones: safe to call again)."""
        for s in streams:
            if not s.finished:
                s.finished = True
                self.engine.abort(s.request_id)
                self.metrics.requests_aborted.inc()

    def finish(self, streams: list[RequestStream], ticket: Ticket) -> None:
        """The HTTP request is over (answered, failed or gone): abort what is left, release its ticket."""
        self.abort(streams)
        self.admission.release(ticket)

    async def collect(self, raw: Request, streams: list[RequestStream], tracker: _Tracker) -> None:
        """Run a non-streamed request to the end; abort it if the client disconnects meanwhile."""
        async def consume() -> None:
            async for i, out in _merge(streams):
                tracker.update(i, out)

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return
                if await raw.is_disconnected():
                    task.cancel()
                    raise asyncio.CancelledError("client disconnected")
        finally:
            if not task.done():
                task.cancel()
            self.abort(streams)

    def tokenize_prompts(self, req: P.CompletionRequest) -> list[tuple[Optional[str], list[int]]]:
        """(text, ids) per prompt. Blocking: the routes run it in a worker thread."""
        out = []
        for p in req.prompts():
            limit = None if req.truncate_prompt_tokens is not None else self.engine.max_model_len
            ids = self.tokenizer.encode(p, limit=limit) if isinstance(p, str) else list(p)
            kept = req.truncate(ids, self.engine.max_model_len)       # truncate_prompt_tokens
            out.append((p if isinstance(p, str) and len(kept) == len(ids) else None, kept))
        return out

    def prepare(self, req: Union[P.CompletionRequest, P.ChatCompletionRequest]
                ) -> tuple[SamplingParams, Optional[ToolMode]]:
        """The request's `SamplingParams` and tool mode, its grammar compiled into the engine's cache.
        Blocking (tool schemas checked, grammars compiled): the routes run it in a worker thread."""
        with collections_paused():
            params = req.to_sampling_params()
            mode = self.tool_mode(req) if isinstance(req, P.ChatCompletionRequest) else None
        if params.structured_outputs is not None:
            self.engine.compile_grammar(params.structured_outputs)
        return params, mode

    def tool_mode(self, req: P.ChatCompletionRequest) -> Optional[ToolMode]:
        """The request's tool mode (`ToolMode`); ValueError naming tool_choice for "auto" on a server started
        without ``--enable-auto-tool-choice --tool-call-parser`` (vLLM's message)."""
        mode = req.tool_mode()
        if mode is not None and mode.kind == "auto" and self.tool_call_parser is None:
            raise ValueError('tool_choice "auto" (the default when tools are given) requires the server to be '
                             'started with --enable-auto-tool-choice --tool-call-parser hermes; or ask for '
                             'tool_choice "required", a named function, or "none"')
        return mode

    def chat_prompt(self, req: Union[P.ChatCompletionRequest, P.TokenizeRequest], bounded: bool = True
                    ) -> list[tuple[Optional[str], list[int]]]:
        """The conversation through the chat template, tokenized. Blocking: run in a worker thread.
        ``bounded``: a text that cannot fit the model's context is refused before tokenizing.

        The tools (and the history's tool calls and results) go to the template when it has a tool format
        (`Tokenizer.template_has_tools`); otherwise they are written into the messages in the Hermes
        format (`tools.hermes.render_conversation`), which is what ``--tool-call-parser hermes`` reads."""
        with collections_paused():        # no GC pass over a long conversation's objects (`interpreter`)
            text = self._render(req)
        truncating = getattr(req, "truncate_prompt_tokens", None) is not None
        ids = self.tokenizer.encode(text, limit=self.engine.max_model_len if bounded and not truncating else None)
        if isinstance(req, P.ChatCompletionRequest):
            kept = req.truncate(ids, self.engine.max_model_len)        # truncate_prompt_tokens
            if len(kept) < len(ids):
                return [(None, kept)]
        return [(text, ids)]

    def _render(self, req: Union[P.ChatCompletionRequest, P.TokenizeRequest]) -> str:
        """The conversation (and tools) through the chat template, as text."""
        conversation = [m.as_dict() for m in req.messages]
        tools = req.tools_for_template() if isinstance(req, P.ChatCompletionRequest) else None
        if not self.tokenizer.template_has_tools:
            conversation, tools = hermes.render_conversation(conversation, tools), None
        try:
            return self.tokenizer.apply_chat_template(conversation, req.add_generation_prompt, tools=tools)
        except ValueError:
            raise
        except Exception as e:            # jinja2 errors from the template
            raise OpenAIError(f"could not apply the chat template: {e}") from None


def _parse_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    """The request model of a JSON body, with FastAPI's error shapes (RequestValidationError -> 400).

    Blocking (runs in a worker thread). A long ``messages`` list is validated
    in slices of `VALIDATE_CHUNK`: pydantic holds the GIL while it validates,
    and 100,000 messages in one call would stall the event loop for ~1 s.
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
                                       "msg": "JSON decode error", "input": {},
                                       "ctx": {"error": getattr(e, "msg", str(e))}}]) from None
    except RecursionError:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": "nested too deeply"}}]) from None
    check_body_text(body, data)                 # a lone surrogate anywhere: 400 naming the field
    messages = data.get("messages") if isinstance(data, dict) else None
    chunked = isinstance(messages, list) and len(messages) > VALIDATE_CHUNK and "messages" in model.model_fields
    try:
        if not chunked:
            return model.model_validate(data)
        req = model.model_validate({**data, "messages": []})
        parsed: list = []
        for start in range(0, len(messages), VALIDATE_CHUNK):
            try:
                parsed += _MESSAGES.validate_python(messages[start:start + VALIDATE_CHUNK])
            except ValidationError as e:     # indices relative to the slice -> to the whole list
                raise RequestValidationError([{**err, "loc": ("body", "messages", err["loc"][0] + start,
                                                              *err["loc"][1:])} for err in e.errors()]) from None
        req.messages = parsed
        return req
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _parse_paused(body: bytes, model: type[BaseModel]) -> BaseModel:
    with collections_paused():             # no GC pass over a big body's objects (`interpreter`)
        return _parse_body(body, model)


async def _parse(raw: Request, model: type[BaseModel]) -> BaseModel:
    return await asyncio.to_thread(_parse_paused, await raw.body(), model)


def build_app(engine, tokenizer: Tokenizer, model_name: str, api_key: Optional[str] = None,
              limits: Optional[ServerLimits] = None, metrics_open: bool = False,
              timeouts: Optional[ServerTimeouts] = None, tool_call_parser: Optional[str] = None,
              kv=None) -> FastAPI:
    """The FastAPI app serving ``engine`` (an `AsyncLLMEngine` or `AsyncEagerEngine`, not yet started).

    ``api_key``: required on /v1 (and /metrics unless ``metrics_open``);
    ``limits``: admission and body-size limits (default `ServerLimits()`);
    ``timeouts``: the body read timeout (the header one is the protocol's: `timeouts`);
    ``tool_call_parser``: the parser of tool_choice "auto" (`tools.TOOL_CALL_PARSERS`; None: "auto" is refused);
    ``kv``: a `kv_routes.KVState` (``--kv-connector``): disaggregation, migration and attach routes (lesson 14).
    """
    limits = limits or ServerLimits()
    timeouts = timeouts or ServerTimeouts()
    server = Server(engine, tokenizer, model_name, api_key, limits, tool_call_parser)

    server.kv = kv

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start()
        chores = None
        if kv is not None:
            kv.start(engine)
            chores = asyncio.create_task(kv.housekeeping(engine))
        yield
        if chores is not None:
            chores.cancel()
        await engine.shutdown()

    app = FastAPI(title="minisys", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)

    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes,         # innermost
                       timeout_s=timeouts.timeout_body_s)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, protect_metrics=not metrics_open)
    app.add_middleware(ErrorCountMiddleware, count=server.metrics.error)           # outermost
    v1_auth = (401,) if api_key else ()
    metrics_auth = (401,) if api_key and not metrics_open else ()
    install_openapi(app, {"/v1/completions": P.CompletionRequest, "/v1/chat/completions": P.ChatCompletionRequest,
                          "/tokenize": P.TokenizeRequest, "/detokenize": P.DetokenizeRequest},
                    secured=(PROTECTED if api_key else ()) + (("/metrics",) if metrics_auth else ()))
    post_errors = error_responses(400, *v1_auth, 404, 413, 429, 500, 503)
    install_embeddings(app, server, _parse)                                       # POST /v1/embeddings
    install_programs(app, server, _parse)                                         # POST /v1/programs

    @app.get("/health", response_class=PlainTextResponse, responses=error_responses(503))
    async def health():
        if not engine.is_running:
            return JSONResponse(error_body("the engine loop is not running", "internal_error"), status_code=503)
        if server.draining:
            return JSONResponse(error_body("the server is shutting down", "service_unavailable"), status_code=503)
        return PlainTextResponse("")

    @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(*metrics_auth))
    async def metrics(request: Request):
        body, content_type = server.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/minisys/load", responses=error_responses(*v1_auth, 404))
    async def load():
        if not hasattr(engine, "engine"):
            raise OpenAIError("/minisys/load needs the engine's KV pool (--engine llm)", status=404)
        return JSONResponse(load_report(engine.engine))

    @app.get("/v1/models", responses={**json_response(P.ModelList, "the served model"), **error_responses(*v1_auth)})
    async def models():
        card = P.ModelCard(id=model_name, root=model_name, max_model_len=engine.max_model_len)
        return JSONResponse(P.ModelList(data=[card]).model_dump())

    @app.get("/v1/models/{model_id:path}", responses={**json_response(P.ModelCard, "the served model"),
                                                      **error_responses(*v1_auth, 404)})
    async def model_card(model_id: str):
        server.check_model(model_id)
        return JSONResponse(P.ModelCard(id=model_name, root=model_name, max_model_len=engine.max_model_len)
                            .model_dump())

    @app.get("/version", responses={**json_response(P.VersionResponse, "minisys's version"),
                                    **error_responses(*v1_auth)})
    async def version():
        from .. import __version__
        return JSONResponse({"version": __version__})

    small_post_errors = error_responses(400, *v1_auth, 404, 413, 500)

    @app.post("/tokenize", responses={**json_response(P.TokenizeResponse, "the prompt's token ids"),
                                      **small_post_errors})
    async def tokenize(raw: Request):
        req = await _parse(raw, P.TokenizeRequest)
        server.check_model(req.model)
        try:
            req.check()
            if req.prompt is not None:
                ids = await asyncio.to_thread(server.tokenizer.encode, req.prompt)
            else:
                ids = (await asyncio.to_thread(server.chat_prompt, req, False))[0][1]
        except ValueError as e:
            raise OpenAIError(str(e), param=_param_of(str(e))) from None
        return JSONResponse(P.TokenizeResponse(tokens=ids, count=len(ids),
                                               max_model_len=engine.max_model_len).model_dump())

    @app.post("/detokenize", responses={**json_response(P.DetokenizeResponse, "the text of the token ids"),
                                        **small_post_errors})
    async def detokenize(raw: Request):
        req = await _parse(raw, P.DetokenizeRequest)
        server.check_model(req.model)
        vocab = server.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"tokens: ids outside the vocabulary (size {vocab}): {bad[:5]}", param="tokens")
        text = await asyncio.to_thread(server.tokenizer.decode, req.tokens, False)
        return JSONResponse(P.DetokenizeResponse(prompt=text).model_dump())

    @app.post("/v1/completions", responses={**json_response(P.CompletionResponse, "the completion", stream=True),
                                            **post_errors})
    async def completions(raw: Request):
        req = await _parse(raw, P.CompletionRequest)
        server.check_model(req.model)
        try:
            check_kv_request(server, req)
            params, _ = await asyncio.to_thread(server.prepare, req)
            meta = req.request_meta()
            server.admission.check_shape(len(req.prompts()), params.n)     # before tokenizing anything
            prompts = await asyncio.to_thread(server.tokenize_prompts, req)
        except ValueError as e:
            raise OpenAIError(str(e), param=_param_of(str(e))) from None
        return await _respond(server, raw, req, params, meta, prompts, _request_id(raw, "cmpl"), chat=False)

    @app.post("/v1/chat/completions", responses={**json_response(P.ChatCompletionResponse, "the chat completion",
                                                                 stream=True), **post_errors})
    async def chat_completions(raw: Request):
        req = await _parse(raw, P.ChatCompletionRequest)
        server.check_model(req.model)
        try:
            check_kv_request(server, req)
            params, mode = await asyncio.to_thread(server.prepare, req)
            meta = req.request_meta()
            server.admission.check_shape(1, params.n)
            prompts = await asyncio.to_thread(server.chat_prompt, req)
        except ValueError as e:
            raise OpenAIError(str(e), param=_param_of(str(e))) from None
        return await _respond(server, raw, req, params, meta, prompts, _request_id(raw, "chatcmpl"), chat=True,
                              tools=mode if mode is not None and mode.reads_calls else None)

    if server.kv is not None:
        install_kv_routes(app, server, engine)

        @app.get("/minisys/attach/{request_id}")
        async def attach(request_id: str):
            return _attach(server, request_id)

    return app


def _request_id(raw: Request, prefix: str) -> str:
    """The request's id: its ``X-Request-Id`` header (vLLM's convention) or a new random one."""
    given = raw.headers.get(REQUEST_ID_HEADER)
    if given is None:
        return P.random_id(prefix)
    if not _REQUEST_ID_RE.fullmatch(given):
        raise OpenAIError("header X-Request-Id must be 1-128 printable ASCII characters without spaces",
                          param="X-Request-Id", code="invalid_request_id")
    return given


async def _respond(server: Server, raw: Request, req, params: SamplingParams, meta: dict,
                   prompts: list[tuple[Optional[str], list[int]]], request_id: str, chat: bool,
                   tools: Optional[ToolMode] = None):
    """Run the request; the response or the SSE stream. ``tools``: read tool calls from each chat choice."""
    kvp, imported = getattr(req, "kv_transfer_params", None), None
    if kvp is not None and kvp.do_remote_decode:
        meta = {**meta, "hold_after_first_token": True}
    elif kvp is not None:
        imported = await pull_prefilled(server, kvp, prompts[0][1], params, request_id)
    streams, ticket = await server.add(request_id, prompts, params, meta, imported)
    tracker = _Tracker(params.n, [len(ids) for _, ids in prompts], server.metrics, streams[0].arrival,
                       want_logprobs=params.logprobs is not None, num_top=params.logprobs or 0)
    if not chat and req.echo:
        tracker.echo = [(text if text is not None else server.tokenizer.decode(ids), ids) for text, ids in prompts]
    created = int(time.time())
    if req.stream:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        tracker.continuous_usage = bool(include_usage and opts.continuous_usage_stats)
        gen = _chat_stream(server, streams, ticket, tracker, request_id, created, include_usage, tools) if chat \
            else _completion_stream(server, streams, ticket, tracker, request_id, created, include_usage)
        on_close = lambda: server.finish(streams, ticket)      # noqa: E731
        if server.kv is not None and len(streams) == 1:        # it may migrate (lesson 14): what attach needs
            server.kv.contexts[request_id] = {"chat": chat, "id": request_id, "created": created,
                                              "include_usage": include_usage, "tools": tools is not None,
                                              "continuous_usage": tracker.continuous_usage}
            on_close = lambda: (server.finish(streams, ticket), server.kv.contexts.pop(request_id, None))  # noqa: E731
        return ClosingStreamingResponse(gen, on_close, media_type="text/event-stream")
    try:
        await server.collect(raw, streams, tracker)
    except asyncio.CancelledError:
        return JSONResponse(error_body("client disconnected"), status_code=499)
    except ServerShuttingDown as exc:
        return JSONResponse(_shutting_down_body(exc), status_code=503)
    except Exception as exc:
        return JSONResponse(internal_error_body(exc, f"generation failed for {request_id}"), status_code=500)
    finally:
        server.finish(streams, ticket)
    name = server.model_name
    if chat:
        choices = [P.ChatChoice(index=i, message=message, finish_reason=finish, stop_reason=c.stop_reason,
                                logprobs=_chat_logprobs(server.tokenizer, c, params.logprobs)
                                if tracker.want_logprobs else None)
                   for i, c in enumerate(tracker.choices) for message, finish in [_chat_message(c, tools)]]
        body = P.ChatCompletionResponse(id=request_id, created=created, model=name, choices=choices,
                                        usage=tracker.usage(),
                                        prompt_logprobs=_prompt_logprobs(tracker, prompts, 0, req.prompt_logprobs),
                                        kv_transfer_params=_kv_params_out(server, tracker))
    else:
        choices = [P.CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason,
                                      logprobs=_completion_logprobs(server.tokenizer, c, tracker.num_top)
                                      if tracker.want_logprobs else None,
                                      prompt_logprobs=_prompt_logprobs(tracker, prompts, i // params.n,
                                                                       req.prompt_logprobs))
                   for i, c in enumerate(tracker.choices)]
        body = P.CompletionResponse(id=request_id, created=created, model=name, choices=choices,
                                    usage=tracker.usage(), kv_transfer_params=_kv_params_out(server, tracker))
    return JSONResponse(body.model_dump())


def _kv_params_out(server: Server, tracker: _Tracker) -> Optional[dict]:
    """A held prefill's ``kv_transfer_params``: the engine's, plus this replica's rank."""
    if tracker.kv_transfer_params is None or server.kv is None:
        return None
    return {**tracker.kv_transfer_params, "remote_rank": server.kv.rank}


def _attach(server: Server, request_id: str):
    """``GET /minisys/attach/{id}``: a migrated-in request's continuation, in its original chunk format."""
    entry = server.kv.attachable.pop(request_id, None)
    if entry is None:
        raise OpenAIError(f"no migrated request {request_id!r} waits here to be attached", status=404,
                          param="request_id")
    snap, stream = entry.snapshot, entry.stream
    ctx = snap.meta.get("stream_ctx") or {}
    try:
        ticket = server.admission.admit([len(snap.prompt_token_ids)], 1, snap.client)
    except Exception:
        server.engine.abort(request_id)
        raise
    tracker = _Tracker(1, [len(snap.prompt_token_ids)], server.metrics, stream.arrival,
                       continuous_usage=bool(ctx.get("continuous_usage")))
    tracker.choices[0].num_tokens = len(snap.output_token_ids)
    tracker.last_token_time = time.perf_counter()
    rid, created, usage = ctx.get("id", request_id), ctx.get("created", int(time.time())), bool(ctx.get("include_usage"))
    if ctx.get("chat"):
        gen = _chat_stream(server, [stream], ticket, tracker, rid, created, usage, None, role=False)
    else:
        gen = _completion_stream(server, [stream], ticket, tracker, rid, created, usage)
    return ClosingStreamingResponse(gen, lambda: server.finish([stream], ticket), media_type="text/event-stream")


def _chat_message(ch: _Choice, tools: Optional[ToolMode]) -> tuple[P.ChatResponseMessage, Optional[str]]:
    """A finished chat choice's message and finish_reason; with ``tools``, its text read for tool calls."""
    if tools is None:
        return P.ChatResponseMessage(content=ch.text), ch.finish_reason
    parsed = tools.parse(ch.text)
    calls = [P.ToolCall(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls]
    return (P.ChatResponseMessage(content=parsed.content, tool_calls=calls),
            tools.finish_reason(ch.finish_reason, bool(calls)))


def _tool_deltas(d: StreamDelta) -> list[P.DeltaMessage]:
    """A parser's release as OpenAI streams it, one delta per chunk: the content, then per call its
    header (``id``, ``type``, ``name``, ``arguments: ""``) when it starts, then its arguments fragment."""
    out = [P.DeltaMessage(content=d.content)] if d.content else []
    for c in d.calls:
        if c.id is not None:
            out.append(P.DeltaMessage(tool_calls=[P.DeltaToolCall(
                index=c.index, id=c.id, type="function", function=P.DeltaFunctionCall(name=c.name, arguments=""))]))
        if c.arguments:
            out.append(P.DeltaMessage(tool_calls=[P.DeltaToolCall(
                index=c.index, function=P.DeltaFunctionCall(arguments=c.arguments))]))
    return out


def _token_text(tokenizer: Tokenizer, token: int, entry) -> str:
    return entry[token].decoded_token if entry else tokenizer.decode([token], skip_special_tokens=False)


def _lp(x: float) -> float:
    return max(x, -9999.0)        # JSON has no -inf (vLLM's clamp)


def _top(entry: dict, token: int, k: int) -> dict:
    """The token's own entry and its ``k`` most likely alternatives (the engine may have computed more:
    echo's and ``prompt_logprobs``' counts share one prompt computation)."""
    return {t: e for t, e in entry.items() if t == token or (e.rank is not None and e.rank <= k)}


def _prompt_logprobs(tracker: _Tracker, prompts: list[tuple[Optional[str], list[int]]], prompt_index: int,
                     k: Optional[int]) -> Optional[list]:
    """vLLM's ``prompt_logprobs`` field for one prompt: None, then per token {id: Logprob} (k alternatives)."""
    if k is None:
        return None
    ids = prompts[prompt_index][1]
    return [None if entry is None else
            {t: P.Logprob(logprob=_lp(e.logprob), rank=e.rank, decoded_token=e.decoded_token)
             for t, e in _top(entry, token, k).items()}
            for token, entry in zip(ids, tracker.prompt_logprobs[prompt_index])]


def _completion_logprobs(tokenizer: Tokenizer, ch: _Choice, num_top: int) -> P.CompletionLogprobs:
    """The choice's logprobs not yet sent, in the legacy completions shape (text offsets run on)."""
    lp = P.CompletionLogprobs()
    for token, entry in ch.take_logprobs():
        text = _token_text(tokenizer, token, entry)
        lp.tokens.append(text)
        lp.token_logprobs.append(None if entry is None else _lp(entry[token].logprob))
        lp.top_logprobs.append(None if entry is None else
                               {e.decoded_token: _lp(e.logprob) for e in _top(entry, token, num_top).values()})
        lp.text_offset.append(ch.offset)
        ch.offset += len(text)
    return lp


def _chat_logprobs(tokenizer: Tokenizer, ch: _Choice, num_top: int) -> P.ChatLogprobs:
    """The choice's logprobs not yet sent, in the chat shape: each token with its ``num_top`` most likely."""
    def item(cls, text, logprob, **kw):
        return cls(token=text, logprob=_lp(logprob), bytes=list(text.encode("utf-8")), **kw)
    content = []
    for token, entry in ch.take_logprobs():
        top = sorted((e for e in entry.values() if e.rank is not None and e.rank <= num_top), key=lambda e: e.rank)
        content.append(item(P.ChatTokenLogprob, _token_text(tokenizer, token, entry), entry[token].logprob,
                            top_logprobs=[item(P.ChatTopLogprob, e.decoded_token, e.logprob) for e in top][:num_top]))
    return P.ChatLogprobs(content=content)


def _shutting_down_body(exc: ServerShuttingDown) -> dict:
    return error_body(str(exc), "service_unavailable", code="server_shutting_down")


async def _stream_events(server: Server, streams: list[RequestStream], ticket: Ticket, tracker: _Tracker,
                         chunk, usage_chunk) -> AsyncIterator[str]:
    """SSE lines: ``chunk(index, delta, choice)`` per event (a chunk, or a list of them: none while a tool
    parser holds text back, several for a tool call's pieces), the usage chunk, ``[DONE]``; on exit aborts
    what is left and releases the ticket. A failure is an SSE error event (an error id, no exception
    text), counted as a 500."""
    try:
        async for i, out in _merge(streams):
            for idx, delta, ch in tracker.update(i, out):
                made = chunk(idx, delta, ch)
                for c in made if isinstance(made, list) else [made]:
                    if tracker.continuous_usage:          # vLLM's stream_options.continuous_usage_stats
                        c.usage = tracker.usage()
                    yield _sse(c)
        if usage_chunk is not None:
            yield _sse(usage_chunk(tracker.usage()))
    except RequestMigrated as m:               # lesson 14: the router follows it to the destination
        yield _sse({"minisys_migrated": {"request_id": m.request_id, "dst_rank": m.dst_rank}})
    except ServerShuttingDown as exc:
        server.metrics.error("503")
        yield _sse(_shutting_down_body(exc))
    except Exception as exc:
        server.metrics.error("500")
        yield _sse(internal_error_body(exc, "generation failed while streaming"))
    finally:
        server.finish(streams, ticket)   # no-op for finished requests; frees the KV blocks of the rest
    yield "data: [DONE]\n\n"


def _completion_stream(server, streams, ticket, tracker, request_id, created, include_usage):
    name = server.model_name

    def chunk(idx, delta, ch):
        lps = _completion_logprobs(server.tokenizer, ch, tracker.num_top) if tracker.want_logprobs else None
        return P.CompletionResponse(id=request_id, created=created, model=name, choices=[
            P.CompletionChoice(index=idx, text=delta, finish_reason=ch.finish_reason, stop_reason=ch.stop_reason,
                               logprobs=lps)])

    def usage_chunk(usage):
        return P.CompletionResponse(id=request_id, created=created, model=name, choices=[], usage=usage)

    return _stream_events(server, streams, ticket, tracker, chunk, usage_chunk if include_usage else None)


async def _chat_stream(server, streams, ticket, tracker, request_id, created, include_usage,
                       tools: Optional[ToolMode] = None, role: bool = True):
    """The chat SSE lines. With ``tools`` each choice's text goes through its own stream parser: content and
    call pieces as the parser releases them, the parser's finish_reason on the last chunk."""
    name = server.model_name
    parsers = [tools.stream_parser() for _ in tracker.choices] if tools is not None else None
    called = [False] * len(tracker.choices)

    def make(choices, usage=None):
        return P.ChatCompletionChunk(id=request_id, created=created, model=name, choices=choices, usage=usage)

    for idx in range(len(tracker.choices) if role else 0):   # the role first, before any token (as OpenAI does)
        yield _sse(make([P.ChatChunkChoice(index=idx, delta=P.DeltaMessage(role="assistant", content=""))]))

    num_top = tracker.num_top

    def chunk(idx, delta, ch):
        """The chunks of one event: one (its text) without tools; with tools, what the parser releases, one
        piece per chunk (none while it holds text back), logprobs on the first, finish_reason on the last."""
        finish = ch.finish_reason
        if parsers is None:
            messages = [P.DeltaMessage(content=delta)]
        else:
            d = parsers[idx].feed(delta)
            if finish is not None:
                d += parsers[idx].finish()
                finish = tools.finish_reason(finish, called[idx] or bool(d.calls))
            called[idx] = called[idx] or bool(d.calls)
            messages = _tool_deltas(d) or ([P.DeltaMessage()] if finish is not None else [])
        if not messages:
            return []
        lps = _chat_logprobs(server.tokenizer, ch, num_top) if tracker.want_logprobs else None
        last = len(messages) - 1
        return [make([P.ChatChunkChoice(index=idx, delta=m, logprobs=lps if k == 0 else None,
                                        finish_reason=finish if k == last else None,
                                        stop_reason=ch.stop_reason if k == last else None)])
                for k, m in enumerate(messages)]

    def usage_chunk(usage):
        return make([], usage)

    async for line in _stream_events(server, streams, ticket, tracker, chunk,
                                     usage_chunk if include_usage else None):
        yield line
