"""The router: one OpenAI-compatible endpoint in front of N replicas (lesson 14).

    python -m minisys serve --replicas 2 --routing-policy least_loaded

    POST /v1/completions, /v1/chat/completions   routed by the policy, streamed back as they come
    POST /v1/embeddings, /tokenize, /detokenize  GET /v1/models, /version: forwarded to a replica
    GET  /health                                 200 while at least one replica is in rotation
    GET  /metrics                                the router's own Prometheus text (per replica)
    GET  /minisys/cluster                        JSON: each replica's pid, url, state, load, prefix hits;
                                                 the requests in flight and their replica
    POST /minisys/cluster/migrate, /drain, /undrain   with --kv-connector: `router_kv`

With ``--kv-connector gloo`` the replicas form one KV group and the router
follows migrated streams; with ``--prefill-replicas K`` it disaggregates
prefill and decode (`minisys.cluster.router_kv` has the protocol).

Each replica is the ordinary server (`minisys.server`) on its own loopback
port (`replica`). The router parses just enough of a body to route it
(``prompt`` / ``messages``, ``stream``): the replica validates everything, and
its answer, a 400 included, goes back to the client unchanged. Every
forwarded request carries ``X-Request-Id`` (the client's, or a new one; a
replica uses it as its engine request id), echoed in the response headers.

Load: a background task reads every replica's ``GET /minisys/load`` each
`LOAD_POLL_S`; requests routed since a report was taken count as its
waiting demand (`LoadReport.plus_pending`), so a burst between two reports
does not all go to the same replica.

Failure invariants: a replica that dies (its process sentinel: `replica`)
leaves the rotation at once; its requests in flight fail, a non-streamed one
with a 502 JSON error, a stream with an SSE error event and ``data: [DONE]``
(never a hang, never a truncated stream without a reason); the other
replicas' clients are untouched. A client that goes away closes the
router's connection to the replica, which aborts the request there (its KV
blocks freed). SIGTERM/SIGINT drain the router (new requests 503), then stop
every replica; a replica also exits by itself if the router's process dies.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..streaming import ClosingStreamingResponse
from .policies import LoadReport, RoutingPolicy, make_policy
from .replica import Replica
from .router_kv import Active, decode_body, install_cluster_kv_routes, is_migrated_event, prefill_body, \
    rebalance_forever, refuse_kv_params, sse_events

logger = logging.getLogger("minisys.router")
LOAD_POLL_S = 0.1
DISCONNECT_POLL_S = 0.25
CONNECT_TIMEOUT_S = 5.0
FORWARDED = ("/v1/embeddings", "/tokenize", "/detokenize")


@dataclass
class _ReplicaState:
    """The router's view of one replica: its last load report (and when it was asked for), the
    requests routed since then (time, blocks), counters."""

    replica: Replica
    load: Optional[LoadReport] = None
    load_asked_at: float = 0.0
    pending: list[tuple[float, int]] = field(default_factory=list)
    in_flight: int = 0
    routed: int = 0
    in_rotation: bool = True          # False once drained (`router_kv`): alive, but given no new request

    def effective_load(self) -> LoadReport:
        base = self.load or LoadReport(0, 0, 16, 0, 0, 0)
        recent = [b for t, b in self.pending if t >= self.load_asked_at]
        return base.plus_pending(len(recent), sum(recent))


class Router:
    """The routes' shared state: replicas, policy, tokenizer (for prompt ids), httpx client, metrics."""

    def __init__(self, replicas: list[Replica], policy: RoutingPolicy, tokenizer, model_name: str,
                 kv: bool = False, prefill_replicas: int = 0) -> None:
        self.states = [_ReplicaState(r) for r in replicas]
        self.policy, self.tokenizer, self.model_name = policy, tokenizer, model_name
        self.kv = kv                                   # the replicas are one KV group (rank = index)
        self.prefill_replicas = prefill_replicas       # K > 0: replicas 0..K-1 prefill, the others decode
        self.active: dict[str, Active] = {}            # request id -> where it runs now (migrate, drain)
        self.rebalance: Optional[tuple[float, float]] = None   # (every_s, freeness gap): `router_kv.rebalance_forever`
        self.rebalanced = 0                            # migrations the rebalancer made
        self.client: Optional[httpx.AsyncClient] = None
        self.draining = False
        self.in_flight_ids: set[str] = set()
        self.registry = CollectorRegistry()
        self.routed = Counter("minisys_router:requests_routed", "Requests sent to each replica.",
                              ["replica"], registry=self.registry)
        self.failed = Counter("minisys_router:requests_failed", "Requests that failed because their "
                              "replica failed or died (502 or an SSE error event).", ["replica"],
                              registry=self.registry)
        self.registry.register(_ReplicaGauges(self))

    # ------------------------------------------------------------ load
    async def poll_loads(self) -> None:
        """Forever: refresh every live replica's load report each `LOAD_POLL_S`."""
        while True:
            await asyncio.gather(*(self.refresh(s) for s in self.states if s.replica.alive))
            await asyncio.sleep(LOAD_POLL_S)

    async def refresh(self, s: _ReplicaState) -> None:
        asked = time.monotonic()
        try:
            r = await self.client.get(s.replica.url + "/minisys/load", timeout=2.0)
            s.load = LoadReport.from_json(r.json())
        except (httpx.HTTPError, ValueError, KeyError):
            return
        s.load_asked_at = asked
        s.pending = [(t, b) for t, b in s.pending if t >= asked]

    def alive(self) -> list[_ReplicaState]:
        """The replicas in rotation: alive and not drained."""
        return [s for s in self.states if s.replica.alive and s.in_rotation]

    def pool(self, role: str) -> list[_ReplicaState]:
        """The replicas in rotation for ``role``: "prefill", "decode" (disaggregated) or "any"."""
        k = self.prefill_replicas
        if not k or role == "any":
            return self.alive()
        return [s for s in self.alive() if (s.replica.index < k) == (role == "prefill")]

    def choose_for_migration(self, src: int) -> _ReplicaState:
        """Where a request leaving replica ``src`` goes: the policy's pick among the other decode-capable
        replicas in rotation; LookupError if there is none."""
        cands = {s.replica.index: s for s in self.pool("decode") if s.replica.index != src} or \
            {s.replica.index: s for s in self.alive() if s.replica.index != src}     # a prefill replica decodes too
        if not cands:
            raise LookupError("no other replica in rotation to migrate to")
        return cands[self.policy.choose(None, {k: s.effective_load() for k, s in cands.items()})]

    # ------------------------------------------------------------ routing
    def read_body(self, path: str, body: bytes, want_ids: bool) -> tuple[dict, Optional[list[int]]]:
        """(the JSON body, or {} if it is not an object; its prompt ids if ``want_ids``). Blocking (a big
        body parses for milliseconds): run in a worker thread, off the event loop."""
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
        parsed = parsed if isinstance(parsed, dict) else {}
        return parsed, (self.prompt_ids(path, parsed) if want_ids else None)

    def prompt_ids(self, path: str, body: dict) -> Optional[list[int]]:
        """The prompt's token ids as the replica will see them (chat: through the template), or None
        when it cannot be read here (the replica will say what is wrong). Blocking: run in a thread."""
        try:
            if path.endswith("/chat/completions"):
                messages = [{"role": m["role"], "content": m.get("content") or ""} for m in body["messages"]]
                return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
            prompt = body["prompt"]
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]                       # a batch: routed by its first prompt
            return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        except Exception:
            return None

    def choose(self, prompt_ids: Optional[list[int]], role: str = "any") -> _ReplicaState:
        alive = {s.replica.index: s for s in self.pool(role)}
        if not alive:
            raise _NoReplica()
        i = self.policy.choose(prompt_ids, {k: s.effective_load() for k, s in alive.items()})
        s = alive[i]
        blocks = -(-len(prompt_ids) // (s.load.block_size if s.load else 16)) if prompt_ids else 1
        s.pending.append((time.monotonic(), blocks))
        s.routed += 1
        self.routed.labels(str(i)).inc()
        return s

    def report(self) -> dict:
        """``GET /minisys/cluster``: the policy and each replica's state, last load and prefix hits."""
        out = []
        for s in self.states:
            load = s.load.__dict__ if s.load else None
            out.append({"index": s.replica.index, "url": s.replica.url, "pid": s.replica.pid,
                        "alive": s.replica.alive, "in_rotation": s.in_rotation, "in_flight": s.in_flight,
                        "role": ("prefill" if s.replica.index < self.prefill_replicas else "decode")
                        if self.prefill_replicas else "any",
                        "routed": s.routed, "load": load})
        return {"policy": self.policy.name, "kv_connector": self.kv, "prefill_replicas": self.prefill_replicas,
                "rebalanced": self.rebalanced, "replicas": out, "requests": {rid: a.replica for rid, a in self.active.items()}}


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code=None) -> dict:
    """The server's OpenAI error body (`minisys.server.errors.error_body`), imported when used: the server
    imports `minisys.cluster` (the KV transfer) at module level, so the router must not import it back."""
    from ..server.errors import error_body as body
    return body(message, type_, param, code)


class _NoReplica(Exception):
    pass


class _ReplicaGauges(Collector):
    """Per-replica gauges read at scrape time from the router's state."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self):
        names = {"replica_up": "1 while the replica is in rotation.",
                 "kv_blocks_free": "Free KV blocks, last load report.",
                 "num_requests_running": "Running sequences, last load report.",
                 "num_requests_waiting": "Waiting sequences, last load report.",
                 "prefix_cache_queries": "Full prompt blocks looked up in the prefix cache.",
                 "prefix_cache_hits": "Full prompt blocks found in the prefix cache."}
        fams = {k: GaugeMetricFamily("minisys_router:" + k, h, labels=["replica"]) for k, h in names.items()}
        for s in self.router.states:
            label = [str(s.replica.index)]
            fams["replica_up"].add_metric(label, float(s.replica.alive))
            if s.load is not None:
                for k, v in (("kv_blocks_free", s.load.free_blocks), ("num_requests_running", s.load.running),
                             ("num_requests_waiting", s.load.waiting), ("prefix_cache_queries", s.load.prefix_queries),
                             ("prefix_cache_hits", s.load.prefix_hits)):
                    fams[k].add_metric(label, float(v))
        yield from fams.values()


def _error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code=code), status_code=status)


def _replica_failed(s: _ReplicaState, exc: BaseException) -> str:
    return (f"replica {s.replica.index} failed while serving this request "
            f"({type(exc).__name__}); it is {'still' if s.replica.alive else 'no longer'} in rotation; retry")


def _new_request_id(path: str) -> str:
    return ("chatcmpl-" if "chat" in path else "cmpl-") + uuid.uuid4().hex


async def _forward_json(router: Router, s: _ReplicaState, raw: Request, method: str, path: str,
                        body: bytes, headers: dict) -> Response:
    """Forward and wait for the whole answer; a client that leaves meanwhile cancels it (the replica
    sees its connection close and aborts the request)."""
    task = asyncio.create_task(router.client.request(method, s.replica.url + path, content=body, headers=headers))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                resp = task.result()
                break
            if await raw.is_disconnected():
                return _error(499, "client disconnected", "invalid_request_error", "client_disconnected")
    except httpx.HTTPError as exc:
        router.failed.labels(str(s.replica.index)).inc()
        return _error(502, _replica_failed(s, exc), "bad_gateway", "replica_failed")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    kept = {k: v for k, v in resp.headers.items() if k.lower() == "content-type"}
    return Response(resp.content, status_code=resp.status_code, headers={**kept, "x-request-id": headers["x-request-id"]})


def _sse_error(message: str, code: str) -> bytes:
    return (b"data: " + json.dumps(error_body(message, "bad_gateway", code=code)).encode() + b"\n\n"
            b"data: [DONE]\n\n")


async def _open_stream(router: Router, s: _ReplicaState, method: str, path: str, body: Optional[bytes],
                       headers: dict) -> httpx.Response | Response:
    """The replica's streamed response (status 200), or the Response to give the client instead."""
    req = router.client.build_request(method, s.replica.url + path, content=body, headers=headers)
    try:
        resp = await router.client.send(req, stream=True)
    except httpx.HTTPError as exc:
        router.failed.labels(str(s.replica.index)).inc()
        return _error(502, _replica_failed(s, exc), "bad_gateway", "replica_failed")
    if resp.status_code != 200:                       # refused before streaming: the replica's error as is
        content = await resp.aread()
        await resp.aclose()
        return Response(content, status_code=resp.status_code, media_type=resp.headers.get("content-type"))
    return resp


async def _forward_stream(router: Router, s: _ReplicaState, path: str, body: bytes, headers: dict,
                          on_close) -> Response:
    """Forward a streamed request; its SSE events pass through as they arrive. A stream that ends with
    ``minisys_migrated`` is continued from the destination's ``/minisys/attach/{id}`` (`router_kv`):
    the client sees one stream. A replica that fails mid-stream (or ends it without ``[DONE]``) gives
    the client an SSE error event and ``[DONE]``. ``on_close()`` runs once the client's response is
    over (only when a stream was started)."""
    rid = headers["x-request-id"]
    first = await _open_stream(router, s, "POST", path, body, headers)
    if not isinstance(first, httpx.Response):
        return first
    cur = {"resp": first, "state": s}
    router.active[rid] = Active(s.replica.index, True)

    async def relay() -> AsyncIterator[bytes]:
        try:
            while True:
                moved, done = None, False
                async for event in sse_events(cur["resp"]):
                    if event.strip() == b"data: [DONE]":
                        done = True
                        if moved is None:
                            yield event
                        break
                    m = is_migrated_event(event)
                    if m is not None:
                        moved = m
                    else:
                        yield event
                if not done:
                    raise httpx.RemoteProtocolError("the replica ended the stream without [DONE]")
                if moved is None:
                    return
                await cur["resp"].aclose()
                dst = router.states[int(moved["dst_rank"])]
                cur["state"].in_flight -= 1
                dst.in_flight += 1
                cur["state"] = dst
                router.active[rid] = Active(dst.replica.index, True)
                nxt = await _open_stream(router, dst, "GET", f"/minisys/attach/{rid}", None,
                                         {"x-request-id": rid})
                if not isinstance(nxt, httpx.Response):
                    raise httpx.RemoteProtocolError(f"attach on replica {dst.replica.index} answered "
                                                    f"{nxt.status_code}: {bytes(nxt.body)[:200]!r}")
                cur["resp"] = nxt
        except httpx.HTTPError as exc:
            router.failed.labels(str(cur["state"].replica.index)).inc()
            yield _sse_error(_replica_failed(cur["state"], exc), "replica_failed")

    async def close() -> None:
        await cur["resp"].aclose()    # the replica sees its client leave and aborts the request
        router.active.pop(rid, None)
        cur["state"].in_flight -= 1
        on_close()

    return ClosingStreamingResponse(relay(), close, media_type="text/event-stream", headers={"x-request-id": rid})


async def _disaggregated(router: Router, raw: Request, path: str, parsed: dict, ids, headers: dict,
                         on_stream_close) -> Response:
    """Prefill on a prefill replica (held KV), then decode on a decode replica (pulls it): `router_kv`."""
    p = router.choose(ids, "prefill")
    p.in_flight += 1
    try:
        pre = await _forward_json(router, p, raw, "POST", path, prefill_body(parsed),
                                  {**headers, "x-request-id": headers["x-request-id"] + "-prefill"})
    finally:
        p.in_flight -= 1
    if pre.status_code != 200:
        return pre
    kvp = json.loads(pre.body).get("kv_transfer_params")
    if kvp is None and parsed.get("stream") is not True:
        return pre                              # finished at its first token: that is the whole answer
    d = router.choose(ids, "decode")
    body = decode_body(parsed, kvp)             # kvp None (a stream that ended at once): colocated on d
    if parsed.get("stream") is True:
        d.in_flight += 1
        resp = await _forward_stream(router, d, path, body, headers, on_stream_close)
        if not isinstance(resp, ClosingStreamingResponse):
            d.in_flight -= 1
        return resp
    return await _forward_tracked(router, d, raw, path, body, headers)


async def _forward_tracked(router: Router, s: _ReplicaState, raw: Request, path: str, body: bytes,
                           headers: dict) -> Response:
    """A non-streamed forward, registered in ``router.active`` while it runs (drain reports it)."""
    rid = headers["x-request-id"]
    router.active[rid] = Active(s.replica.index, False)
    s.in_flight += 1
    try:
        return await _forward_json(router, s, raw, "POST", path, body, headers)
    finally:
        s.in_flight -= 1
        router.active.pop(rid, None)


async def _route(router: Router, raw: Request, path: str) -> Response:
    """Pick a replica (or a prefill and a decode replica) for a (chat) completion and forward it."""
    if router.draining:
        return _error(503, "the router is shutting down; retry later or elsewhere", "service_unavailable",
                      "server_shutting_down")
    body = await raw.body()
    rid = raw.headers.get("x-request-id") or _new_request_id(path)
    if rid in router.in_flight_ids:
        return _error(400, f"request id {rid!r} (header X-Request-Id) is already in flight; use a new id",
                      "invalid_request_error", "duplicate_request_id")
    router.in_flight_ids.add(rid)              # taken before the first await: no race on the loop
    streaming = False

    def done() -> None:
        router.in_flight_ids.discard(rid)

    try:
        parsed, ids = await asyncio.to_thread(router.read_body, path, body, router.policy.name != "round_robin")
        refused = refuse_kv_params(parsed)
        if refused:
            return JSONResponse(error_body(refused, "invalid_request_error", param="kv_transfer_params"),
                                status_code=400)
        headers = {"content-type": raw.headers.get("content-type", "application/json"), "x-request-id": rid}
        try:
            if router.prefill_replicas:
                resp = await _disaggregated(router, raw, path, parsed, ids, headers, done)
                streaming = isinstance(resp, ClosingStreamingResponse)
                return resp
            s = router.choose(ids)
        except _NoReplica:
            return _error(503, "no replica is in rotation (all died)", "service_unavailable", "no_replica")
        if parsed.get("stream") is True:
            s.in_flight += 1
            resp = await _forward_stream(router, s, path, body, headers, done)
            streaming = isinstance(resp, ClosingStreamingResponse)
            if not streaming:
                s.in_flight -= 1
            return resp
        return await _forward_tracked(router, s, raw, path, body, headers)
    finally:
        if not streaming:
            done()


def build_router_app(router: Router, api_key: Optional[str] = None, metrics_open: bool = False,
                     max_body_bytes: Optional[int] = None) -> FastAPI:
    """The router's FastAPI app over started replicas (see the module docstring)."""
    from ..server.middleware import ApiKeyMiddleware, BodyLimitMiddleware

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        router.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
                                          limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        await asyncio.gather(*(router.refresh(s) for s in router.states))
        tasks = [asyncio.create_task(router.poll_loads(), name="minisys-router-load")]
        if router.rebalance and router.kv:
            tasks.append(asyncio.create_task(rebalance_forever(router, *router.rebalance), name="minisys-rebalance"))
        yield
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await router.client.aclose()

    app = FastAPI(title="minisys router", lifespan=lifespan)
    app.state.router = router
    if max_body_bytes:
        app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=60.0)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, protect_metrics=not metrics_open)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await _route(router, raw, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await _route(router, raw, "/v1/chat/completions")

    async def forward_any(raw: Request, method: str, path: str) -> Response:
        alive = router.alive()
        if not alive:
            return _error(503, "no replica is in rotation (all died)", "service_unavailable", "no_replica")
        s = min(alive, key=lambda x: x.in_flight)
        headers = {"content-type": raw.headers.get("content-type", "application/json"),
                   "x-request-id": raw.headers.get("x-request-id") or _new_request_id(path)}
        return await _forward_json(router, s, raw, method, path, await raw.body(), headers)

    def forwarder(method: str, path: str):
        async def route(raw: Request) -> Response:
            return await forward_any(raw, method, path)
        return route

    for path in FORWARDED:
        app.add_api_route(path, forwarder("POST", path), methods=["POST"])
    for path in ("/v1/models", "/version"):
        app.add_api_route(path, forwarder("GET", path), methods=["GET"])

    @app.get("/v1/models/{model_id:path}")
    async def model_card(raw: Request, model_id: str):
        return await forward_any(raw, "GET", f"/v1/models/{model_id}")

    @app.get("/health", response_class=PlainTextResponse)
    async def health():
        if router.draining:
            return _error(503, "the router is shutting down", "service_unavailable", "server_shutting_down")
        if not router.alive():
            return _error(503, "no replica is in rotation", "service_unavailable", "no_replica")
        return PlainTextResponse("")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(router.registry), media_type="text/plain; version=0.0.4")

    @app.get("/minisys/cluster")
    async def cluster():
        return JSONResponse(router.report())

    install_cluster_kv_routes(app, router)

    return app


async def _drain(router: Router, abort_after_s: float) -> None:
    """Shutdown: refuse new requests (503); wait up to ``abort_after_s`` for those in flight (the
    replicas, stopped next, end the rest with an error event each)."""
    router.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + abort_after_s
    while router.in_flight_ids and loop.time() < deadline:
        await asyncio.sleep(0.05)


def check_cluster_args(args) -> None:
    """ValueError naming a flag the replicas or the router cannot take."""
    from ..server.engine_args import given_engine_args
    if args.replicas < 2:
        for flag in ("prefill_replicas", "rebalance_every_s"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --replicas N with N >= 2 "
                                 f"(got --replicas {args.replicas})")
        if args.routing_policy is not None:
            raise ValueError(f"--routing-policy needs --replicas N with N >= 2 (got --replicas {args.replicas})")
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.engine != "llm":
        raise ValueError("--replicas takes --engine llm only (the router reads each replica's KV pool); "
                         f"got --engine {args.engine}")
    tp = given_engine_args(args).get("tensor_parallel_size", 1)
    if tp != 1:
        raise ValueError(f"--replicas with --tensor-parallel-size {tp} is not supported: each replica is one process")
    for flag in ("kv_rank", "kv_world_size", "kv_master_port"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is set by the router (rank = replica index, a free "
                             "master port): give --kv-connector only")
    if getattr(args, "rebalance_every_s", None) is not None:
        if not getattr(args, "kv_connector", None):
            raise ValueError("--rebalance-every-s needs --kv-connector gloo (rebalancing migrates requests)")
        if args.rebalance_every_s <= 0:
            raise ValueError(f"--rebalance-every-s must be > 0, got {args.rebalance_every_s}")
    k = getattr(args, "prefill_replicas", None)
    if k is not None:
        if not getattr(args, "kv_connector", None):
            raise ValueError("--prefill-replicas needs --kv-connector gloo (the KV moves between replicas)")
        if not 1 <= k < args.replicas:
            raise ValueError(f"--prefill-replicas {k}: between 1 and --replicas - 1 ({args.replicas - 1}), so "
                             "that both pools have a replica")


def serve_cluster(args) -> int:
    """``serve --replicas N``: bind the port, start N replicas, run the router until SIGTERM/SIGINT, stop
    the replicas (whatever happens)."""
    import uvicorn

    from ..model.loader import resolve_model_dir
    from ..model.tokenizer import Tokenizer
    from ..parallel.workers import WorkerError
    from ..server.launch import API_KEY_ENV, bind_socket, engine_config, model_name, setup_logging
    from ..server.limits import limits_from_args
    from ..server.shutdown import GracefulServer
    from ..server.timeouts import timeouts_from_args
    from .replica import ReplicaSet

    try:
        check_cluster_args(args)
        engine_config(args)
        limits, timeouts = limits_from_args(args), timeouts_from_args(args)
        policy = make_policy(args.routing_policy or "least_loaded")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    setup_logging(args.log_level)
    tokenizer = Tokenizer.from_dir(resolve_model_dir(args.model, rebuild_cache=args.rebuild_cache))
    replicas = ReplicaSet(args, args.replicas)
    try:
        started = replicas.start()
    except WorkerError as exc:
        print(f"error: a replica failed to start: {exc}", file=sys.stderr)
        return 1
    try:
        router = Router(started, policy, tokenizer, model_name(args), kv=bool(getattr(args, "kv_connector", None)),
                        prefill_replicas=getattr(args, "prefill_replicas", None) or 0)
        if getattr(args, "rebalance_every_s", None):
            router.rebalance = (args.rebalance_every_s, args.rebalance_gap)
        replicas.watch(lambda i, code: logger.error("replica %d died (exit code %s): out of rotation", i, code))
        app = build_router_app(router, api_key, args.metrics_open, limits.max_body_bytes)
        print(f"minisys router on http://{args.host}:{args.port}: {len(started)} replicas "
              f"(pids {', '.join(str(r.pid) for r in started)}), policy {policy.name}"
              + (f", KV group over {args.kv_connector}" if router.kv else "")
              + (f", replicas 0..{router.prefill_replicas - 1} prefill" if router.prefill_replicas else ""),
              flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                                timeout_graceful_shutdown=timeouts.shutdown_grace_s)
        server = GracefulServer(config, drain=lambda after: _drain(router, after))
        server.run(sockets=[sock])
    finally:
        replicas.stop(timeouts.shutdown_grace_s + 5)
    print(f"minisys router: shut down, {len(started)} replicas stopped", flush=True)
    return 0
