"""AlpaServe's argument as a queueing simulation: dedicated devices vs models split over them (lesson 13).

Two models, two devices, the same bytes per device in every placement:

- ``dedicated``: each model on its own device, a request takes ``L`` seconds;
- ``tp``: both models split over both devices by tensor parallelism; a
  request takes ``L (1 + overhead) / 2`` and occupies both devices;
- ``pipeline``: each model cut into two stages (AlpaServe's inter-operator
  parallelism); a request can enter every ``L (1 + overhead) / 2`` seconds
  and takes ``L (1 + overhead)`` from start to finish.

All three are FIFO queues with a fixed service time (:func:`fifo_latencies`).
Arrivals are gamma processes (:func:`gamma_arrivals`; ``cv = 1`` is Poisson).
Pure Python, seeded: the same arguments give the same numbers on any machine.
"""
from __future__ import annotations

import random
from collections.abc import Callable

PLACEMENTS = ("dedicated", "tp", "pipeline")


def gamma_arrivals(num: int, rate: float, cv: float, rng: random.Random) -> list[float]:
    """``num`` arrival times with gamma gaps of mean ``1/rate`` and coefficient of variation ``cv``."""
    if not (rate > 0 and cv > 0):
        raise ValueError(f"rate and cv must be > 0, got rate={rate}, cv={cv}")
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
        out.append(t)
    return out


def fifo_latencies(arrivals: list[float], service_s: float) -> list[float]:
    """Finish minus arrival of each request on one FIFO server with a fixed service time.

    Served in order of arrival time (ties in list order; the list need not be sorted);
    returned in the order of ``arrivals``."""
    if service_s < 0:
        raise ValueError(f"service_s must be >= 0, got {service_s}")
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    out, free_at = [0.0] * len(arrivals), float("-inf")
    for i in order:
        free_at = max(arrivals[i], free_at) + service_s
        out[i] = free_at - arrivals[i]
    return out


def placement_latencies(placement: str, a: list[float], b: list[float], latency_s: float,
                        overhead: float, fifo: Callable[[list[float], float], list[float]]) -> list[float]:
    """Latencies of model A's then model B's requests under ``placement`` (see the module docstring),
    each queue run by ``fifo`` (e.g. :func:`fifo_latencies`; lab 13 passes the student's)."""
    stage = latency_s * (1 + overhead) / 2
    if placement == "dedicated":
        return fifo(a, latency_s) + fifo(b, latency_s)
    if placement == "tp":
        return fifo(a + b, stage)
    if placement == "pipeline":         # one request per stage time; the second stage adds one more
        return [t + stage for t in fifo(a + b, stage)]
    raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
