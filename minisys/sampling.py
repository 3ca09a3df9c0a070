"""Turning logits into tokens: the one sampler of minisys.

The eager baseline, the engine and speculative decoding all sample here, so a
seeded request draws the same tokens whichever of them serves it:

    probs = softmax(top_p(top_k(logits / T)))    `probs_from_logits`: the one probability preparation
    token = first i with cdf[i] > u * cdf[-1]     `sample_categorical`: the one draw (inverse CDF)
    u     ~ U[0, 1), one per row per draw,        `uniforms`: from the sequence's own torch.Generator
    greedy (T == 0): argmax, no random number used

Every function works on rows, logits ``(B, V)`` in fp32. One uniform per row
replaces a ``torch.multinomial`` call per request (the slow part of sampling
on a CPU), and the draw depends only on the row's logits and its generator,
never on the batch it sits in. Sequence ``i`` of a request with ``n > 1`` gets
its own generator, seeded by `sequence_seed` (index 0 uses the request's
seed itself).

    top-k: keep the k largest logits (ties at the k-th are kept)
    top-p: keep the smallest set of most likely tokens whose mass reaches p
    min-p: keep the tokens at least min_p times as likely as the most likely one

Then a structured-output row (`minisys.structured`) gets its grammar's token
mask: disallowed tokens to -inf (`apply_token_mask`, one vectorized call for
all masked rows), after the history knobs and before temperature and the
filters, for greedy and sampled rows alike.

Before all that, `process_logits` applies the knobs that read a sequence's
tokens (its `History`), in vLLM's order, to the rows that set one (greedy
rows too): logit_bias, min_tokens, then the repetition, frequency and
presence penalties. Rows without them are left untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from .structured.mask import RowMasks, apply_token_mask

if TYPE_CHECKING:
    from .engine.sampling_params import SamplingParams


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, V) / T. Greedy (T == 0) is handled by the caller with argmax."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; use argmax for greedy decoding")
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties at the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]           # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_FIRST_K = 256      # candidates `apply_top_p` looks at first (x8 while the nucleus is wider)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability mass reaches p.

    A token is dropped when the mass of the tokens strictly more likely than it
    already reaches p; the most likely token is always kept.

    Without sorting the vocabulary: a nucleus is usually a few dozen tokens, so the
    ``TOP_P_FIRST_K`` most likely ones (``torch.topk``, ~20x cheaper than a sort of 49k
    logits on a CPU) hold it whenever their mass reaches p; the kept tokens are then those
    at least as likely as the last one needed. Else k grows, and past the vocabulary the
    full sort decides (`apply_top_p_sorted`, the plain path). The two keep the same tokens,
    except that a token exactly as likely as the last kept one is kept here too.
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)                                # (B, V)
    k = TOP_P_FIRST_K
    while k < logits.shape[-1]:
        top = torch.topk(probs, k, dim=-1).values                        # (B, k), most likely first
        mass = top.cumsum(dim=-1)
        if bool((mass[:, -1] >= p).all()):                               # every row's nucleus is in its top k
            n_keep = ((mass - top) < p).sum(dim=-1, keepdim=True)        # (B, 1), >= 1
            return logits.masked_fill(probs < top.gather(-1, n_keep - 1), float("-inf"))
        k *= 8
    return apply_top_p_sorted(logits, p)


def apply_top_p_sorted(logits: torch.Tensor, p: float) -> torch.Tensor:
    """`apply_top_p` by sorting the whole vocabulary: the plain path, and the oracle of the fast one."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)   # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs                    # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop the tokens whose probability is below ``min_p`` times the row's largest (vLLM's min-p)."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


class History(NamedTuple):
    """What `process_logits` reads of one sequence: its prompt and output token ids, and the EOS ids
    that ``min_tokens`` masks (with the request's ``stop_token_ids``)."""

    prompt: Sequence[int]
    output: Sequence[int]
    eos: Sequence[int] = ()


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[History | None] | None) -> torch.Tensor:
    """logits (B, V) -> the rows with a history knob (`SamplingParams.history_knobs`) processed, batched.

    For each such row, in order: ``+ logit_bias``; EOS and stop_token_ids to -inf while fewer than
    ``min_tokens`` are out; tokens seen in prompt + output: ``l / r if l > 0 else l * r``
    (repetition_penalty r); ``- frequency_penalty * count - presence_penalty * (count > 0)``
    over the output's token counts. Other rows are returned as they came.
    """
    rows = [i for i, p in enumerate(params) if p.history_knobs]
    if not rows:
        return logits
    if histories is None or any(histories[i] is None for i in rows):
        raise ValueError(f"{params[rows[0]].history_knobs[0]} needs the sequence's tokens (a History per row)")
    b, V, dev = len(rows), logits.shape[-1], logits.device
    x = logits[rows].float()                                                        # (b, V)
    ps, hs = [params[i] for i in rows], [histories[i] for i in rows]

    def column(name: str) -> torch.Tensor:                                          # (b, 1) of a knob
        return torch.tensor([[float(getattr(p, name))] for p in ps], device=dev)

    bias = [(r, t, v) for r, p in enumerate(ps) for t, v in (p.logit_bias or {}).items()]
    if bias:
        r_, t_, v_ = zip(*bias)
        x = x.index_put((torch.tensor(r_, device=dev), torch.tensor(t_, device=dev)),
                        torch.tensor(v_, device=dev, dtype=x.dtype), accumulate=True)
    banned = [(r, t) for r, (p, h) in enumerate(zip(ps, hs)) if len(h.output) < p.min_tokens
              for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(h.eos))]
    if banned:
        r_, t_ = zip(*banned)
        x[torch.tensor(r_, device=dev), torch.tensor(t_, device=dev)] = float("-inf")
    counts = torch.zeros(b, V, device=dev)                                          # output token counts
    seen = torch.zeros(b, V, dtype=torch.bool, device=dev)                          # in prompt + output
    for r, h in enumerate(hs):
        if h.output:
            out = torch.as_tensor(list(h.output), device=dev)
            counts[r].index_add_(0, out, torch.ones(len(out), device=dev))
        if h.prompt:
            seen[r, torch.as_tensor(list(h.prompt), device=dev)] = True
    seen |= counts > 0
    rep = column("repetition_penalty")
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0).float()
    out = logits.float().clone()
    out[rows] = x
    return out


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> the distribution a sampled request draws from (temperature, top-k, top-p, min-p,
    softmax).

    The draft model's q and the target's p in speculative decoding come from
    here too, so both sides of the rejection rule see the same processing.
    """
    x = apply_temperature(logits.float(), params.temperature)
    return torch.softmax(apply_min_p(apply_top_p(apply_top_k(x, params.top_k), params.top_p), params.min_p),
                         dim=-1)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (B, V) (rows need not sum to 1), u (B,) in [0, 1) -> tokens (B,).

    Token i is picked when ``cdf[i-1] <= u * total < cdf[i]`` (``right=True``),
    so a token of probability zero, whose cdf step is empty, is never picked.
    """
    cdf = probs.cumsum(dim=-1)                                           # (B, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def uniforms(generators: torch.Generator | Sequence[torch.Generator | None] | None, n: int,
             rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, n) uniforms in [0, 1): row i from ``generators[i]`` (a list), or all rows from one generator."""
    if isinstance(generators, (list, tuple)):
        return torch.stack([torch.rand(n, generator=g, device=device) for g in generators])
    return torch.rand(rows, n, generator=generators, device=device)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None],
                histories: Sequence[History | None] | None = None, masks: RowMasks | None = None) -> list[int]:
    """One token per row of logits (B, V), row i under ``params[i]`` with ``generators[i]``.

    The rows with a history knob are processed first (`process_logits`, with
    ``histories[i]``), then ``masks`` (structured outputs: row ``masks.rows[j]``
    may only pick the tokens set in ``masks.bitmask[j]``). Greedy rows: one argmax together. Sampled rows are
    grouped by (temperature, top_k, top_p, min_p) so each group is filtered in
    one call; each row then draws ONE uniform from its own generator.
    """
    logits = process_logits(logits, params, histories)
    if masks is not None:
        logits = apply_token_mask(logits, masks.rows, masks.bitmask)
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        picked = logits.argmax(dim=-1) if len(greedy) == len(params) else logits[greedy].argmax(dim=-1)
        for i, t in zip(greedy, picked.tolist()):
            tokens[i] = t
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
    for rows in groups.values():
        probs = probs_from_logits(logits[rows], params[rows[0]])                       # (b, V)
        u = uniforms([generators[i] for i in rows], 1, len(rows), logits.device)[:, 0]  # (b,)
        for i, t in zip(rows, sample_categorical(probs, u).tolist()):
            tokens[i] = t
    return tokens


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: torch.Generator | None = None, history: History | None = None,
                      bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,), every row under ``params`` (and ``history``, and the structured
    output ``bitmask`` (1, W) if given), drawing from one ``generator``. For one row this is exactly
    `sample_rows` with that row's generator, history and mask.
    """
    logits = process_logits(logits.float(), [params] * logits.shape[0], [history] * logits.shape[0])
    if bitmask is not None:
        logits = apply_token_mask(logits, range(logits.shape[0]), bitmask.expand(logits.shape[0], -1))
    if params.greedy:
        return logits.argmax(dim=-1)
    u = uniforms(generator, 1, logits.shape[0], logits.device)[:, 0]                   # (B,)
    return sample_categorical(probs_from_logits(logits, params), u)


def sequence_seed(seed: int | None, index: int) -> int | None:
    """The seed of sequence ``index`` of a request with ``n`` samples: the request's own seed for
    index 0, a fixed function of (seed, index) for the others; None (unseeded) stays None."""
    if seed is None or index == 0:
        return seed
    return hash((seed, index)) & (2**62 - 1)        # hash of a tuple of ints: the same in every process


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A sequence's own random generator: seeded if asked, else from torch's global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[tuple]:
    """Per row i of ``logits`` (R, V): ``(token_ids[i], its logprob, its rank, top ids, top logprobs)``.

    The logprobs are the *raw* model distribution, ``log_softmax(logits)`` in
    fp32, before temperature, penalties, logit_bias or top-k/top-p/min-p (vLLM
    V1's default ``logprobs_mode="raw_logprobs"``). The rank is 1 + the number
    of tokens strictly more likely; the top ``num_top[i]`` alternatives come
    most likely first (ties by the lower token id: `torch.topk` order).
    """
    lp = torch.log_softmax(logits.float(), dim=-1)                                   # (R, V)
    tok = torch.tensor(list(token_ids), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, tok[:, None])                                              # (R, 1)
    ranks = (lp > chosen).sum(dim=1) + 1
    k = max(num_top, default=0)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], tok[:, None][:, :0])
    chosen, ranks, top_v, top_i = chosen[:, 0].tolist(), ranks.tolist(), top_v.tolist(), top_i.tolist()
    return [(t, chosen[i], ranks[i], top_i[i][:num_top[i]], top_v[i][:num_top[i]])
            for i, t in enumerate(token_ids)]
