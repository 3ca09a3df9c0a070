"""A replica's KV-transfer side (lesson 14): flags, the KV group, disaggregation, migration, attach.

Started with ``--kv-connector gloo --kv-rank R --kv-world-size N --kv-master-port P`` every
replica of a group joins one torch.distributed group at start-up (rank 0 listens on P; the
server blocks until all N have joined) and runs a `KVAgent` listener. Then:

* Disaggregated prefill (vLLM's pattern; `minisys.server.protocol.KVTransferParams`):
  ``POST /v1/completions`` (or chat) with ``"kv_transfer_params": {"do_remote_decode": true}``
  (not streamed) on the prefill replica returns the first token, ``finish_reason: "length"`` and
  ``kv_transfer_params: {"do_remote_prefill": true, "remote_rank": R, "remote_request_id": ...,
  "num_tokens": ...}``; the KV stays held there until pulled or ``--kv-hold-timeout-s``. The same
  request body with those ``kv_transfer_params`` sent to a decode replica pulls the KV and the
  first token and streams (or returns) the whole completion, first token included. A prefill whose
  first token already ends it (EOS, max_tokens=1) holds nothing: ``kv_transfer_params`` is null
  and its response is the whole answer.
* Live migration: ``POST /minisys/migrate {"request_id": R, "dst_rank": D}`` and
  ``GET /minisys/attach/{R}``: the protocol is in `minisys.cluster.migration`'s docstring.
* ``GET /minisys/kv``: this replica's counters (rank, KV blocks free/total, held and staged
  requests, requests waiting to be attached, pulls served, migrations in).

Refused at start-up, naming the flag: ``--engine eager``, ``--tensor-parallel-size`` > 1 (it
needs the process group for itself), speculative decoding. A replica started without a connector
refuses ``kv_transfer_params`` with a 400 naming the field.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..cluster.kv_transfer import KVAgent, KVConnector, KVTransferError
from ..cluster.migration import MigrationAbandoned, MigrationConfig, migrate
from .errors import OpenAIError, error_body
from .kv_args import KVConfig

logger = logging.getLogger("minisys.server")

HOUSEKEEPING_S = 1.0


def connect(config: KVConfig, device: str) -> KVConnector:
    """Join the KV group (blocks until every rank has joined)."""
    from ..cluster.kv_transfer import GlooConnector
    return GlooConnector(config.rank, config.world_size, config.master_port, config.master_addr, device)


@dataclass
class _Attachable:
    stream: Any                     # RequestStream on this engine
    snapshot: Any                   # RequestSnapshot (prompt, tokens so far, stream context in .meta)
    deadline: float


@dataclass
class KVState:
    """The server's KV-transfer state: the connector, its agent (made at start-up), the streamed requests'
    contexts (what an attach stream needs) and the migrated-in requests waiting for an attach."""

    config: KVConfig
    connector: KVConnector
    agent: Optional[KVAgent] = None
    contexts: dict[str, dict] = field(default_factory=dict)
    attachable: dict[str, _Attachable] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.config.rank

    def start(self, engine) -> None:
        """At the app's start-up (the loop runs): the listener, reaching the engine through its thread."""
        engine.engine.hold_timeout_s = self.config.hold_timeout_s

        def importer(snap, k, v, src):
            stream = engine.import_threadsafe(snap, k, v)
            self.attachable[snap.request_id] = _Attachable(stream, snap,
                                                           time.monotonic() + self.config.attach_timeout_s)
        self.agent = KVAgent(self.connector, engine.engine_call, importer)

    async def housekeeping(self, engine) -> None:
        """Every second: free held KV nobody pulled, staged migrations that stalled, unattached arrivals."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                await engine._call(engine.engine.expire_held)
                self.agent._expire_staged()
                now = time.monotonic()
                for rid in [r for r, a in self.attachable.items() if a.deadline <= now]:
                    self.attachable.pop(rid)
                    engine.abort(rid)
            except Exception:
                logger.exception("KV housekeeping failed")

    def check_params(self, kvp) -> None:
        kvp.check(self.config.world_size)


def check_kv_request(server, req) -> None:
    """400 naming ``kv_transfer_params`` on a replica without a connector, or for a bad combination."""
    kvp = req.kv_transfer_params
    if kvp is None:
        return
    if server.kv is None:
        raise ValueError("kv_transfer_params needs a replica started with --kv-connector (this one has none)")
    server.kv.check_params(kvp)
    if kvp.do_remote_decode and req.stream:
        raise ValueError("kv_transfer_params.do_remote_decode: a prefill request is not streamed (stream must "
                         "be false)")
    if len(getattr(req, "prompts", lambda: [None])()) != 1:
        raise ValueError("kv_transfer_params: one prompt per request")


async def pull_prefilled(server, kvp, prompt_ids: list[int], params, request_id: str):
    """Decode side: (snapshot, k, v) pulled from the prefill replica, checked against this request."""
    try:
        snap, k, v = await asyncio.to_thread(server.kv.agent.pull, kvp.remote_rank, kvp.remote_request_id)
    except KVTransferError as e:
        raise OpenAIError(f"kv_transfer_params: {e}", status=409, param="kv_transfer_params") from None
    if snap.prompt_token_ids != prompt_ids:
        raise OpenAIError("kv_transfer_params: the prefilled request's prompt differs from this one "
                          "(send the decode replica the same request)", param="kv_transfer_params")
    theirs, ours = dataclasses.asdict(snap.params), dataclasses.asdict(params)
    differ = [k for k in ours if k != "output_kind" and theirs.get(k) != ours[k]]
    if differ:
        raise OpenAIError(f"kv_transfer_params: {differ[0]} differs from the prefilled request's "
                          "(send the decode replica the same request)", param="kv_transfer_params")
    snap.params, snap.request_id = params, request_id          # the same request: this server's ids and kind
    return snap, k, v


def install_kv_routes(app: FastAPI, server, engine) -> None:
    kv: KVState = server.kv

    @app.get("/minisys/kv")
    async def kv_counters():
        def read(e):
            alloc = e.scheduler.allocator
            return {"kv_blocks_free": alloc.num_free, "kv_blocks_total": alloc.num_blocks,
                    "held": e.held_ids(), "requests": e.request_ids()}
        counts = await engine._call(lambda: read(engine.engine))
        return JSONResponse({"rank": kv.rank, "world_size": kv.config.world_size, **counts,
                             "staged": kv.agent.num_staged, "attachable": list(kv.attachable),
                             "pulls_served": kv.agent.pulls_served, "migrations_in": kv.agent.migrations_in})

    @app.post("/minisys/migrate")
    async def migrate_route(raw: Request):
        try:
            body = json.loads(await raw.body())
            rid, dst = body["request_id"], body["dst_rank"]
        except (ValueError, KeyError, TypeError):
            raise OpenAIError('the body must be {"request_id": str, "dst_rank": int}', param="request_id") from None
        if not isinstance(rid, str) or isinstance(dst, bool) or not isinstance(dst, int):
            raise OpenAIError('the body must be {"request_id": str, "dst_rank": int}', param="request_id")
        if not 0 <= dst < kv.config.world_size or dst == kv.rank:
            raise OpenAIError(f"dst_rank {dst}: another rank of the KV group [0, {kv.config.world_size}) "
                              f"than this one ({kv.rank})", param="dst_rank")
        ctx = kv.contexts.get(rid)
        if ctx is None:
            known = rid in engine.engine.request_ids()
            raise OpenAIError(f"request {rid!r} " + ("is not a streamed request: only streams can migrate" if known
                              else "is not running here"), status=400 if known else 404, param="request_id")
        if ctx.get("tools"):
            raise OpenAIError("a chat request with tool parsing cannot migrate", param="request_id")
        config = MigrationConfig(kv.config.migration_stop_threshold_blocks)
        try:
            result = await asyncio.to_thread(migrate, kv.agent, rid, dst, config, engine.mark_migrated,
                                             {"stream_ctx": ctx})
        except KeyError:
            raise OpenAIError(f"request {rid!r} is not running here", status=404, param="request_id") from None
        except ValueError as e:
            raise OpenAIError(str(e), param="request_id") from None
        except MigrationAbandoned as e:
            return JSONResponse(error_body(str(e), "conflict"), status_code=409)
        except KVTransferError as e:
            return JSONResponse(error_body(f"migration failed, the request goes on here: {e}", "bad_gateway"),
                                status_code=502)
        return JSONResponse({"migrated": True, **result.__dict__})
