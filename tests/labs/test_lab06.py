"""Lab 06 tests: the rejection sampler and the n-gram proposer.

Oracles: the target distribution itself (chi-square goodness of fit of the
emitted tokens at a fixed significance and seed; acceptance probabilities
worked out by hand: P(accept) = sum_x min(p(x), q(x))); a naive n-gram search
written out here (all match starts, take the latest); and, end to end, plain
greedy decoding of the real engine (speculation with the student's proposer
must emit the same tokens).
"""
from __future__ import annotations

import random
import types

import pytest
import torch
from scipy.stats import chisquare

SIGNIFICANCE = 1e-3


def reference_impl():
    from minisys.spec import ngram_propose
    from minisys.spec.rejection import rejection_sample as batched

    def rejection_sample(target_probs, draft_probs, draft_tokens, generator=None):
        toks, n = batched(target_probs.unsqueeze(0), draft_probs.unsqueeze(0),
                          torch.tensor([draft_tokens], dtype=torch.long), generator)
        return toks[0, :int(n[0]) + 1].tolist()

    return types.SimpleNamespace(rejection_sample=rejection_sample, ngram_propose=ngram_propose)


def naive_ngram(tokens, k, n_max, n_min):
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens) or k <= 0:
            continue
        starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[-n:]]
        if starts:
            return tokens[max(starts) + n:max(starts) + n + k]
    return []


def emitted(impl, p, q, n, seed):
    """n runs with drafts x_j ~ q_j; the list of emitted token lists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(q.shape[0])]
        out.append(impl.rejection_sample(p, q, drafts, g))
    return out


def pvalue(tokens, probs):
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support].double() / probs[support].double().sum() * counts.sum()
    return float(chisquare(counts[support].numpy(), expected.numpy()).pvalue)


CASES = [
    (torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.1, 0.1, 0.4, 0.4]])),
    (torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [0.2, 0.6, 0.2]]),
     torch.tensor([[0.5, 0.25, 0.25], [0.3, 0.3, 0.4]])),
]


@pytest.mark.points(4)
@pytest.mark.exercise("rejection_sample")
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rejection_sampler_emits_the_target_distribution(impl, case):
    p, q = CASES[case]
    runs = emitted(impl, p, q, 4000, seed=case)
    assert all(1 <= len(r) <= q.shape[0] + 1 for r in runs)
    assert pvalue([r[0] for r in runs], p[0]) > SIGNIFICANCE / 2, "first token is not distributed as p_0"
    second = [r[1] for r in runs if len(r) > 1]
    assert pvalue(second, p[1]) > SIGNIFICANCE / 2, "token after an accepted draft is not distributed as p_1"


@pytest.mark.points(2)
@pytest.mark.exercise("rejection_sample")
def test_acceptance_probability_is_sum_of_min_p_q(impl):
    p, q = CASES[0]
    runs = emitted(impl, p, q, 4000, seed=7)
    accept = sum(len(r) > 1 for r in runs) / len(runs)
    assert abs(accept - torch.minimum(p[0], q[0]).sum().item()) < 0.03     # 0.1 + 0.1 + 0.1 + 0 = 0.3


@pytest.mark.points(2)
@pytest.mark.exercise("rejection_sample")
def test_identical_draft_is_always_accepted_and_impossible_draft_never(impl):
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.0, 1.0]])
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        out = impl.rejection_sample(p, p[:2].clone(), [1, 0], g)
        assert out == [1, 0, 1]                                            # both accepted, bonus from p_2
    never = torch.tensor([[1.0, 0.0], [0.5, 0.5]])                         # target never emits token 1
    for _ in range(50):
        assert impl.rejection_sample(never, torch.tensor([[0.0, 1.0]]), [1], g) == [0]


@pytest.mark.points(2)
@pytest.mark.exercise("ngram_propose")
def test_ngram_examples(impl):
    assert impl.ngram_propose([1, 2, 3, 4, 1, 2], 3, 2, 1) == [3, 4, 1]
    assert impl.ngram_propose([1, 2, 3, 9, 2, 3, 7, 2, 3], 2, 2, 1) == [7, 2]     # latest match
    assert impl.ngram_propose([5, 6, 7], 3, 4, 1) == []
    assert impl.ngram_propose([7, 7, 7], 4, 3, 1) == [7]                          # overlap allowed
    assert impl.ngram_propose([1, 2, 3, 1], 0, 4, 1) == []
    assert impl.ngram_propose([4, 1, 2, 9, 3, 2, 5, 1, 2], 2, 2, 2) == [9, 3]     # n = 2 only


@pytest.mark.points(3)
@pytest.mark.exercise("ngram_propose")
@pytest.mark.parametrize("seed", range(3))
def test_ngram_matches_naive_search(impl, seed):
    rng = random.Random(seed)
    for _ in range(300):
        toks = [rng.randint(0, 3) for _ in range(rng.randint(0, 25))]
        k, n_max = rng.randint(0, 5), rng.randint(1, 4)
        n_min = rng.randint(1, n_max)
        assert impl.ngram_propose(toks, k, n_max, n_min) == naive_ngram(toks, k, n_max, n_min), (toks, k, n_max, n_min)


@pytest.mark.points(3)
@pytest.mark.exercise("ngram_propose")
def test_student_ngram_in_the_real_engine_equals_plain_decoding(impl, tiny_dirs):
    from minisys.engine.config import EngineConfig
    from minisys.engine.llm_engine import LLMEngine
    from minisys.engine.sampling_params import SamplingParams
    from minisys.model import load
    from minisys.spec import Proposal, Proposer
    model, tok = load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)

    class Student(Proposer):
        def propose(self, requests, ks):
            return [Proposal(impl.ngram_propose(r.all_token_ids, k, 3, 1)) for r, k in zip(requests, ks)]

    def serve(spec):
        engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=24, max_num_seqs=3, **spec))
        if spec:
            engine.speculator.proposer = Student()
        for i, t in enumerate(["the quick brown fox the quick", "over the lazy dog over", "fox fox fox"]):
            engine.add_request(str(i), tok.encode(t), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        done = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
            engine.scheduler.check_invariants()
        assert engine.scheduler.allocator.num_free == 24
        return done, engine.stats.spec

    plain, _ = serve({})
    spec, stats = serve({"speculative_method": "ngram", "num_speculative_tokens": 3})
    assert spec == plain and stats.proposed > 0
