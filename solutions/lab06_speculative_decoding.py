# %% [markdown]
# # Lab 06: Speculative decoding
#
# Companion to `lessons/06-speculative-decoding.md`. A decode step of a small
# model on one request reads every weight to produce one token: the step is
# memory-bound, and scoring k + 1 tokens instead of 1 costs almost the same.
# Speculative decoding guesses k tokens cheaply, lets the target score them
# all in one forward, keeps the longest acceptable prefix and adds one token of
# its own. You will write the two pieces that carry the idea:
#
# 1. **the rejection sampler** (`rejection_sample`): Leviathan et al.'s rule
#    that keeps the output distributed *exactly* as the target's;
# 2. **the n-gram proposer** (`ngram_propose`): prompt lookup, drafts copied
#    from the request's own prompt and output, no model at all.
#
# The last cells plug your proposer into minisys's real `LLMEngine` and
# measure plain decoding against speculation on a text-correction prompt.
#
#     python -m minisys labs start 06     # once: copies this notebook to work/06-speculative-decoding.ipynb
#     python -m minisys grade work/06-speculative-decoding.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import os
import time

import torch

# %% [markdown]
# ## 1. The rejection sampler
#
# The target scored the request's last token and the k drafts `x_0 .. x_{k-1}`:
# `target_probs` (k + 1, V) holds `p_0 .. p_k`, where `p_j` is the target's
# distribution for the token after draft j - 1 (`p_0`: after the last real
# token; `p_k`: after all drafts). `draft_probs` (k, V) holds the draft's
# `q_0 .. q_{k-1}` (x_j was drawn from q_j).
#
# For j = 0, 1, ..., k - 1:
#
# * draw `u = torch.rand(1, generator=generator).item()`; **accept** x_j when
#   `u < p_j(x_j) / q_j(x_j)` (probability min(1, p/q));
# * otherwise **reject**: draw the replacement from the residual
#   `max(0, p_j - q_j)` normalised to sum 1, with
#   `torch.multinomial(residual, 1, generator=generator)`, and stop.
#
# If all k drafts were accepted, draw the **bonus** token from `p_k` the same
# way. Return the emitted tokens: the accepted drafts followed by the one
# token the target drew (between 1 and k + 1 tokens). Draw exactly one
# uniform per examined draft, in order, from `generator`.

# %%
def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: list[int],
                     generator: torch.Generator | None = None) -> list[int]:
    """target_probs (k+1, V), draft_probs (k, V), k drafts -> the emitted tokens."""
    ### BEGIN SOLUTION
    out = []
    for j, x in enumerate(draft_tokens):
        u = torch.rand(1, generator=generator).item()
        if u * draft_probs[j, x] < target_probs[j, x]:
            out.append(x)
            continue
        residual = (target_probs[j] - draft_probs[j]).clamp(min=0)
        if residual.sum() <= 0:
            residual = target_probs[j]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(draft_tokens)], 1, generator=generator)))
    return out
    ### END SOLUTION


# %% tags=["benchmark"]
p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
q = torch.tensor([[0.2, 0.7, 0.1]])
g = torch.Generator().manual_seed(0)
draws = [rejection_sample(p, q, [int(torch.multinomial(q[0], 1, generator=g))], g)[0] for _ in range(3000)]
print("first emitted token frequencies:", (torch.bincount(torch.tensor(draws), minlength=3) / 3000).tolist(),
      "target p_0:", p[0].tolist(), "draft q_0:", q[0].tolist())

# %% [markdown]
# ## 2. The n-gram proposer (prompt lookup)
#
# Take the last `n` tokens of `token_ids` (the prompt followed by the output
# so far). Find the **latest** earlier position where the same `n` tokens
# occur — a match starting before the suffix itself (it may overlap it) — and
# propose the (at most `k`) tokens that followed it there. Try `n = n_max`
# first, then smaller n down to `n_min`; return `[]` if nothing matches (or k
# is 0). A longer match is a more reliable guess; the latest match is the
# most recent context.

# %%
def ngram_propose(token_ids: list[int], k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens."""
    ### BEGIN SOLUTION
    L = len(token_ids)
    if k <= 0:
        return []
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = token_ids[L - n:]
        for start in range(L - n - 1, -1, -1):
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + k]
    return []
    ### END SOLUTION


# %% tags=["benchmark"]
print(ngram_propose([10, 11, 12, 13, 99, 10, 11], k=3, n_max=2))   # expect [12, 13, 99]

# %% [markdown]
# ## 3. Your proposer in the real engine
#
# `LLMEngine` with `speculative_method="ngram"` asks its proposer for drafts
# before every step; we swap in yours (with n-grams of 4 down to 2 tokens: a
# single matching token is too weak a clue). The prompt asks SmolLM2 to correct a
# paragraph and write it out again, so most of the answer is a copy of the
# prompt. We compare plain decoding with speculation for a few k: tokens per
# second, the acceptance rate alpha, and tokens emitted per target forward
# against the formula `(1 - alpha^(k+1)) / (1 - alpha)`. Greedy outputs must
# be identical (that is the point).

# %% tags=["benchmark"]
from minisys.bench.spec import prompts
from minisys.engine.config import EngineConfig
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams
from minisys.model import load
from minisys.spec import Proposal, Proposer, expected_tokens_per_step

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
model, tokenizer = load(device="cpu", attention_backend="paged", quiet=True)
prompt = prompts(tokenizer, "grounded", 1)[0]
max_tokens = 32 if quick else 120


class YourNgram(Proposer):
    def propose(self, requests, ks):
        return [Proposal(ngram_propose(r.all_token_ids, k, 4, 2)) for r, k in zip(requests, ks)]


def serve(k):
    spec = {} if k == 0 else {"speculative_method": "ngram", "num_speculative_tokens": k}
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, **spec))
    if k:
        engine.speculator.proposer = YourNgram()
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    return time.perf_counter() - t0, out.outputs[0].token_ids, engine.stats


ks = [0, 2, 4] if quick else [0, 1, 2, 4, 6, 8]
runs = {k: serve(k) for k in ks}
base_secs, base_ids, _ = runs[0]
for k in ks[1:]:
    secs, ids, st = runs[k]
    a = st.spec.acceptance_rate
    print(f"k={k}: {len(ids) / secs:5.1f} tok/s (plain {len(base_ids) / base_secs:5.1f}), speedup "
          f"{base_secs / secs:4.2f}x, alpha {a:.2f}, tokens/verification {st.spec.tokens_per_verification:.2f} "
          f"(formula at mean k {st.spec.mean_k:.1f}: {expected_tokens_per_step(a, st.spec.mean_k):.2f}), "
          f"same output: {ids == base_ids}")

# %% tags=["benchmark"]
import matplotlib.pyplot as plt

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax1.plot(ks[1:], [base_secs / runs[k][0] for k in ks[1:]], "o-")
ax1.axhline(1.0, color="gray", ls=":")
ax1.set(xlabel="k (drafts per step)", ylabel="speedup over plain decoding", title="n-gram speculation, batch 1")
ax2.plot(ks[1:], [runs[k][2].spec.tokens_per_verification for k in ks[1:]], "o-", label="measured")
ax2.plot(ks[1:], [expected_tokens_per_step(runs[k][2].spec.acceptance_rate, runs[k][2].spec.mean_k) for k in ks[1:]],
         "s--", label="(1 - a^(k+1)) / (1 - a)")
ax2.set(xlabel="k", ylabel="tokens per target forward", title="tokens per verification")
ax2.legend()
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab06_speculative.png")
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/
