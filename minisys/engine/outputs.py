"""What `LLM.generate` returns, shaped like vLLM's `RequestOutput`.

With ``SamplingParams.output_kind == DELTA`` (the server's streams) each
output carries only what is new: text and token ids since the previous one.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None     # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False

    def add(self, newer: RequestOutput) -> RequestOutput:
        """This DELTA output followed by ``newer``: one output with both deltas (per choice index).

        The server's mailbox merges unread deltas this way, so a slow reader
        gets bigger deltas, never lost ones.
        """
        merged = {c.index: CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason)
                  for c in self.outputs}
        for c in newer.outputs:
            m = merged.get(c.index)
            if m is None:
                merged[c.index] = CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                                   c.stop_reason)
            else:
                m.text += c.text
                m.token_ids += c.token_ids
                m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [merged[i] for i in sorted(merged)], newer.finished)
