# %% [markdown]
# # Lab 01: From tokens to text
#
# Companion to `lessons/01-tokens-to-text.md`. You will write the two loops at
# the heart of every LLM server:
#
# 1. **the sampler** — turning a row of logits into the next token
#    (`apply_top_k`, `apply_top_p`, `sample_next_token`);
# 2. **the generation loop** — first recomputing the whole sequence every step
#    (`generate_no_cache`), then keeping the keys and values of earlier tokens
#    in a KV cache (`generate_with_kv_cache`).
#
# Fill in every `raise NotImplementedError` and grade yourself with
#
#     python -m minisys labs start 01     # once: copies this notebook to work/01-tokens-to-text.ipynb
#     python -m minisys grade work/01-tokens-to-text.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).
#
# The tests compare your code with independent oracles (numpy sorting,
# chi-square tests of sampled frequencies, Hugging Face transformers' logits).
# The last cells time your two loops on the real model and plot the result.

# %%
import numpy as np
import torch

from minisys.attention import AttentionMetadata
from minisys.engine.sampling_params import SamplingParams
from minisys.kv import ContiguousKVCache
from minisys.model import LlamaModel

torch.manual_seed(0)

# %% [markdown]
# ## 0. Tokens, one forward pass, logits
#
# The model never sees text. The tokenizer (byte-level BPE, read from the GGUF
# file) turns text into integer ids; one forward pass turns ids into a row of
# **logits** per position: unnormalised scores over the 49,152-token
# vocabulary for the token that comes next. Run this cell to see it.

# %%
from minisys.model import load

model, tokenizer = load(device="cpu", quiet=True)
ids = tokenizer.encode("The capital of France is")
print("token ids:", ids)
print("pieces:   ", [tokenizer.decode([i]) for i in ids])
logits = model.forward_sequence(ids)          # (T, V): one row per input position
print("logits shape:", tuple(logits.shape))
top = torch.topk(torch.softmax(logits[-1], -1), 5)
for p, i in zip(top.values, top.indices):
    print(f"  {tokenizer.decode([int(i)])!r:>12}  p={p:.3f}")

# %% [markdown]
# ## 1. The sampler
#
# Greedy decoding takes `argmax`. Sampling draws from
# `softmax(logits / temperature)`; two filters cut off the unreliable tail first:
#
# * **top-k** keeps the `k` largest logits of each row (set the others to `-inf`);
#   `k <= 0` or `k >= V` keeps everything. Keep ties with the k-th value.
# * **top-p** (nucleus) keeps the most likely tokens until their probability
#   mass reaches `p`: sort the probabilities in descending order; a token is
#   dropped when the tokens *strictly before it* already hold mass `>= p`. The
#   most likely token is always kept. `p >= 1` keeps everything.
#
# All functions take a batch of rows, `logits` of shape `(B, V)`, and must not
# modify their input in place.

# %%
def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Return logits with every entry below the k-th largest of its row set to -inf."""
    ### BEGIN SOLUTION
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]            # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))
    ### END SOLUTION


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Return logits with every token outside the top-p nucleus of its row set to -inf."""
    ### BEGIN SOLUTION
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)   # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs                    # mass strictly before
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))
    ### END SOLUTION


# %% [markdown]
# `sample_next_token` puts it together for a batch of rows sharing one
# `SamplingParams`: greedy (`argmax`) when `params.temperature == 0`;
# otherwise divide by the temperature, apply top-k then top-p, and draw one
# token per row from the softmax with `torch.multinomial(..., generator=generator)`
# (the generator makes a seeded request reproducible). Return a `(B,)` tensor.

# %%
def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    ### BEGIN SOLUTION
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    ### END SOLUTION


# %% tags=["benchmark"]
# Try it: the next token after our prompt, a few ways.
g = torch.Generator().manual_seed(0)
row = logits[-1:]
for sp in [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5),
           SamplingParams(temperature=0.7, top_p=0.9)]:
    draws = [tokenizer.decode([int(sample_next_token(row, sp, g))]) for _ in range(8)]
    print(f"T={sp.temperature} top_k={sp.top_k} top_p={sp.top_p}: {draws}")

# %% [markdown]
# ## 2. The generation loop, without a cache
#
# Autoregressive generation appends one token at a time. The simplest loop runs
# the model on the **whole** sequence every step and keeps only the last row of
# logits. Write it (greedy). minisys's model takes a flat batch of token ids,
# their positions and `AttentionMetadata`; for one sequence with no cache,
# `model.forward_sequence(ids)` does all of that and returns `(T, V)` logits.
#
# Return only the `max_new_tokens` new token ids (a list of ints). Do not stop
# at EOS: this loop has no stop conditions.

# %%
def generate_no_cache(model: LlamaModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ### BEGIN SOLUTION
    seq = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model.forward_sequence(seq)          # (len(seq), V): recomputes everything
        seq.append(int(logits[-1].argmax()))
    return seq[len(prompt_ids):]
    ### END SOLUTION


# %% [markdown]
# ## 3. The generation loop, with a KV cache
#
# Step `t` of the loop above recomputes the keys and values of all `t` earlier
# tokens, which never change: quadratic work for a linear output. A **KV
# cache** keeps them. The first forward (the *prefill*) runs on the whole
# prompt and fills the cache; every later step (a *decode*) feeds only the one
# new token, whose query attends to all cached keys.
#
# Build a `ContiguousKVCache(model.config, max_len, max_batch=1, dtype=model.dtype)`
# large enough for the prompt and the new tokens, then call the model directly:
#
#     meta = AttentionMetadata(seqlens_q=[n_new], context_lens=[n_cached])
#     logits = model(ids, meta.positions(), meta, kv_cache=cache)   # (n_new, V)
#
# where `ids` is a `torch.long` tensor of the `n_new` tokens fed this step and
# `n_cached` the number of tokens already in the cache. The tests check that
# you feed the prompt once and then exactly one token per step.

# %%
def generate_with_kv_cache(model: LlamaModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ### BEGIN SOLUTION
    cache = ContiguousKVCache(model.config, len(prompt_ids) + max_new_tokens, 1, dtype=model.dtype)
    feed, n_cached, out = list(prompt_ids), 0, []
    for _ in range(max_new_tokens):
        meta = AttentionMetadata(seqlens_q=[len(feed)], context_lens=[n_cached])
        logits = model(torch.tensor(feed, dtype=torch.long), meta.positions(), meta, kv_cache=cache)
        token = int(logits[-1].argmax())
        out.append(token)
        n_cached += len(feed)
        feed = [token]
    return out
    ### END SOLUTION


# %% tags=["benchmark"]
prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}]))
answer = generate_with_kv_cache(model, prompt_ids, 12)
print(repr(tokenizer.decode(answer)))
assert answer == generate_no_cache(model, prompt_ids, 12), "the two loops should agree token for token"

# %% [markdown]
# ## 4. Benchmark: what the cache buys
#
# Time both loops on the real model as the sequence grows. Without a cache,
# step `t` costs a forward over `t` tokens, so tokens/s falls as the sequence
# grows; with a cache each step costs about the same (until attention over a
# long cache starts to matter). `MINISYS_QUICK=1` (CI, the grader) uses short
# lengths; unset it for the full sweep. The same measurement, with the
# reference loops, is `python -m minisys bench kv-cache`.

# %% tags=["benchmark"]
import os
import time

import matplotlib.pyplot as plt

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
lengths = [32, 64, 128] if quick else [64, 128, 256, 512, 1024]
start_ids = tokenizer.encode("Once upon a time")
generate_with_kv_cache(model, start_ids, 4)      # warm-up
rows = []
for total in lengths:
    n = total - len(start_ids)
    timings = {}
    for name, fn in [("cache", generate_with_kv_cache), ("no cache", generate_no_cache)]:
        t = time.perf_counter()
        fn(model, start_ids, n)
        timings[name] = n / (time.perf_counter() - t)
    rows.append((total, timings["cache"], timings["no cache"]))
    print(f"length {total:5d}: {timings['cache']:6.1f} tok/s with cache, "
          f"{timings['no cache']:6.1f} without  ({timings['cache'] / timings['no cache']:.2f}x)")

# %% tags=["benchmark"]
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="with KV cache")
ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label="no cache")
ax.set_xscale("log", base=2)
ax.set_xlabel("total sequence length (tokens)")
ax.set_ylabel("decode tokens / s")
ax.set_title("Lab 01: generation speed with and without a KV cache")
ax.legend()
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab01_kv_cache.png", dpi=120)
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/
