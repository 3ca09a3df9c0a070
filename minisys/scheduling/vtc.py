"""VTC, the Virtual Token Counter (Sheng et al., *Fairness in Serving Large Language Models*, OSDI 2024).

Each client u has a counter c_u of the service it received, in weighted
tokens: every prompt token computed costs ``w_in``, every decode token
``w_out`` (the paper's defaults 1 and 2: a decode token costs more of the
GPU's time than a prompt token in a batched prefill). Then:

* **pick**: admission goes to the client with the smallest counter among the
  clients with waiting requests (*backlogged*), its earliest request first;
* **charge**: counters grow as service is given — here as each prefill chunk
  and decode token is scheduled (chunked prefill charges a prompt chunk by
  chunk, not all at admission);
* **lift**: a client that becomes backlogged (its first waiting request
  arrives) has its counter raised to the smallest counter among the backlogged
  clients — or, when none is, to the counter of the client picked last — so
  time spent idle is not banked as credit to spend later in a burst.

Fairness (the paper's Theorem): for two clients f and g that are both
backlogged during [t1, t2), the service they receive differs by at most

    |W_f(t1, t2) - W_g(t1, t2)| <= 2 U,   U = w_in * L_in + w_out * M

where L_in is the longest prompt and M the most tokens the running batch can
hold (`fairness_bound`). Under FCFS the difference grows with the length of
the busy period instead: a client that sends four times the load gets four
times the service.

Counters of idle clients whose counter is at or below the backlogged minimum
are dropped (they would be lifted to it anyway), so memory stays bounded by
the clients with requests in flight.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Sequence

from .policy import SchedulingPolicy

if TYPE_CHECKING:
    from ..engine.request import Request
    from ..engine.scheduler import WaitingQueue

DEFAULT_INPUT_WEIGHT = 1.0
DEFAULT_OUTPUT_WEIGHT = 2.0


def fairness_bound(w_in: float, w_out: float, max_input_len: int, max_batch_tokens: int) -> float:
    """The paper's bound 2U on the service difference of two backlogged clients over any interval."""
    return 2 * (w_in * max_input_len + w_out * max_batch_tokens)


class VTCPolicy(SchedulingPolicy):
    name = "vtc"

    def __init__(self, clock: Callable[[], float], w_in: float = DEFAULT_INPUT_WEIGHT,
                 w_out: float = DEFAULT_OUTPUT_WEIGHT) -> None:
        super().__init__(clock)
        if not (w_in > 0 and w_out > 0):
            raise ValueError(f"VTC weights must be > 0, got w_in={w_in!r}, w_out={w_out!r}")
        self.w_in, self.w_out = w_in, w_out
        self.counters: dict[str, float] = {}          # c_u, the virtual token counter of each client
        self._in_flight: Counter[str] = Counter()     # requests of each client not finished yet
        self._last_picked: str | None = None

    def counter(self, client: str) -> float:
        return self.counters.get(client, 0.0)

    # ------------------------------------------------------------ the three rules
    def on_arrival(self, req: Request, waiting: WaitingQueue) -> None:
        """Lift: ``req``'s client just became backlogged -> raise its counter to the backlogged minimum."""
        u = req.client_key
        self._in_flight[u] += 1
        if waiting.num_waiting(u) > 1:                # already backlogged: no lift
            return
        others = [self.counter(v) for v in waiting.clients() if v != u]
        if others:
            floor = min(others)
        elif self._last_picked is not None and self._last_picked != u:
            floor = self.counter(self._last_picked)
        else:
            floor = 0.0
        self.counters[u] = max(self.counter(u), floor)
        self._forget_idle(floor)

    def pick(self, waiting: WaitingQueue) -> Request:
        """The earliest waiting request of the backlogged client with the smallest counter."""
        best: Request | None = None
        for req in waiting:                            # queue order: the first of each client is its earliest
            if best is None or self.counter(req.client_key) < self.counter(best.client_key):
                best = req
        self._last_picked = best.client_key
        return best

    def charge(self, req: Request, prefill_tokens: int, decode_tokens: int) -> None:
        u = req.client_key
        self.counters[u] = self.counter(u) + self.w_in * prefill_tokens + self.w_out * decode_tokens

    # ------------------------------------------------------------ the rest
    def order_running(self, running: Sequence[Request]) -> list[Request]:
        """On a block shortage, preempt the newest request of the client with the largest counter."""
        return sorted(running, key=lambda r: (self.counter(r.client_key), r.arrival))

    def on_finish(self, req: Request) -> None:
        u = req.client_key
        self._in_flight[u] -= 1
        if self._in_flight[u] <= 0:
            del self._in_flight[u]

    def _forget_idle(self, floor: float) -> None:
        """Drop counters of clients with nothing in flight whose counter is <= ``floor`` (they would
        be lifted to at least ``floor`` when they come back), once there are many of them."""
        if len(self.counters) <= 2 * len(self._in_flight) + 64:
            return
        for u in [u for u, c in self.counters.items() if u not in self._in_flight and c <= floor]:
            del self.counters[u]
