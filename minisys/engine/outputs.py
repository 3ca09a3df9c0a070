"""What `LLM.generate` returns, shaped like vLLM's `RequestOutput`.

With ``SamplingParams.output_kind == DELTA`` (the server's streams) each
output carries only what is new: text and token ids since the previous one
(and the logprobs of only those tokens, and of only the prompt tokens not yet sent).

Logprobs (`SamplingParams.logprobs` / ``prompt_logprobs``) are vLLM's shape:
one dict per token, ``{token_id: Logprob}``, holding the token itself and its
top alternatives (one entry when the token is among them).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's logprob under the raw model distribution, its rank there (1 = most likely), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


TokenLogprobs = dict[int, Logprob]     # one token's entry: itself + its top alternatives


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None     # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it, if any
    logprobs: list[TokenLogprobs] | None = None   # one per token of token_ids, if params.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None   # per prompt token (the first: None)
    # disaggregated prefill (lesson 14): where this request's KV waits to be pulled (vLLM's field)
    kv_transfer_params: dict | None = None

    def add(self, newer: RequestOutput) -> RequestOutput:
        """This DELTA output followed by ``newer``: one output with both deltas (per choice index).

        The server's mailbox merges unread deltas this way, so a slow reader
        gets bigger deltas, never lost ones.
        """
        def copy(c: CompletionOutput) -> CompletionOutput:
            return CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                                    None if c.logprobs is None else list(c.logprobs))

        def cat(a: list | None, b: list | None) -> list | None:
            return a if b is None else (list(b) if a is None else a + b)

        merged = {c.index: copy(c) for c in self.outputs}
        for c in newer.outputs:
            m = merged.get(c.index)
            if m is None:
                merged[c.index] = copy(c)
            else:
                m.text += c.text
                m.token_ids += c.token_ids
                m.logprobs = cat(m.logprobs, c.logprobs)
                m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [merged[i] for i in sorted(merged)], newer.finished,
                             cat(self.prompt_logprobs, newer.prompt_logprobs),
                             newer.kv_transfer_params or self.kv_transfer_params)
