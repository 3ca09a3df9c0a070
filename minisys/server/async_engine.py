"""The engine stepping in the background, one stream of outputs per request.

    engine = AsyncLLMEngine(LLMEngine(model, tok))
    await engine.start()
    stream = await engine.add_request("r1", prompt_ids, params)  # ValueError: never servable
    streams = await engine.add_requests([(rid, ids, params, text, meta), ...])   # one trip, all or none
    async for out in stream:          # RequestOutput, cumulative text/token_ids per choice
        ...
    engine.abort("r1")                 # client gone: drop it, free its KV blocks

Threading invariant: the model forward blocks, so every call into the
synchronous engine (``add_request``, ``abort``, ``step``) runs on ONE worker
thread (a single-thread executor), in submission order; the asyncio event
loop never touches the engine's state directly and stays free to accept
connections and stream tokens while a step runs. The loop task owns the
stepping: it sleeps while nothing is unfinished, applies pending aborts
between steps, and hands each step's outputs to the requests' mailboxes
(`OutputSlot`: the newest cumulative output wins, so a slow reader costs
no memory).

A step that raises is logged with its traceback and an error id (logger
``minisys.server``), counted (``num_step_errors``), and fails only the
requests in flight, with an `EngineDeadError` carrying that id and no
exception text (the client sees the id; the log has the detail) When the
engine itself cannot step any more (``LLMEngine.failure``: a tensor-parallel
worker died, lesson 13) the loop ends: /health turns 503 and new requests
get `EngineDeadError` at once instead of waiting forever.

`AsyncEagerEngine` serves the same interface one request at a time with the
eager baseline (`EagerGenerator`): the baseline server of the benchmark.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from ..engine.eager import EagerGenerator
from ..engine.llm_engine import LLMEngine
from ..engine.outputs import CompletionOutput, RequestOutput
from ..engine.sampling_params import SamplingParams
from .errors import new_error_id

logger = logging.getLogger("minisys.server")

# (request id, prompt ids, params, prompt text, {client, priority, qoe} for the scheduling policy)
AddItem = tuple[str, list[int], SamplingParams, "str | None", dict]


class EngineDeadError(RuntimeError):
    """The engine raised while stepping; the requests that were in it cannot continue.

    Its message is generic: the exception's text and traceback are in the
    log under ``error_id``, never sent to a client.
    """

    def __init__(self, error_id: str) -> None:
        super().__init__(f"the engine failed (error id {error_id})")
        self.error_id = error_id


class ServerShuttingDown(RuntimeError):
    """The server is shutting down (SIGTERM/SIGINT, `shutdown`): the request was aborted, retry elsewhere."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down: the request was aborted; retry it later or elsewhere")


class RequestMigrated(Exception):
    """The request left this engine for rank ``dst_rank`` (live migration, lesson 14): its stream here
    ends after every output produced here; the continuation is served there."""

    def __init__(self, request_id: str, dst_rank: int) -> None:
        super().__init__(f"request {request_id!r} migrated to rank {dst_rank}")
        self.request_id, self.dst_rank = request_id, dst_rank


class PromptError(ValueError):
    """`add_requests`: item ``index`` can never be served (``reason``: the engine's message); nothing added."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _log_failure(what: str, num_requests: int) -> str:
    """Log the exception being handled, with its traceback, under a new error id; return the id."""
    error_id = new_error_id()
    logger.error("%s (error id %s); failing %d request(s)", what, error_id, num_requests, exc_info=True)
    return error_id


class OutputSlot:
    """A one-item mailbox: unread outputs are merged into one (or replaced by an error).

    Outputs are deltas (``RequestOutputKind.DELTA``: each carries only the new
    text and token ids), so a newer output is *added* to an unread one
    (`RequestOutput.add`): a client that reads slowly gets bigger deltas, not
    an ever-growing queue (backpressure without unbounded memory), and nothing
    is lost. An error replaces anything unread.
    """

    def __init__(self) -> None:
        self._item: RequestOutput | BaseException | None = None
        self._then: RequestMigrated | None = None      # a migration's end, after the unread output
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestMigrated) and isinstance(self._item, RequestOutput):
            self._then = item                            # not an error: the unread output still goes out
        elif isinstance(self._item, RequestOutput) and isinstance(item, RequestOutput):
            self._item = self._item.add(item)
        elif not isinstance(self._item, BaseException):
            self._item = item
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        item, self._item, self._then = self._item, self._then, None
        if self._item is None:
            self._ready.clear()
        return item


class RequestStream:
    """The outputs of one request: an async iterator that ends after the finished output.

    ``arrival`` is when the request was added (for TTFT); the owner calls
    ``engine.abort(request_id)`` if it stops reading before the end.
    """

    def __init__(self, request_id: str, slot: OutputSlot) -> None:
        self.request_id, self._slot = request_id, slot
        self.arrival = time.perf_counter()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._slot.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


class _AsyncEngineBase:
    """Shared plumbing: the worker thread, the request queues, pending aborts, the loop task."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="minisys-engine")
        self._queues: dict[str, OutputSlot] = {}
        self._aborts: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.num_aborted = 0
        self.num_step_errors = 0

    async def _call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread (after every call submitted before it)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="minisys-engine-loop")

    async def shutdown(self) -> None:
        """Stop the loop task, abort whatever is still in the engine (its blocks freed), stop the thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.fail_all(ServerShuttingDown())
        await self._call(self._abort_everything)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _abort_everything(self) -> None:
        """Engine thread, after the loop stopped: abort every request left in the engine."""

    def fail_all(self, exc: BaseException) -> int:
        """End every open request with ``exc`` (its stream raises it) and abort it; return how many."""
        ids = list(self._queues)
        for rid in ids:
            self._queues.pop(rid).put_nowait(exc)
            self._aborts.add(rid)
        self.num_aborted += len(ids)
        if self._wake is not None:
            self._wake.set()
        return len(ids)

    def abort(self, request_id: str) -> None:
        """Drop a request (client gone): safe to call from any coroutine, any number of times."""
        if self._queues.pop(request_id, None) is not None:
            self._aborts.add(request_id)
            self.num_aborted += 1
            self._wake.set()

    def _deliver(self, out: RequestOutput) -> None:
        q = self._queues.get(out.request_id)
        if q is not None:
            q.put_nowait(out)
            if out.finished:
                del self._queues[out.request_id]

    async def add_requests(self, items: list[AddItem]) -> list[RequestStream]:
        """Queue several requests, all or none: `PromptError` (with the index) if one can never be served.

        The default adds one at a time; `AsyncLLMEngine` adds all in one trip to the engine thread.
        """
        streams: list[RequestStream] = []
        try:
            for i, (rid, ids, params, prompt, meta) in enumerate(items):
                try:
                    streams.append(await self.add_request(rid, ids, params, prompt, **meta))
                except ValueError as e:
                    raise PromptError(i, str(e)) from None
        except BaseException:
            for s in streams:
                self.abort(s.request_id)
            raise
        return streams

    def _fail_all(self) -> list[str]:
        """Log the step's exception (being handled), send an `EngineDeadError` to every open request;
        return their ids (still to be aborted in the engine)."""
        self.num_step_errors += 1
        err = EngineDeadError(_log_failure("engine step failed", len(self._queues)))
        for q in self._queues.values():
            q.put_nowait(err)
        ids = list(self._queues)
        self._queues.clear()
        return ids

    @property
    def num_open(self) -> int:
        """Requests added and not yet finished, failed or aborted (each has an open stream)."""
        return len(self._queues)

    @property
    def is_running(self) -> bool:
        """True while the loop task is alive (what /health reports)."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        raise NotImplementedError


class AsyncLLMEngine(_AsyncEngineBase):
    """`LLMEngine` (continuous batching) driven by an asyncio task; see the module docstring."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self._dead_error: EngineDeadError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._migrated: dict[str, int] = {}          # request id -> rank it left for (lesson 14)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await super().start()

    # ------------------------------------------------------------ KV transfer (lesson 14)
    def engine_call(self, fn: Callable) -> Any:
        """From any thread but the loop's: ``fn(engine)`` on the engine thread, between steps; wakes the
        loop after (an imported or resumed request has steps to run)."""
        try:
            return self._executor.submit(fn, self.engine).result()
        finally:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def add_imported(self, request_id: str, snap, k, v, streamed: bool) -> RequestStream:
        """A request whose KV came from another engine (`LLMEngine.import_request`), with its stream;
        ValueError (nothing added) if this engine cannot take it."""
        self._check_alive()
        queue = OutputSlot()
        self._queues[request_id] = queue             # registered first: no output can be missed
        try:
            await self._call(lambda: self.engine.import_request(snap, k, v, streamed=streamed))
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()
        return RequestStream(request_id, queue)

    def import_threadsafe(self, snap, k, v, timeout_s: float = 60.0) -> RequestStream:
        """`add_imported` (streamed) from a thread that is not the loop's (the KV listener)."""
        fut = asyncio.run_coroutine_threadsafe(self.add_imported(snap.request_id, snap, k, v, True), self._loop)
        return fut.result(timeout_s)

    def mark_migrated(self, request_id: str, dst_rank: int) -> None:
        """Engine thread: the request left for ``dst_rank``; its stream ends after what was produced here."""
        def note() -> None:
            self._migrated[request_id] = dst_rank
            self._wake.set()
        self._loop.call_soon_threadsafe(note)

    def _flush_migrated(self) -> None:
        """Loop: end the streams of the requests that migrated (after the outputs already delivered)."""
        for rid, dst in list(self._migrated.items()):
            del self._migrated[rid]
            q = self._queues.pop(rid, None)
            if q is not None:
                q.put_nowait(RequestMigrated(rid, dst))

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    def compile_grammar(self, spec) -> None:
        """Compile a structured-output spec into the engine's cache (blocking: the routes run it in a worker
        thread, so the engine thread, which compiles in `add_request`, only ever finds it cached)."""
        self.engine.grammars.compile(spec)

    @property
    def is_running(self) -> bool:
        """The loop task is alive and the engine can step (no tensor-parallel worker died): /health."""
        return super().is_running and self.engine.failure is None

    def _check_alive(self) -> None:
        """`EngineDeadError` (-> 500, the detail in the log) once the engine can no longer step."""
        if self.engine.failure is not None:
            if self._dead_error is None:
                self._dead_error = EngineDeadError(new_error_id())
                logger.error("the engine cannot step: %s (error id %s)", self.engine.failure,
                             self._dead_error.error_id)
            raise self._dead_error

    async def shutdown(self) -> None:
        """The base shutdown, then stop what the engine started (tensor-parallel workers)."""
        try:
            await super().shutdown()
        finally:
            self.engine.shutdown()

    async def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, **meta) -> RequestStream:
        """Queue a request; ValueError (with the engine's reason) if it can never be served.
        ``meta``: ``client``, ``priority``, ``qoe`` for the scheduling policy (`LLMEngine.add_request`)."""
        self._check_alive()
        queue = OutputSlot()
        self._queues[request_id] = queue            # registered first: no output can be missed
        try:
            await self._call(lambda: self.engine.add_request(request_id, prompt_ids, params, prompt, **meta))
        except BaseException:
            self._queues.pop(request_id, None)
            self._aborts.add(request_id)             # cancelled mid-add: make sure it leaves the engine
            self._wake.set()
            raise
        self._wake.set()
        return RequestStream(request_id, queue)

    async def add_requests(self, items: list[AddItem]) -> list[RequestStream]:
        """Queue several requests in ONE call on the engine thread, all or none (`PromptError` with the
        index of the one refused). One trip, however many prompts: adding never waits behind a step
        per prompt, and a client that leaves meanwhile has everything it added aborted."""
        self._check_alive()
        slots = [OutputSlot() for _ in items]
        for (rid, *_), slot in zip(items, slots):
            self._queues[rid] = slot                    # registered first: no output can be missed
        try:
            await self._call(self._add_all, items)
        except BaseException:
            for rid, *_ in items:
                self._queues.pop(rid, None)
                self._aborts.add(rid)                    # cancelled mid-add: make sure none stays queued
            self._wake.set()
            raise
        self._wake.set()
        return [RequestStream(rid, slot) for (rid, *_), slot in zip(items, slots)]

    def _add_all(self, items: list[AddItem]) -> None:
        """Engine thread: add each item; on a refusal abort those added and raise `PromptError`."""
        added: list[str] = []
        for i, (rid, ids, params, prompt, meta) in enumerate(items):
            try:
                self.engine.add_request(rid, ids, params, prompt, **meta)
            except ValueError as e:
                self._apply_aborts(added)
                raise PromptError(i, str(e)) from None
            added.append(rid)

    def _apply_aborts(self, ids: list[str]) -> None:
        for rid in ids:
            self.engine.abort(rid)

    def _abort_everything(self) -> None:
        self._apply_aborts(list(self._aborts) + list(self.engine.request_ids()))
        self._aborts.clear()

    async def _run(self) -> None:
        while True:
            if self._migrated:
                self._flush_migrated()
            if self._aborts:
                ids = list(self._aborts)
                self._aborts.clear()
                await self._call(self._apply_aborts, ids)
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._aborts and not self._migrated:
                    await self._wake.wait()
                continue
            try:
                outs = await self._call(self.engine.step)
            except Exception:                        # a bug: log it, fail the requests in flight, keep serving
                await self._call(self._apply_aborts, self._fail_all())
                if self.engine.failure is not None:  # a dead tensor-parallel worker: no step can succeed
                    logger.error("the engine cannot step any more: %s; /health reports 503",
                                 self.engine.failure)
                    return
                continue
            for out in outs:
                self._deliver(out)
            await asyncio.sleep(0)                   # let the routes stream this step's tokens

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics (read without the engine thread: each is one len() or counter)."""
        sched = self.engine.scheduler
        alloc = sched.allocator
        return {"num_requests_running": len(sched.running), "num_requests_waiting": len(sched.waiting),
                "num_requests_in_engine": self.engine.num_unfinished,
                "kv_cache_usage_perc": alloc.num_used / alloc.num_blocks,
                "kv_blocks_total": alloc.num_blocks, "kv_blocks_free": alloc.num_free,
                "prefix_cache_queries": alloc.queries * alloc.block_size,
                "prefix_cache_hits": alloc.hits * alloc.block_size,
                "engine_step_errors": self.num_step_errors}

    def client_service(self) -> dict[str, float]:
        """Weighted tokens served per client (lesson 08), copied off the engine thread's dict."""
        for _ in range(5):
            try:
                return dict(self.engine.stats.service.totals)
            except RuntimeError:                        # resized by the engine thread meanwhile
                continue
        return {}


class AsyncEagerEngine(_AsyncEngineBase):
    """The eager baseline behind the same interface: one request at a time, first come first served.

    A request's ``n`` choices run one after another with one random
    generator (as `LLM(engine="eager")` does); each generated token is one
    call on the engine thread, so an abort takes effect at the next token.
    """

    def __init__(self, runner: EagerGenerator) -> None:
        super().__init__()
        self.runner = runner
        self._pending: asyncio.Queue | None = None
        self._current: str | None = None

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def compile_grammar(self, spec) -> None:
        """As `AsyncLLMEngine.compile_grammar`, into the eager generator's cache."""
        self.runner._grammars().compile(spec)

    async def start(self) -> None:
        self._pending = asyncio.Queue()
        await super().start()

    async def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, client: str | None = None, priority: int = 0,
                          qoe=None) -> RequestStream:
        """Queue a request. ``client`` only keys the server's per-user limits here; a ``priority`` or
        reader expectation needs a scheduler: ValueError (-> 400) rather than ignoring it."""
        if priority != 0 or qoe is not None:
            raise ValueError(f"{'priority' if priority != 0 else 'expected_ttft/expected_tds'} needs the "
                             f"engine's scheduler (--engine llm); the eager baseline serves one request at a time")
        self.runner.check_prompt(prompt_ids, params)    # read-only: safe off the engine thread
        queue = OutputSlot()
        self._queues[request_id] = queue
        self._pending.put_nowait((request_id, list(prompt_ids), params, prompt))
        return RequestStream(request_id, queue)

    async def _run(self) -> None:
        while True:
            rid, ids, params, prompt = await self._pending.get()
            self._aborts.discard(rid)
            if rid not in self._queues:                  # aborted while queued
                continue
            self._current = rid
            try:
                await self._serve(rid, ids, params, prompt)
            except Exception:
                self.num_step_errors += 1
                error_id = _log_failure("eager generation failed", 1)
                q = self._queues.pop(rid, None)
                if q is not None:
                    q.put_nowait(EngineDeadError(error_id))
            finally:
                self._current = None

    async def _serve(self, rid: str, ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        for i in range(params.n):
            it = self.runner.stream(ids, params, i)      # sequence i: its own seeded generator
            while True:
                if rid not in self._queues:               # aborted: stop before the next forward
                    return
                ev = await self._call(next, it)
                done = ev.finish_reason is not None
                delta = CompletionOutput(i, ev.text_delta, [ev.token_id], ev.finish_reason, ev.stop_reason)
                self._deliver(RequestOutput(rid, prompt, ids, [delta], finished=done and i == params.n - 1))
                if done:
                    break

    def stats(self) -> dict[str, float]:
        return {"num_requests_running": int(self._current is not None),
                "num_requests_waiting": self._pending.qsize() if self._pending else 0,
                "num_requests_in_engine": len(self._queues),
                "kv_cache_usage_perc": 0.0, "engine_step_errors": self.num_step_errors}
