"""The rejection sampler samples exactly from the target: a chi-square test that a wrong rule fails.

Oracle: the target distributions themselves. For hypothesis-generated small
vocabularies and (target p_0..p_k, draft q_0..q_{k-1}) pairs that do not
depend on the context, the j-th emitted token, among the runs that emitted at
least j + 1 tokens (accepted >= j), must be distributed as p_j; a chi-square
goodness-of-fit test at a fixed significance (Bonferroni over positions) with
a fixed seed decides. The same test on `accept_all` (keep every draft) must
reject it.
"""
from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from minisys.sampling import sample_categorical
from minisys.spec.rejection import accept_all, greedy_verify, rejection_sample

SIGNIFICANCE = 1e-3
N = 20_000
MIN_RUNS = 2_000


def dist(V):
    """A distribution over V tokens from integer weights (some zero), smallest nonzero prob >= 1/(10 V)."""
    return st.lists(st.integers(0, 10), min_size=V, max_size=V).filter(lambda w: sum(w) > 0).map(
        lambda w: [x / sum(w) for x in w])


@st.composite
def target_draft_pair(draw):
    V = draw(st.integers(2, 6))
    k = draw(st.integers(1, 3))
    p = torch.tensor([draw(dist(V)) for _ in range(k + 1)], dtype=torch.float64)    # (k+1, V)
    q = torch.tensor([draw(dist(V)) for _ in range(k)], dtype=torch.float64)        # (k, V)
    return p, q


def emitted_position_pvalues(sampler, p: torch.Tensor, q: torch.Tensor, seed: int = 0) -> list[float]:
    """Run ``sampler`` N times with drafts x_j ~ q_j; p-value of "token j ~ p_j" for each testable position."""
    g = torch.Generator().manual_seed(seed)
    k, V = q.shape
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], 1)  # (N, k)
    tokens, n_acc = sampler(p.expand(N, k + 1, V), q.expand(N, k, V), drafts, g)
    pvalues = []
    for j in range(k + 1):
        rows = n_acc >= j                                   # runs that emitted a token at position j
        if rows.sum() < MIN_RUNS:
            continue
        counts = torch.bincount(tokens[rows, j], minlength=V).double()
        support = p[j] > 0
        if counts[~support].sum() > 0:                      # a token the target never emits
            pvalues.append(0.0)
            continue
        n = counts.sum()
        pvalues.append(float(chisquare(counts[support].numpy(), (n * p[j][support]).numpy()).pvalue)
                       if support.sum() > 1 else 1.0)
    return pvalues


@settings(max_examples=30, deadline=None, derandomize=True)
@given(target_draft_pair())
def test_rejection_sampler_output_follows_the_target(pair):
    p, q = pair
    pv = emitted_position_pvalues(rejection_sample, p, q)
    assert pv and min(pv) > SIGNIFICANCE / len(pv), f"chi-square rejects: p-values {pv}"


@settings(max_examples=15, deadline=None, derandomize=True)
@given(target_draft_pair())
def test_accept_every_draft_fails_the_same_test(pair):
    p, q = pair
    assume(0.5 * (p[0] - q[0]).abs().sum() >= 0.1)          # the draft differs from the target at position 0
    pv = emitted_position_pvalues(accept_all, p, q)
    assert min(pv) <= SIGNIFICANCE / len(pv), "the wrong sampler passed the test: the test cannot fail"


def test_one_hot_drafts_accept_with_probability_p_of_the_draft():
    """n-gram drafts (q one-hot): accepted with probability p(x); the residual is p without x, renormalised."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    tokens, n_acc = rejection_sample(p.expand(N, 2, 3), None, torch.zeros(N, 1, dtype=torch.long), g)
    assert abs(n_acc.double().mean().item() - 0.5) < 0.02
    rejected = tokens[n_acc == 0, 0]
    assert (rejected != 0).all() and abs((rejected == 1).double().mean().item() - 0.6) < 0.03


def test_equal_draft_and_target_accepts_everything():
    p = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    drafts = torch.tensor([[1, 0]] * 100)
    tokens, n_acc = rejection_sample(p.expand(100, 3, 2), p[:2].expand(100, 2, 2), drafts, g)
    assert (n_acc == 2).all() and (tokens[:, 2] == 0).all() and (tokens[:, :2] == drafts).all()


def test_greedy_verify_longest_prefix_then_argmax():
    logits = torch.tensor([[0., 5, 0], [9, 0, 0], [0, 0, 1], [0, 3, 0]])     # argmax 1, 0, 2, 1
    assert greedy_verify(logits, [1, 0, 2]) == [1, 0, 2, 1]                   # all accepted + bonus
    assert greedy_verify(logits, [1, 2, 2]) == [1, 0]                         # mismatch at draft 1
    assert greedy_verify(logits, [0, 0, 2]) == [1]
    assert greedy_verify(logits[:1], []) == [1]


def test_sample_categorical_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(5, 5)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9999])
    assert sample_categorical(probs, u).tolist() == [1, 1, 1, 3, 3]
