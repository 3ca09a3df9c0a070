"""Programs over HTTP: the DAG in one request, or its calls one by one through the OpenAI API.

    from openai import OpenAI
    dag = ProgramClient("http://127.0.0.1:8000", api_key=None).run(prog)    # POST /v1/programs
    seq = SequentialClient(OpenAI(base_url=".../v1", api_key="EMPTY"), "SmolLM2-135M-Instruct").run(prog)
    assert dag.outputs == seq.outputs                                         # greedy

`SequentialClient` is the request-at-a-time baseline: the application keeps
the DAG to itself, waits for each answer, fills the next prompt and sends it.
The server sees single requests and cannot batch the independent ones,
start a call the moment its input exists, or tell which call the final
answer waits on. A chat call is sent as ``messages=[{"role": "user",
"content": prompt}]`` to ``/v1/chat/completions``, a raw one as ``prompt``
to ``/v1/completions``: the same token ids the program endpoint renders.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from .graph import Program
from .runner import CallResult, ProgramResult
from .scheduler import Objective, ProgramState


class ProgramHTTPError(RuntimeError):
    """The server refused or failed the program: ``status`` and the OpenAI-shaped ``body``."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class ProgramClient:
    """``POST {base_url}/v1/programs`` with the program; the result as a `ProgramResult`. ``http``: an
    httpx-like client to use instead (e.g. FastAPI's TestClient; ``base_url`` is then its own)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 timeout: float = 600.0, http: Any = None) -> None:
        import httpx
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def run(self, program: Program, user: Optional[str] = None) -> ProgramResult:
        body = {**program.to_json(), **({"model": self.model} if self.model else {}),
                **({"user": user} if user else {})}
        t0 = time.perf_counter()
        resp = self.http.post("/v1/programs", json=body, headers=self.headers)
        wall = time.perf_counter() - t0
        data = resp.json()
        if resp.status_code != 200:
            raise ProgramHTTPError(resp.status_code, data)
        calls = {c["name"]: CallResult(c["text"], c["token_ids"], c["finish_reason"], c["prompt_tokens"],
                                       Objective(c["objective"], c["priority"], 0), c["start_s"], c["end_s"],
                                       c["completion_tokens"]) for c in data["calls"]}
        return ProgramResult(data["outputs"], calls, wall, data["usage"]["prompt_tokens"], 0)


class SequentialClient:
    """The naive client: one OpenAI request per call, each after the calls it needs (declaration order)."""

    def __init__(self, openai_client: Any, model: str) -> None:
        self.client, self.model = openai_client, model

    def run(self, program: Program) -> ProgramResult:
        program.validate()
        state = ProgramState(program, {n: Objective("latency", 0, 0) for n in program.deps()})
        result = ProgramResult({})
        t0 = time.perf_counter()
        while not state.finished:
            call = state.take_ready_one()
            prompt = state.prompt(call)
            start = time.perf_counter() - t0
            kw = dict(model=self.model, max_tokens=call.max_tokens, temperature=call.temperature,
                      top_p=call.top_p, seed=call.seed, stop=list(call.stop) or None)
            if call.chat:
                resp = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
                text = resp.choices[0].message.content or ""
            else:
                resp = self.client.completions.create(prompt=prompt, **kw)
                text = resp.choices[0].text
            result.calls[call.name] = CallResult(text, [], resp.choices[0].finish_reason, resp.usage.prompt_tokens,
                                                 None, start, time.perf_counter() - t0, resp.usage.completion_tokens)
            result.prompt_tokens += resp.usage.prompt_tokens
            state.complete(call.name, text)
        result.outputs = state.outputs()
        result.wall_s = time.perf_counter() - t0
        return result
