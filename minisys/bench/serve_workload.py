"""The online serving benchmark's workload: text requests any tokenizer can encode.

Invariant: the requests depend only on ``num``, the two length ranges and
the seed (prompts are random words from a fixed list, output lengths
uniform in a range), so every system in a comparison gets the same work.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# A fixed word list: prompts are random words, so any tokenizer can encode them.
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be had it not "
         "or have one first new their after but who they has been two its time her year during city may "
         "river house music system model light water small early world power story field heavy green").split()


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: a text prompt and the exact number of tokens to generate."""

    prompt: str
    max_tokens: int


def make_requests(num: int, input_words: tuple[int, int], output_tokens: tuple[int, int],
                  seed: int = 0) -> list[BenchRequest]:
    """``num`` requests with uniform random prompt lengths (in words) and output lengths, seeded."""
    rng = random.Random(seed)
    return [BenchRequest(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*input_words))),
                         rng.randint(*output_tokens)) for _ in range(num)]
