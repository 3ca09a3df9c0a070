"""Lab 01 tests: the sampler and the two generation loops.

Oracles: numpy sorting for top-k/top-p, a chi-square test of sampled
frequencies against the filtered softmax, and Hugging Face transformers'
greedy argmax on the same tiny random Llama checkpoint for the loops.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from minisys.engine.sampling_params import SamplingParams


def reference_impl():
    from minisys import sampling as sampler
    from minisys.engine import eager
    return types.SimpleNamespace(
        apply_top_k=sampler.apply_top_k,
        apply_top_p=sampler.apply_top_p,
        sample_next_token=sampler.sample_next_token,
        generate_no_cache=lambda m, ids, n: eager.greedy_generate(m, ids, n, use_kv_cache=False),
        generate_with_kv_cache=lambda m, ids, n: eager.greedy_generate(m, ids, n, use_kv_cache=True),
    )


def _rows(seed: int, b: int = 4, v: int = 40, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def _top_p_keep(row: np.ndarray, p: float) -> np.ndarray:
    """The nucleus of one row (float64): the most likely tokens, in order, until their mass
    reaches ``p`` -- the token that crosses ``p`` is kept; ``p >= 1`` keeps everything."""
    if p >= 1:
        return np.ones(len(row), bool)
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    keep, mass = np.zeros(len(row), bool), 0.0
    for i in np.argsort(-probs, kind="stable"):
        keep[i] = True
        mass += probs[i]
        if mass >= p:
            break
    return keep


def _clear_of_the_boundary(row: np.ndarray, p: float, margin: float = 1e-4) -> bool:
    """No token's mass-before sits within ``margin`` of ``p`` (float32 vs float64 cannot disagree)."""
    probs = np.exp(row - row.max())
    probs = np.sort(probs / probs.sum())[::-1]
    return p >= 1 or bool(np.abs(np.cumsum(probs) - probs - p).min() > margin)


# ---------------------------------------------------------------- the sampler
@pytest.mark.points(2)
@pytest.mark.exercise("apply_top_k")
@pytest.mark.parametrize("k", [1, 3, 17, 0, 40, 100])
def test_top_k(impl, k):
    logits = _rows(k)
    before = logits.clone()
    kept = torch.isfinite(impl.apply_top_k(logits, k)).numpy()
    assert torch.equal(logits, before), "apply_top_k must not modify its input"
    for row, keep in zip(logits.numpy(), kept):
        expected = np.ones(40, bool) if k <= 0 or k >= 40 else np.isin(np.arange(40), np.argsort(-row)[:k])
        assert np.array_equal(keep, expected)


@pytest.mark.points(2)
@pytest.mark.exercise("apply_top_p")
@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95, 1.0])
def test_top_p(impl, p):
    logits = _rows(int(p * 100))
    out = impl.apply_top_p(logits, p)
    kept = torch.isfinite(out).numpy()
    for i, (row, keep, orow) in enumerate(zip(logits.double().numpy(), kept, out.numpy())):
        assert _clear_of_the_boundary(row, p), "test data too close to p to grade exactly"
        oracle = _top_p_keep(row, p)
        assert np.array_equal(keep, oracle), (
            f"row {i}: kept {int(keep.sum())} tokens, the nucleus for p={p} has {int(oracle.sum())} "
            f"(keep the token whose probability crosses p; wrongly kept: "
            f"{np.flatnonzero(keep & ~oracle).tolist()}, wrongly dropped: {np.flatnonzero(oracle & ~keep).tolist()})")
        np.testing.assert_allclose(orow[keep], row[keep], rtol=1e-6)   # kept logits unchanged


@pytest.mark.points(1)
@pytest.mark.exercise("sample_next_token")
def test_greedy_is_argmax(impl):
    logits = _rows(3)
    assert torch.equal(impl.sample_next_token(logits, SamplingParams(temperature=0)).long(), logits.argmax(-1))


@pytest.mark.points(3)
@pytest.mark.exercise("sample_next_token")
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.8)])
def test_sampled_frequencies(impl, temperature, top_k, top_p):
    from scipy.stats import chisquare
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    row = logits[0].double().numpy() / temperature
    allowed = np.ones(6, bool)
    if top_k:
        allowed[np.argsort(-row)[top_k:]] = False
    if top_p < 1:
        allowed &= _top_p_keep(row, top_p)
    probs = np.where(allowed, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = impl.sample_next_token(logits.expand(20000, 6), params, torch.Generator().manual_seed(5))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[~allowed].sum() == 0, "sampled a token the filters should have removed"
    assert chisquare(counts[allowed], 20000 * probs[allowed]).pvalue > 1e-3


@pytest.mark.points(1)
@pytest.mark.exercise("sample_next_token")
def test_seeded_generator_reproduces(impl):
    logits = _rows(9, b=1, v=500)
    params = SamplingParams(temperature=1.0)
    a = [int(impl.sample_next_token(logits, params, g)) for g in [torch.Generator().manual_seed(1)] for _ in range(10)]
    b = [int(impl.sample_next_token(logits, params, g)) for g in [torch.Generator().manual_seed(1)] for _ in range(10)]
    assert a == b and len(set(a)) > 1


# ---------------------------------------------------------------- the loops
@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    """The tiny random Llama as minisys loads it, and transformers' greedy tokens for it (the oracle)."""
    from transformers import AutoModelForCausalLM

    from minisys.model import load
    path = tiny_dirs["llama"]
    model, _ = load(str(path), device="cpu", dtype=torch.float32, quiet=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return model, prompt, seq[len(prompt):]


class CountingModel:
    """Wraps the model and records how many tokens each forward call receives."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __call__(self, input_ids, *args, **kwargs):
        self.fed.append(int(input_ids.numel()))
        return self.model(input_ids, *args, **kwargs)

    def forward_sequence(self, ids):
        self.fed.append(len(ids))
        return self.model.forward_sequence(ids)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.points(3)
@pytest.mark.exercise("generate_no_cache")
def test_generate_no_cache_matches_transformers(impl, tiny):
    model, prompt, expected = tiny
    assert list(impl.generate_no_cache(model, prompt, 12)) == expected


@pytest.mark.points(3)
@pytest.mark.exercise("generate_with_kv_cache")
def test_generate_with_kv_cache_matches_transformers(impl, tiny):
    model, prompt, expected = tiny
    assert list(impl.generate_with_kv_cache(model, prompt, 12)) == expected


@pytest.mark.points(2)
@pytest.mark.exercise("generate_with_kv_cache")
def test_kv_cache_loop_feeds_one_token_per_step(impl, tiny):
    model, prompt, expected = tiny
    counting = CountingModel(model)
    out = impl.generate_with_kv_cache(counting, prompt, 6)
    assert list(out) == expected[:6]
    assert counting.fed == [len(prompt)] + [1] * 5, \
        f"expected a prefill of {len(prompt)} tokens then 1 token per step, got {counting.fed}"
