"""`SamplingParams`: how to pick tokens and when to stop, in vLLM's shape."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ..model.tokenizer import check_text
from ..structured.params import StructuredOutputsParams


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
    * The logits knobs (vLLM's semantics, applied by `minisys.sampling.process_logits`):
      ``logit_bias`` {token id: bias in [-100, 100]} added to the logits;
      ``min_tokens``: EOS and ``stop_token_ids`` masked until that many tokens are out;
      ``repetition_penalty`` (> 0, 1 disables) over prompt + output tokens: a
      positive logit is divided by it, a negative one multiplied;
      ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2]) over output
      tokens, OpenAI's formula: ``logit -= count * frequency + (count > 0) * presence``;
      ``min_p`` (in [0, 1]) after temperature: drop tokens less likely than
      ``min_p`` times the most likely one.
    * ``logprobs`` (vLLM's semantics): per generated token, the sampled
      token's logprob and rank plus the ``logprobs`` most likely alternatives
      (0: the sampled token only); None: none. ``prompt_logprobs``: the same
      for every prompt token (the first has none: None). They are the *raw*
      model distribution, ``log_softmax`` of the logits in fp32 before
      temperature, penalties, logit_bias and top-k/top-p/min-p (vLLM V1's
      default, ``logprobs_mode="raw_logprobs"``): with temperature 0 the
      sampled token has rank 1. Not with speculative decoding (refused).
    * ``structured_outputs`` (vLLM's `StructuredOutputsParams`: json schema, regex, choice, grammar or
      json_object): a per-sequence token mask (`minisys.structured`) applied after the logits knobs and
      before temperature/top-k/top-p, greedy and sampled alike; the sequence stops ("stop") when the
      grammar is complete. ``max_tokens`` may still cut it short ("length"). Logprobs stay raw
      (unmasked). Not with speculative decoding (refused).
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

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
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi and not (lo_open and v == lo)
            if not ok:
                raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
        number("min_p", 0.0, 1.0)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, math.inf, lo_open=True)
        if math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                    not isinstance(t, int) or isinstance(t, bool) or t < 0 or not isinstance(b, (int, float))
                    or isinstance(b, bool) or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
                raise ValueError("logit_bias must map token ids (integers >= 0) to biases in [-100, 100], "
                                 f"got {self.logit_bias!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0 or \
                (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0 (the number of top alternatives) or None, "
                                 f"got {v!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError if ``logit_bias`` names a token outside the vocabulary."""
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size ({vocab_size}), got {v!r}")
        bad = [t for t in (self.logit_bias or {}) if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")

    @property
    def history_knobs(self) -> list[str]:
        """The knobs set here that need the sequence's tokens (`minisys.sampling.process_logits`)."""
        return [name for name, off in (("logit_bias", None), ("min_tokens", 0), ("repetition_penalty", 1.0),
                                       ("frequency_penalty", 0.0), ("presence_penalty", 0.0))
                if getattr(self, name) not in (off, {})]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
