"""The router's KV side (lesson 14): disaggregated prefill/decode, following migrated streams, migrate and drain.

Started as ``python -m minisys serve --replicas N --kv-connector gloo [--prefill-replicas K]``: the
replicas join one KV group (rank = replica index; `replica.kv_group_args`), and the router:

* **Disaggregates** (``--prefill-replicas K``: replicas 0..K-1 prefill, K..N-1 decode; each pool is
  routed by the policy). vLLM's disaggregated-proxy pattern: the request, not streamed, with
  ``kv_transfer_params: {"do_remote_decode": true}`` to a prefill replica (which stops by itself after
  the first token and holds the KV; ``max_tokens`` is NOT rewritten to 1 as vLLM's proxy does, because
  the decode replica checks that the sampling parameters are the prefilled request's), then the
  original request with the returned ``kv_transfer_params`` to a decode replica, which pulls the KV
  and the first token over the KV group and answers, streamed or not. A request whose first token
  already ends it (EOS, ``max_tokens: 1``) holds nothing: its prefill answer is the answer (a streamed
  one is sent again, colocated, to a decode replica: the rare case pays one more prefill).
  The router owns ``kv_transfer_params``: a client that sends it gets a 400 naming it.
* **Follows migrated streams**: a replica's stream that ends with ``{"minisys_migrated": {...,
  "dst_rank": D}}`` then ``[DONE]`` is continued from ``GET /minisys/attach/{id}`` on replica D; the
  client sees one stream (neither the event nor that ``[DONE]`` reaches it). Only streamed requests
  migrate (the replica refuses the others with a 400: a half-sent JSON body cannot be continued).
* ``POST /minisys/cluster/migrate {"request_id": R, "dst": D}``: migrate R (the id the router gave
  it, ``X-Request-Id``) from the replica serving it to replica D; the replica's answer (rounds,
  blocks, bytes, downtime) with ``src``, or its error as is.
* ``POST /minisys/cluster/drain {"replica": i}`` (SpotServe's preemption notice): replica i leaves
  the rotation (no new request goes to it), each of its running streamed requests migrates to the
  replica the policy picks among the others; answers ``{"replica", "moved": [...], "not_moved":
  [{"request_id", "reason"}]}`` (non-streamed requests finish where they are).
  ``POST /minisys/cluster/undrain {"replica": i}`` puts it back.
* **Rebalances** (off unless ``--rebalance-every-s S``): every S seconds, Llumnix's rule
  (`rebalance_pair`): if the freeness of the most free replica in rotation exceeds the least free
  one's by more than ``--rebalance-gap``, migrate the newest stream of the least free one there.

Failure: a replica that dies mid-transfer fails the request it was moving with an error (a 502, or
an SSE error event then ``[DONE]``), never a hang; held or staged KV on the survivors is freed by
their timeouts (``--kv-hold-timeout-s``, the staging timeout) and an unattached migrated request by
``--kv-attach-timeout-s``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from .router import Router, _ReplicaState

MIGRATE_TIMEOUT_S = 300.0


@dataclass
class Active:
    """A request the router is serving: which replica has it now, and whether it is a stream."""

    replica: int
    stream: bool


def is_migrated_event(event: bytes) -> Optional[dict]:
    """The ``minisys_migrated`` payload if this SSE event (one ``data: ...`` block) is that event, else None."""
    if b"minisys_migrated" not in event:
        return None
    for line in event.split(b"\n"):
        if line.startswith(b"data: "):
            try:
                payload = json.loads(line[6:])
            except ValueError:
                return None
            if isinstance(payload, dict) and isinstance(payload.get("minisys_migrated"), dict):
                return payload["minisys_migrated"]
    return None


async def sse_events(resp: httpx.Response):
    """The response's SSE events, each a complete ``...\\n\\n`` block (bytes)."""
    buf = b""
    async for chunk in resp.aiter_raw():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            yield event + b"\n\n"
    if buf.strip():
        yield buf


def refuse_kv_params(parsed: dict) -> Optional[str]:
    """The 400 message if the client sent ``kv_transfer_params`` (the router owns that field)."""
    if "kv_transfer_params" in parsed:
        return ("kv_transfer_params is set by the router (disaggregated prefill, migration), not by a client: "
                "remove it")
    return None


def prefill_body(parsed: dict) -> bytes:
    """The prefill replica's request: the client's, not streamed, asking to hold the KV for a remote decode."""
    body = {k: v for k, v in parsed.items() if k not in ("stream", "stream_options")}
    body["kv_transfer_params"] = {"do_remote_decode": True}
    return json.dumps(body).encode()


def decode_body(parsed: dict, kvp: Optional[dict]) -> bytes:
    return json.dumps({**parsed, **({"kv_transfer_params": kvp} if kvp else {})}).encode()


async def _post_migrate(router: "Router", rid: str, dst: int) -> tuple[int, dict]:
    """Ask the replica serving ``rid`` to migrate it to replica ``dst``: (status, JSON answer)."""
    from ..server.errors import error_body
    act = router.active.get(rid)
    if act is None:
        return 404, error_body(f"request {rid!r} is not in flight at this router", param="request_id")
    src = act.replica
    try:
        r = await router.client.post(router.states[src].replica.url + "/minisys/migrate",
                                     json={"request_id": rid, "dst_rank": dst}, timeout=MIGRATE_TIMEOUT_S)
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return 502, error_body(f"replica {src} failed during the migration ({type(exc).__name__}); the request "
                               "goes on there if that replica is alive", "bad_gateway")
    if r.status_code == 200:
        body["src"] = src
    return r.status_code, body


def rebalance_pair(loads: dict, gap: float) -> Optional[tuple[int, int]]:
    """Llumnix's rebalancing rule: (src, dst) = (least free, most free) replica when their freeness differs by
    more than ``gap`` and the least free one runs something to move; else None. ``loads``: index -> LoadReport."""
    from .policies import freeness
    busy = {i: r for i, r in loads.items() if r.running > 0}
    if len(loads) < 2 or not busy:
        return None
    src = min(busy, key=lambda i: (freeness(busy[i]), -i))
    dst = max((i for i in loads if i != src), key=lambda i: (freeness(loads[i]), -i))
    return (src, dst) if freeness(loads[dst]) - freeness(loads[src]) > gap else None


async def rebalance_forever(router: "Router", every_s: float, gap: float) -> None:
    """Every ``every_s``: one migration by `rebalance_pair` (the newest stream on the source), if any."""
    import asyncio
    import logging
    log = logging.getLogger("minisys.router")
    while True:
        await asyncio.sleep(every_s)
        states = {s.replica.index: s for s in router.pool("decode")}
        pair = rebalance_pair({i: s.load for i, s in states.items() if s.load is not None}, gap)
        if pair is None:
            continue
        mine = [rid for rid, a in router.active.items() if a.replica == pair[0] and a.stream]
        if mine:
            status, answer = await _post_migrate(router, mine[-1], pair[1])
            log.info("rebalance %s: replica %d -> %d: %s", mine[-1], pair[0], pair[1], status)
            router.rebalanced += status == 200


def _bad(message: str, param: str, status: int = 400) -> JSONResponse:
    from ..server.errors import error_body
    return JSONResponse(error_body(message, "invalid_request_error", param=param), status_code=status)


def _index(router: "Router", body: dict, key: str) -> Optional[int]:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(router.states):
        return None
    return v


def install_cluster_kv_routes(app: FastAPI, router: "Router") -> None:
    """``/minisys/cluster/migrate``, ``/drain``, ``/undrain`` (see the module docstring)."""

    async def body_of(raw: Request) -> dict:
        try:
            b = json.loads(await raw.body())
        except ValueError:
            return {}
        return b if isinstance(b, dict) else {}

    @app.post("/minisys/cluster/migrate")
    async def migrate(raw: Request) -> Response:
        if not router.kv:
            return _bad("migration needs the replicas in a KV group: start with --kv-connector gloo", "request_id")
        body = await body_of(raw)
        rid, dst = body.get("request_id"), _index(router, body, "dst")
        if not isinstance(rid, str):
            return _bad('the body must be {"request_id": str, "dst": int}', "request_id")
        if dst is None or not router.states[dst].replica.alive:
            return _bad(f"dst {body.get('dst')!r}: the index of a live replica in [0, {len(router.states)})", "dst")
        act = router.active.get(rid)
        if act is not None and act.replica == dst:
            return _bad(f"request {rid!r} already runs on replica {dst}", "dst")
        status, answer = await _post_migrate(router, rid, dst)
        return JSONResponse(answer, status_code=status)

    @app.post("/minisys/cluster/drain")
    async def drain(raw: Request) -> Response:
        i = _index(router, await body_of(raw), "replica")
        if i is None:
            return _bad(f'the body must be {{"replica": i}} with i in [0, {len(router.states)})', "replica")
        if not router.kv:
            return _bad("draining needs the replicas in a KV group (migration): start with --kv-connector gloo",
                        "replica")
        router.states[i].in_rotation = False
        moved, not_moved = [], []
        for rid, act in list(router.active.items()):
            if act.replica != i:
                continue
            if not act.stream:
                not_moved.append({"request_id": rid, "reason": "not streamed: it finishes on this replica"})
                continue
            try:
                dst = router.choose_for_migration(i)
            except LookupError as exc:
                not_moved.append({"request_id": rid, "reason": str(exc)})
                continue
            status, answer = await _post_migrate(router, rid, dst.replica.index)
            if status == 200:
                moved.append({"request_id": rid, **answer})
                dst.pending.append((time.monotonic(), int(answer.get("blocks", 1))))   # the next pick sees it
            else:
                not_moved.append({"request_id": rid, "reason": answer.get("error", {}).get("message", str(status))})
        return JSONResponse({"replica": i, "moved": moved, "not_moved": not_moved})

    @app.post("/minisys/cluster/undrain")
    async def undrain(raw: Request) -> Response:
        i = _index(router, await body_of(raw), "replica")
        if i is None:
            return _bad(f'the body must be {{"replica": i}} with i in [0, {len(router.states)})', "replica")
        router.states[i].in_rotation = True
        return JSONResponse({"replica": i, "in_rotation": router.states[i].replica.alive})
