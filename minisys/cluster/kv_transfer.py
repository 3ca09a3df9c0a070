"""Moving a request's KV between engines: one connector interface, a torch.distributed transport.

vLLM's KV-connector idea, small. Every replica joins one process group at
start-up (rank = replica index, ``tcp://`` rendezvous at rank 0's
``--kv-master-port``). A *message* is a header (a picklable dict: what the
receiver needs to continue the request, `minisys.engine.kv_handoff.RequestSnapshot`
included) followed by zero or more tensors (a request's K and V blocks,
(L, nb, block_size, Hkv, D) each):

    conn = GlooConnector(rank, world_size, master_port)          # every rank, once
    conn.send_request_kv(dst, header, k, v)                       # blocks until handed to the transport
    src, header, (k, v) = conn.recv_request_kv(src=None, tag=CTRL_TAG)

Transport (`GlooConnector`): point-to-point ``torch.distributed.send/recv``:
gloo over TCP on CPU; on CUDA the group is ``cpu:gloo,cuda:nccl``, so the
same calls move GPU tensors over NCCL and the headers over gloo. A header is
sent as two tensors (its length, then its pickled bytes), then each tensor
whose shape and dtype the header states.

Control and data share the group, told apart by tags. Each rank runs one
listener thread (`KVAgent`) that receives messages tagged `CTRL_TAG` from any
rank and answers on the tag the asker chose (``reply_tag``). A message's
parts are sent under a per-destination lock, so two threads never interleave
their parts on one pair; the listener reads a whole message before the next.

The agent's operations (the ``op`` of a header):

* ``pull`` (decode replica -> prefill replica, disaggregation): "send me the
  held request R": the answer is R's snapshot and all its blocks; the prefill
  side then frees them. An unknown or expired R is answered with an error.
* ``migrate_begin`` / ``migrate_blocks`` / ``migrate_final`` / ``migrate_abort``
  (source -> destination, `minisys.cluster.migration`): the rounds of a live
  migration. The destination stages the blocks of the rounds in memory and,
  at ``migrate_final``, imports the request into its engine and acknowledges;
  a staging that sees no final within `STAGE_TIMEOUT_S` is dropped.

Failure: a peer that dies breaks the pair's sockets; a request to it fails
with `KVTransferError` (at the latest after `REPLY_TIMEOUT_S`) and the
request being moved stays where it was (a held prefill expires, a migration
resumes on its source). If the listener's own receive fails it logs and
stops: that replica serves no more transfers, but keeps serving requests.

The engine is only ever touched through ``engine_call(fn)``, which runs
``fn(engine)`` on the engine's own thread (the server's single engine thread,
or a lock in a test harness).
"""
from __future__ import annotations

import abc
import itertools
import logging
import pickle
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger("minisys.cluster")

CTRL_TAG = 1                    # requests to a rank's listener
_FIRST_REPLY_TAG = 1000         # replies: one fresh tag per request
REPLY_TIMEOUT_S = 120.0         # an answer that does not come by then is an error (a dead or wedged peer)
STAGE_TIMEOUT_S = 120.0         # a migration's staged blocks are dropped if its final round never comes
IDLE_TIMEOUT_DAYS = 365         # the listener waits for the next message for as long as the server lives


class KVTransferError(RuntimeError):
    """A transfer failed: the peer refused, did not answer, or the transport broke."""


class KVConnector(abc.ABC):
    """A point-to-point channel between the replicas of one group (vLLM's KV connector, small)."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def send(self, dst: int, header: dict, tensors: tuple[torch.Tensor, ...] = (), tag: int = CTRL_TAG) -> int:
        """Send a header and tensors to rank ``dst``; return the bytes of the tensors sent."""

    @abc.abstractmethod
    def recv(self, src: int | None = None, tag: int = CTRL_TAG, timeout_s: float | None = None
             ) -> tuple[int, dict, tuple[torch.Tensor, ...]]:
        """Receive one message (from ``src``, or from any rank when None): (sender, header, tensors)."""

    def send_request_kv(self, dst: int, header: dict, k: torch.Tensor, v: torch.Tensor,
                        tag: int = CTRL_TAG) -> int:
        """A request's blocks + the header that lets ``dst`` continue it; the bytes sent."""
        return self.send(dst, header, (k, v), tag)

    def recv_request_kv(self, src: int | None = None, tag: int = CTRL_TAG, timeout_s: float | None = None
                        ) -> tuple[int, dict, torch.Tensor, torch.Tensor]:
        sender, header, tensors = self.recv(src, tag, timeout_s)
        if len(tensors) != 2:
            raise KVTransferError(f"expected K and V from rank {sender}, got {len(tensors)} tensors")
        return sender, header, tensors[0], tensors[1]

    def close(self) -> None:
        """Leave the group (idempotent)."""


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token in every layer: ``2 * L * Hkv * D * bytes(dtype)`` (the transfer formula)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class GlooConnector(KVConnector):
    """`KVConnector` over torch.distributed point-to-point (gloo on CPU; cpu:gloo,cuda:nccl on CUDA).

    One per process: it joins the default process group (so tensor parallelism, which needs it too,
    is refused beside it by the server)."""

    def __init__(self, rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1",
                 device: str = "cpu") -> None:
        if not 0 <= rank < world_size or world_size < 2:
            raise ValueError(f"--kv-rank {rank} must be in [0, --kv-world-size {world_size}), world size >= 2")
        if dist.is_initialized():
            raise RuntimeError("a process group already exists in this process (tensor parallelism?): "
                               "one KV connector per process, without tensor parallelism")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=timedelta(days=IDLE_TIMEOUT_DAYS))
        self._send_locks = [threading.Lock() for _ in range(world_size)]
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, dst: int, header: dict, tensors: tuple[torch.Tensor, ...] = (), tag: int = CTRL_TAG) -> int:
        tensors = tuple(t.contiguous() for t in tensors)
        header = {**header, "_tensors": [(tuple(t.shape), t.dtype, t.device.type) for t in tensors]}
        blob = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        with self._send_locks[dst]:
            dist.send(torch.tensor([blob.numel()], dtype=torch.int64), dst, tag=tag)
            dist.send(blob, dst, tag=tag)
            for t in tensors:
                dist.send(t, dst, tag=tag)
        self.bytes_sent += nbytes
        return nbytes

    def recv(self, src: int | None = None, tag: int = CTRL_TAG, timeout_s: float | None = None
             ) -> tuple[int, dict, tuple[torch.Tensor, ...]]:
        size = torch.empty(1, dtype=torch.int64)
        sender = self._recv(size, src, tag, timeout_s)
        blob = torch.empty(int(size.item()), dtype=torch.uint8)
        self._recv(blob, sender, tag, timeout_s)
        header = pickle.loads(blob.numpy().tobytes())
        tensors = []
        for shape, dtype, kind in header.pop("_tensors"):
            dev = self.device if kind == "cuda" else torch.device("cpu")
            t = torch.empty(shape, dtype=dtype, device=dev)
            self._recv(t, sender, tag, timeout_s)
            tensors.append(t)
            self.bytes_received += t.numel() * t.element_size()
        return sender, header, tuple(tensors)

    @staticmethod
    def _recv(t: torch.Tensor, src: int | None, tag: int, timeout_s: float | None) -> int:
        if timeout_s is None:
            return dist.recv(t, src=src, tag=tag)
        work = dist.irecv(t, src=src, tag=tag)
        if not work.wait(timeout=timedelta(seconds=timeout_s)):
            raise KVTransferError(f"no message from rank {src} within {timeout_s:.0f} s")
        return src if src is not None else work._source_rank()

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:            # a peer gone: nothing left to tear down cleanly
                pass


@dataclass
class _Staged:
    """A migration arriving here: the blocks of its rounds so far, by block index."""

    blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)   # index -> (k, v) (L, bs, H, D)
    deadline: float = 0.0


class KVAgent:
    """A replica's side of the KV group: the listener thread and the operations that ask other ranks.

    ``engine_call(fn)`` runs ``fn(engine)`` on the engine's thread and returns its result.
    ``importer(snapshot, k, v, src_rank)``: takes a migrated request into the engine (listener
    thread; default: ``engine.import_request(..., streamed=True)`` through ``engine_call``); the
    server's also opens the request's output stream first, so no output is missed.
    Counters: ``pulls_served``, ``migrations_in``.
    """

    def __init__(self, connector: KVConnector, engine_call: Callable[[Callable], Any],
                 importer: Callable[[Any, torch.Tensor, torch.Tensor, int], None] | None = None,
                 reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.conn, self.engine_call = connector, engine_call
        self.importer = importer or (lambda snap, k, v, src: engine_call(
            lambda engine: engine.import_request(snap, k, v, streamed=True)))
        self.reply_timeout_s = reply_timeout_s
        self._tags = itertools.count(_FIRST_REPLY_TAG + connector.rank * 10_000_000)
        self._staged: dict[tuple[int, str], _Staged] = {}
        self._lock = threading.Lock()
        self.pulls_served = self.migrations_in = 0
        self._thread = threading.Thread(target=self._listen, name=f"minisys-kv-{connector.rank}", daemon=True)
        self._thread.start()

    @property
    def rank(self) -> int:
        return self.conn.rank

    def next_tag(self) -> int:
        return next(self._tags)

    @property
    def num_staged(self) -> int:
        """Migrations being received here (their blocks held in memory, not yet in the pool)."""
        return len(self._staged)

    # ------------------------------------------------------------ asking another rank
    def request(self, dst: int, header: dict, tensors: tuple[torch.Tensor, ...] = ()
                ) -> tuple[dict, tuple[torch.Tensor, ...]]:
        """Send ``header`` (+ tensors) to ``dst``'s listener and wait for its answer; KVTransferError if
        it answers with an error or not at all within ``reply_timeout_s``."""
        tag = self.next_tag()
        try:
            self.conn.send(dst, {**header, "reply_tag": tag}, tensors)
            _, reply, data = self.conn.recv(dst, tag, self.reply_timeout_s)
        except KVTransferError:
            raise
        except Exception as e:                           # the transport broke (a peer died)
            raise KVTransferError(f"rank {dst}: {type(e).__name__}: {e}") from e
        if reply.get("error"):
            raise KVTransferError(f"rank {dst}: {reply['error']}")
        return reply, data

    def pull(self, src: int, request_id: str):
        """Disaggregated decode: fetch held request ``request_id`` from prefill rank ``src``:
        (snapshot, k, v); src frees its blocks once sent."""
        reply, (k, v) = self.request(src, {"op": "pull", "request_id": request_id})
        return reply["snapshot"], k, v

    # ------------------------------------------------------------ the listener
    def _listen(self) -> None:
        while True:
            try:
                src, header, tensors = self.conn.recv(None, CTRL_TAG)
            except Exception as e:                       # the group is gone (shutdown, a dead peer)
                logger.warning("KV listener on rank %d stopped: %s", self.rank, e)
                return
            try:
                self._handle(src, header, tensors)
            except Exception:
                logger.exception("KV listener on rank %d: %s from rank %d failed", self.rank,
                                 header.get("op"), src)
            self._expire_staged()

    def _reply(self, dst: int, header: dict, reply: dict, tensors: tuple = ()) -> None:
        if "reply_tag" in header:
            self.conn.send(dst, reply, tensors, tag=header["reply_tag"])

    def _handle(self, src: int, h: dict, tensors: tuple) -> None:
        op = h.get("op")
        if op == "pull":
            self._serve_pull(src, h)
        elif op == "migrate_begin":
            self._reply(src, h, self._begin(src, h))
        elif op == "migrate_blocks":
            self._stage(src, h["request_id"], h["block_indices"], *tensors)
        elif op == "migrate_final":
            self._reply(src, h, self._final(src, h, tensors))
        elif op == "migrate_abort":
            with self._lock:
                self._staged.pop((src, h["request_id"]), None)
        else:
            self._reply(src, h, {"error": f"unknown op {op!r}"})

    def _serve_pull(self, src: int, h: dict) -> None:
        rid = h["request_id"]

        def export(engine):
            if rid not in engine.held_ids():
                raise KeyError(f"request {rid!r} is not held here (never prefilled here, already pulled, "
                               f"or its hold timed out)")
            return engine.snapshot(rid), *engine.read_kv(engine.block_ids(rid))
        try:
            snap, k, v = self.engine_call(export)
        except Exception as e:
            self._reply(src, h, {"error": str(e)})
            return
        try:
            self._reply(src, h, {"snapshot": snap}, (k, v))
        finally:                                  # sent or not, the decode side will not ask twice
            self.engine_call(lambda engine: engine.release_held(rid))
        self.pulls_served += 1

    def _begin(self, src: int, h: dict) -> dict:
        """Reserve nothing yet, but refuse at once what could never fit here."""
        need = h["num_blocks"]

        def check(engine):
            alloc = engine.scheduler.allocator
            if h["request_id"] in engine.request_ids() or h["request_id"] in engine.held_ids():
                return f"request id {h['request_id']!r} is already here"
            if need > alloc.num_free:
                return f"{need} KV blocks needed, {alloc.num_free} free"
            if engine.speculator is not None:
                return "speculative decoding is on here"
            return None
        why = self.engine_call(check)
        if why is not None:
            return {"error": why}
        with self._lock:
            self._staged[(src, h["request_id"])] = _Staged(deadline=time.monotonic() + STAGE_TIMEOUT_S)
        return {"ok": True}

    def _stage(self, src: int, rid: str, indices: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        with self._lock:
            st = self._staged.get((src, rid))
            if st is None:
                return                                   # aborted or expired meanwhile
            for j, i in enumerate(indices):
                st.blocks[i] = (k[:, j], v[:, j])
            st.deadline = time.monotonic() + STAGE_TIMEOUT_S

    def _final(self, src: int, h: dict, tensors: tuple) -> dict:
        rid = h["request_id"]
        self._stage(src, rid, h["block_indices"], *tensors)
        with self._lock:
            st = self._staged.pop((src, rid), None)
        if st is None:
            return {"error": f"migration of {rid!r} was never begun here, or timed out"}
        snap = h["snapshot"]
        n = snap.num_blocks(h["block_size"])
        missing = [i for i in range(n) if i not in st.blocks]
        if missing:
            return {"error": f"blocks {missing[:5]} of {rid!r} never arrived"}
        k = torch.stack([st.blocks[i][0] for i in range(n)], dim=1)      # (L, nb, bs, H, D)
        v = torch.stack([st.blocks[i][1] for i in range(n)], dim=1)
        try:
            self.importer(snap, k, v, src)
        except Exception as e:
            return {"error": str(e)}
        self.migrations_in += 1
        return {"ok": True}

    def _expire_staged(self) -> None:
        """Drop the staged blocks of migrations whose next round is overdue (a source that died)."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, st in self._staged.items() if st.deadline <= now]:
                del self._staged[key]
