"""A program of LLM calls whose prompts reference other calls' outputs: Parrot's semantic variables.

    prog = Program()
    chunk = prog.input("chunk0", "Paged attention stores the KV cache in blocks ...")
    s0 = prog.call("s0", f"Summarise in one sentence:\\n\\n{chunk}", max_tokens=32)
    prog.call("final", f"Combine these summaries:\\n{s0}\\n{s1}", max_tokens=48)

A *variable* is ``{{name}}`` in a prompt: the value of the program input
``name``, or the output text of the call ``name``. `Program.call` and
`Program.input` return a `Var` whose ``str`` is that placeholder, so
f-strings build the prompts. The references make the program a DAG: a call
depends on the calls it names. Parrot (Lin et al., OSDI 2024) calls the
placeholders *semantic variables*: they show the server the application's
structure that a request-at-a-time API hides.

Validation (`Program.validate`, once, before anything runs) refuses with a
`ProgramError` naming the field: an unknown variable, a cycle, a duplicate
or malformed name, a call no output depends on (it would be computed for
nothing), an input no prompt names (it would be ignored), and a program over
`ProgramLimits`. Invariants after it: every
reference names an input or a call; the calls form a DAG; every call reaches
an output.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class ProgramError(ValueError):
    """A program that cannot run; ``field`` names the part that is wrong (``calls[2].prompt``, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Var:
    """A semantic variable: an input's or a call's name; ``str(var)`` is its placeholder ``{{name}}``."""

    name: str

    def __str__(self) -> str:
        return "{{" + self.name + "}}"

    def __format__(self, spec: str) -> str:      # f"{var}" gives the placeholder too
        return str(self)


@dataclass(frozen=True)
class Call:
    """One LLM call. ``prompt`` may hold ``{{var}}`` placeholders; ``chat``: the rendered prompt is one
    user message through the model's chat template (else a raw completion prompt)."""

    name: str
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    chat: bool = True

    def refs(self) -> list[str]:
        """The variables the prompt names, in first-use order, each once."""
        return list(dict.fromkeys(VAR.findall(self.prompt)))


@dataclass(frozen=True)
class ProgramLimits:
    """What one program may ask for (a server takes ``max_calls`` from ``--max-program-calls``)."""

    max_calls: int = 64
    max_prompt_chars: int = 65536        # one call's template, before variables are filled in
    max_tokens: int = 4096               # one call's max_tokens
    max_rendered_chars: int = 1 << 20    # one call's prompt with its variables filled in


@dataclass
class Program:
    """Calls plus the program's input values; ``outputs``: the calls whose text the program returns
    (default: the calls no other call consumes)."""

    calls: list[Call] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: Optional[list[str]] = None

    # ------------------------------------------------------------------ building
    def input(self, name: str, value: str) -> Var:
        self.inputs[name] = value
        return Var(name)

    def call(self, name: str, prompt: str, **kw: Any) -> Var:
        self.calls.append(Call(name, prompt, **{k: tuple(v) if k == "stop" else v for k, v in kw.items()}))
        return Var(name)

    def to_json(self) -> dict[str, Any]:
        """The body of ``POST /v1/programs`` (without ``model``)."""
        body: dict[str, Any] = {"calls": [{**asdict(c), "stop": list(c.stop)} for c in self.calls],
                                "inputs": dict(self.inputs)}
        if self.outputs is not None:
            body["outputs"] = list(self.outputs)
        return body

    # ------------------------------------------------------------------ the DAG
    def deps(self) -> dict[str, list[str]]:
        """Call name -> the calls its prompt names (inputs are not calls: they exist from the start)."""
        names = {c.name for c in self.calls}
        return {c.name: [r for r in c.refs() if r in names] for c in self.calls}

    def output_names(self) -> list[str]:
        if self.outputs is not None:
            return list(self.outputs)
        used = {d for ds in self.deps().values() for d in ds}
        return [c.name for c in self.calls if c.name not in used]

    def by_name(self) -> dict[str, Call]:
        return {c.name: c for c in self.calls}

    def render(self, call: Call, values: dict[str, str], max_chars: Optional[int] = None) -> str:
        """``call.prompt`` with every ``{{var}}`` replaced by its value (KeyError if one is missing).
        ``max_chars``: `ProgramError` naming the call, before building it, if the result would be longer
        (a short template naming a long output many times must not build a huge string)."""
        if max_chars is not None:
            size = len(VAR.sub("", call.prompt)) + sum(len(values[m.group(1)]) for m in VAR.finditer(call.prompt))
            if size > max_chars:
                where = f"calls[{[c.name for c in self.calls].index(call.name)}].prompt"
                raise ProgramError(where, f"filled in, {call.name}'s prompt would be {size} characters, over the "
                                          f"limit of {max_chars}")
        return VAR.sub(lambda m: values[m.group(1)], call.prompt)

    def validate(self, limits: ProgramLimits = ProgramLimits()) -> None:
        """Raise `ProgramError` naming what is wrong (see the module docstring); None if it can run."""
        if not self.calls:
            raise ProgramError("calls", "a program needs at least one call")
        if len(self.calls) > limits.max_calls:
            raise ProgramError("calls", f"{len(self.calls)} calls is over the limit of {limits.max_calls} "
                                        f"per program (--max-program-calls)")
        for name, value in self.inputs.items():
            if not NAME.match(name):
                raise ProgramError(f"inputs.{name}", "a name is a letter or _ then letters, digits, _ (<= 64)")
            if not isinstance(value, str):
                raise ProgramError(f"inputs.{name}", "an input's value is a string")
        seen: set[str] = set()
        for i, c in enumerate(self.calls):
            _check_call(c, i, limits)
            if c.name in seen or c.name in self.inputs:
                raise ProgramError(f"calls[{i}].name", f"{c.name!r} is defined twice")
            seen.add(c.name)
            unknown = [r for r in c.refs() if r not in self.inputs and r not in {x.name for x in self.calls}]
            if unknown:
                raise ProgramError(f"calls[{i}].prompt", f"undefined variable {{{{{unknown[0]}}}}}: not an "
                                                         f"input nor a call")
        named = {r for c in self.calls for r in c.refs()}
        for name in self.inputs:
            if name not in named:
                raise ProgramError(f"inputs.{name}", f"{name!r} is used by no call (a misspelt variable?)")
        cycle = find_cycle(self.deps())
        if cycle:
            raise ProgramError("calls", "the calls form a cycle: " + " -> ".join(cycle))
        outs = self.output_names()
        for o in outs:
            if o not in seen:
                raise ProgramError("outputs", f"{o!r} is not a call")
        needed = ancestors(self.deps(), outs)
        for i, c in enumerate(self.calls):
            if c.name not in needed:
                raise ProgramError(f"calls[{i}]", f"{c.name!r} is used by no output (it would run for nothing)")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Program":
        """A program from the JSON shape of `to_json` (types checked by the caller, e.g. pydantic)."""
        calls = [Call(**{**c, "stop": tuple(c.get("stop") or ())}) for c in body.get("calls", [])]
        return cls(calls, dict(body.get("inputs") or {}), body.get("outputs"))


def _check_call(c: Call, i: int, limits: ProgramLimits) -> None:
    where = f"calls[{i}]"
    if not isinstance(c.name, str) or not NAME.match(c.name):
        raise ProgramError(f"{where}.name", f"{c.name!r}: a name is a letter or _ then letters, digits, _ (<= 64)")
    if not isinstance(c.prompt, str) or not c.prompt:
        raise ProgramError(f"{where}.prompt", "the prompt is a non-empty string")
    if len(c.prompt) > limits.max_prompt_chars:
        raise ProgramError(f"{where}.prompt", f"{len(c.prompt)} characters is over the limit of "
                                              f"{limits.max_prompt_chars}")
    if not isinstance(c.max_tokens, int) or not 1 <= c.max_tokens <= limits.max_tokens:
        raise ProgramError(f"{where}.max_tokens", f"must be an integer in [1, {limits.max_tokens}], "
                                                  f"got {c.max_tokens!r}")
    if c.name in c.refs():
        raise ProgramError(f"{where}.prompt", f"{c.name!r} names its own output (a cycle of one)")


def find_cycle(deps: dict[str, list[str]]) -> list[str]:
    """One cycle of the graph ``node -> its dependencies`` as a closed path ``[a, b, ..., a]``, or []."""
    state: dict[str, int] = {}          # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        path.append(n)
        for d in deps.get(n, []):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return []

    for n in deps:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def ancestors(deps: dict[str, list[str]], roots: list[str]) -> set[str]:
    """``roots`` and every node they depend on, transitively."""
    out, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(deps.get(n, []))
    return out
