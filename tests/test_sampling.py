"""The sampler against independent oracles (numpy sorting, softmax frequencies)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from minisys.sampling import apply_top_k, apply_top_p, sample_next_token, make_generator
from minisys.engine.sampling_params import SamplingParams


def _top_p_oracle(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens in descending probability until the kept mass reaches p (loop, float64)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = np.zeros_like(probs, dtype=bool)
    mass = 0.0
    for i in np.argsort(-probs, kind="stable"):
        keep[i] = True
        mass += probs[i]
        if mass >= p:
            break
    return keep


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 50), st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_top_k_keeps_exactly_the_k_largest(vocab, k, seed):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(apply_top_k(logits, k)).numpy()
    for row, keep in zip(logits.numpy(), kept):
        expected = np.zeros(vocab, bool)
        expected[np.argsort(-row)[: min(k, vocab)]] = True
        assert np.array_equal(keep, expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 50), st.floats(0.01, 0.99), st.integers(0, 2**31 - 1))
def test_top_p_keeps_the_smallest_nucleus(vocab, p, seed):
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    kept = torch.isfinite(apply_top_p(logits, p)).numpy()
    for row, keep in zip(logits.double().numpy(), kept):
        oracle = _top_p_oracle(row, p)
        # float32 vs float64 cumulative sums may disagree only on a token at the exact boundary
        assert (keep != oracle).sum() <= 1 and keep[row.argmax()]


def test_greedy_is_argmax():
    logits = torch.randn(4, 100)
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=0)), logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.7)])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    """Chi-square goodness of fit of 20k draws against the distribution computed in numpy."""
    from scipy.stats import chisquare
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    row = logits[0].double().numpy() / temperature
    allowed = np.ones(6, bool)
    if top_k:
        allowed[np.argsort(-row)[top_k:]] = False
    if top_p < 1:
        allowed &= _top_p_oracle(row, top_p)
    probs = np.where(allowed, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    g = make_generator(1234)
    draws = sample_next_token(logits.expand(20000, 6), params, g).numpy()
    counts = np.bincount(draws, minlength=6)
    assert counts[~allowed].sum() == 0
    _, pval = chisquare(counts[allowed], 20000 * probs[allowed])
    assert pval > 1e-3


def test_seeded_generator_is_reproducible():
    logits = torch.randn(1, 1000)
    params = SamplingParams(temperature=1.0, seed=7)
    a = [int(sample_next_token(logits, params, g)) for g in [make_generator(7)] for _ in range(20)]
    b = [int(sample_next_token(logits, params, g)) for g in [make_generator(7)] for _ in range(20)]
    assert a == b


@pytest.mark.parametrize("kwargs,msg", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"), ({"n": 0}, "n must"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"top_k": 1.5}, "top_k"),
])
def test_invalid_sampling_params_are_refused_with_a_message(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


# ------------------------------------------------ the history knobs: a naive per-row, per-token oracle
def naive_process(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int],
                  eos: list[int]) -> list[float]:
    """vLLM's formulas, one token at a time in plain Python: bias, min_tokens, repetition, frequency/presence."""
    x = list(logits)
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= output.count(t) * p.frequency_penalty + p.presence_penalty
    return x


KNOBS = [dict(), dict(repetition_penalty=1.3), dict(repetition_penalty=0.7), dict(frequency_penalty=0.5),
         dict(presence_penalty=-1.2), dict(frequency_penalty=-0.4, presence_penalty=1.5),
         dict(logit_bias={3: 100.0, 5: -7.5}), dict(min_tokens=4, stop_token_ids=[2]),
         dict(min_tokens=4, ignore_eos=True), dict(min_tokens=1),
         dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2, logit_bias={1: 2.0}, min_tokens=9)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), out_len=st.integers(0, 6))
def test_process_logits_matches_the_naive_oracle_in_a_mixed_batch(seed, out_len):
    from minisys.sampling import History, process_logits
    g = torch.Generator().manual_seed(seed)
    V = 12
    logits = torch.randn(len(KNOBS), V, generator=g) * 3
    params = [SamplingParams(temperature=0, max_tokens=16, **k) for k in KNOBS]
    hist = [History(torch.randint(0, V, (3,), generator=g).tolist(),
                    torch.randint(0, V, (out_len,), generator=g).tolist(), (0,)) for _ in KNOBS]
    got = process_logits(logits, params, hist)
    for i, (p, h) in enumerate(zip(params, hist)):
        want = torch.tensor(naive_process(logits[i].tolist(), p, h.prompt, h.output, [0]))
        assert torch.allclose(got[i], want, atol=1e-5), (KNOBS[i], got[i], want)
    assert torch.equal(got[0], logits[0])                   # a row without knobs is untouched


def test_hand_worked_penalties():
    from minisys.sampling import History, process_logits
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    h = [History([0], [1, 1, 2], (3,))]
    rep = process_logits(logits, [SamplingParams(repetition_penalty=2.0)], h)
    assert rep.tolist() == [[1.0, -4.0, 0.5, 0.5]]         # 0 (prompt), 1, 2 seen; 3 not
    pen = process_logits(logits, [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)], h)
    assert pen.tolist() == [[2.0, -4.5, -0.5, 0.5]]         # prompt token 0 untouched: output only
    early = process_logits(logits, [SamplingParams(min_tokens=4)], h)
    assert early[0, 3] == -math.inf and early[0, :3].tolist() == [2.0, -2.0, 1.0]
    assert process_logits(logits, [SamplingParams(min_tokens=3)], h).tolist() == logits.tolist()


def test_min_p_keeps_tokens_at_least_min_p_times_the_top():
    from minisys.sampling import probs_from_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = probs_from_logits(logits, SamplingParams(min_p=0.3))          # keep p >= 0.15
    assert probs[0, 3] == 0 and probs[0, 2] > 0
    assert torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_sample_rows_with_knobs_draws_like_each_row_alone():
    """Rows with and without knobs, greedy and sampled, in one batch == each row sampled alone."""
    from minisys.sampling import History, sample_rows
    logits = torch.randn(len(KNOBS) * 2, 12, generator=torch.Generator().manual_seed(0)) * 2
    params = [SamplingParams(temperature=t, min_p=m, max_tokens=16, **k)
              for t, m in ((0.0, 0.0), (0.9, 0.1)) for k in KNOBS]
    hist = [History([1, 2], [3, 3, 4], (0,))] * len(params)
    batch = sample_rows(logits, params, [make_generator(i) for i in range(len(params))], hist)
    alone = [int(sample_next_token(logits[i:i + 1], p, make_generator(i), hist[i])[0])
             for i, p in enumerate(params)]
    assert batch == alone


@pytest.mark.parametrize("kwargs,field", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"), (dict(logit_bias={1: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens")])
def test_knobs_out_of_range_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)
