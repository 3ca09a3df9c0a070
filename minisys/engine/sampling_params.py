"""`SamplingParams`: how to pick tokens and when to stop, in vLLM's shape."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ..model.tokenizer import check_text


class RequestOutputKind(enum.Enum):
    """What each `RequestOutput` of a running request carries (vLLM's names).

    CUMULATIVE: every sequence's whole text and token ids so far; DELTA: only
    what is new since the previous output (what a streaming server sends);
    FINAL_ONLY: one output, when the request finishes (what `LLM.generate` needs).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters (names and defaults as in vLLM).

    * ``temperature == 0`` means greedy (argmax); otherwise logits / temperature.
    * ``top_k <= 0`` (0 or -1) disables top-k; ``top_p == 1`` disables top-p.
    * ``seed`` gives the request its own random generator, so its output does
      not depend on anything else running.
    * Generation stops at the first of: ``max_tokens`` generated, an EOS token
      (unless ``ignore_eos``), a token in ``stop_token_ids``, or a string in
      ``stop`` appearing in the output text (the stop string is cut from the
      text unless ``include_stop_str_in_output``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) \
                or self.temperature < 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer (0 or -1 disables it), got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        for s in self.stop:
            check_text(s, "stop")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
