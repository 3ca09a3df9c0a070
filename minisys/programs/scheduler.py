"""Running a program's DAG: objective deduction and the ready-set step (pure Python, no engine).

**Objective deduction** (Parrot, OSDI 2024, section 5.2, in its simplest
form). With the whole DAG in hand the server knows which calls the final
output waits on longest. Each call's cost is estimated as ``max_tokens``
(on this engine a call's time is dominated by its decode steps, one forward
each); the *critical path* is the most expensive chain of dependent calls
ending at an output. A call on it (zero slack) is **latency**-oriented: any
delay to it delays the program. A call with slack is **throughput**-oriented:
it may wait behind others (Parrot batches such calls more aggressively) as
long as its slack lasts. The mapping onto minisys's engine:

* ``priority`` 0 for latency calls, 1 for throughput calls, passed to the
  engine's ``add_request(priority=)``. It takes effect under
  ``--scheduling-policy priority`` (lesson 08: lower first at admission,
  preempted last); under the default FCFS the engine ignores it;
* in every policy, the ready set is submitted in priority order, so under
  FCFS a latency call still arrives (and is admitted) before a throughput
  call that became ready in the same step.

A map-reduce program's map calls are all on the critical path when they
are alike (the combine waits for the slowest): they are latency calls, and
they batch anyway because they are submitted together.

**The ready-set step** (`ready_set`): a call is ready when every call its
prompt names has finished and it has not been started; the ready calls go
out in (priority, declaration order). `ProgramState` applies it: each
finished call may make others ready, which start at once, while the rest
still run. Invariant: a call starts at most once, and only after all its
dependencies finished; the program is done when every call finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .graph import Call, Program, ProgramLimits

LATENCY, THROUGHPUT = "latency", "throughput"


@dataclass(frozen=True)
class Objective:
    kind: str          # LATENCY | THROUGHPUT
    priority: int      # for the engine's priority policy: lower first
    slack: int         # estimated tokens of delay this call can take without delaying the program


def topological_order(deps: dict[str, list[str]]) -> list[str]:
    """Every node after its dependencies (Kahn's algorithm; ties in dict order). ValueError on a cycle."""
    indeg = {n: len(set(ds)) for n, ds in deps.items()}
    users: dict[str, list[str]] = {n: [] for n in deps}
    for n, ds in deps.items():
        for d in set(ds):
            users[d].append(n)
    order, queue = [], [n for n in deps if indeg[n] == 0]
    while queue:
        n = queue.pop(0)
        order.append(n)
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                queue.append(u)
    if len(order) != len(deps):
        raise ValueError("the graph has a cycle")
    return order


def deduce_objectives(program: Program) -> dict[str, Objective]:
    """Per call: latency (on the critical path to an output) or throughput (has slack); see the module."""
    deps, calls = program.deps(), program.by_name()
    order = topological_order(deps)
    cost = {n: calls[n].max_tokens for n in deps}
    finish: dict[str, int] = {}                        # longest chain ending at n, n included
    for n in order:
        finish[n] = cost[n] + max((finish[d] for d in deps[n]), default=0)
    users: dict[str, list[str]] = {n: [] for n in deps}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    outputs = set(program.output_names())
    tail: dict[str, int] = {}                          # longest chain from n (included) to an output
    for n in reversed(order):
        after = [tail[u] for u in users[n]]
        tail[n] = cost[n] + max(after, default=0) if after or n in outputs else cost[n]
    critical = max(finish[o] for o in outputs)
    out = {}
    for n in deps:
        slack = critical - (finish[n] + tail[n] - cost[n])
        out[n] = Objective(LATENCY, 0, 0) if slack == 0 else Objective(THROUGHPUT, 1, slack)
    return out


def ready_set(deps: dict[str, list[str]], done: set[str], started: set[str],
              rank: dict[str, tuple]) -> list[str]:
    """The calls that can start now: not started, every dependency done; sorted by ``rank[name]``.

    ``deps``: call -> the calls it needs (inputs are not in it); ``done`` ⊆ ``started``."""
    ready = [n for n, ds in deps.items() if n not in started and all(d in done for d in ds)]
    return sorted(ready, key=lambda n: rank[n])


class ProgramState:
    """One program's progress: values known so far, calls started and finished (see the module)."""

    def __init__(self, program: Program, objectives: Optional[dict[str, Objective]] = None,
                 max_prompt_chars: int = ProgramLimits().max_rendered_chars) -> None:
        self.program, self.max_prompt_chars = program, max_prompt_chars
        self.deps = program.deps()
        self.calls = program.by_name()
        self.objectives = objectives or deduce_objectives(program)
        index = {c.name: i for i, c in enumerate(program.calls)}
        self.rank = {n: (self.objectives[n].priority, index[n]) for n in self.deps}
        self.values: dict[str, str] = dict(program.inputs)
        self.started: set[str] = set()
        self.done: set[str] = set()

    def take_ready(self) -> list[Call]:
        """The calls ready now (`ready_set`), marked started: the caller must run each of them."""
        names = ready_set(self.deps, self.done, self.started, self.rank)
        self.started.update(names)
        return [self.calls[n] for n in names]

    def take_ready_one(self) -> Call:
        """The first ready call only, marked started (the one-call-at-a-time client's step)."""
        name = ready_set(self.deps, self.done, self.started, self.rank)[0]
        self.started.add(name)
        return self.calls[name]

    def prompt(self, call: Call) -> str:
        """The call's prompt with its variables filled in (all of them exist once it is ready);
        `ProgramError` naming the call if it would be over ``max_prompt_chars``."""
        return self.program.render(call, self.values, self.max_prompt_chars)

    def complete(self, name: str, text: str) -> None:
        if name not in self.started or name in self.done:
            raise RuntimeError(f"call {name!r} finished but was not running")
        self.done.add(name)
        self.values[name] = text

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.deps)

    def outputs(self) -> dict[str, str]:
        return {o: self.values[o] for o in self.program.output_names()}
