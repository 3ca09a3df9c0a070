# %% [markdown]
# # Lab 14: Live migration's block-copy rounds
#
# Companion to the "Live migration" section of lesson 14. Llumnix (Sun et al.,
# OSDI 2024) moves a running request to another replica *while it keeps
# decoding*: it copies the request's KV blocks in rounds, and stops the request
# only for a short last round. You will write:
#
# 1. **the round plan** (`plan_copy_round`): given how many tokens have K/V, the
#    block size and how many blocks were already copied, which blocks go in the
#    next round, and whether it is the stop-and-copy;
# 2. **the rounds on a clock** (`simulate_migration`): each round takes time,
#    during which the request decodes and fills more blocks; how long is the
#    request stopped (the downtime), and how long does the whole move take?
#
# minisys runs exactly this plan between two real engines
# (`minisys/cluster/migration.py`, over torch.distributed): the last cell
# compares your plan with the one it uses.
#
#     python -m minisys labs start 14     # once: copies this notebook to work/
#     python -m minisys grade work/14-migration-exercise.ipynb

# %%
import math

# %% [markdown]
# ## 1. Which blocks go in the next round
#
# A request's K/V live in `ceil(num_computed_tokens / block_size)` blocks; the
# first `num_computed_tokens // block_size` are **full**, and a full block never
# changes again, so it can be copied while the request goes on decoding (the
# partial last block is still being written). Blocks `0 .. num_copied_blocks-1`
# went in earlier rounds (always full ones).
#
# The rule: if at most `stop_threshold_blocks` blocks are left to copy (or
# `force_final`), this is the **final** round: the request is stopped and *all*
# remaining blocks go, the partial one included. Otherwise copy every full block
# not copied yet (maybe none, if no block filled since the last round).
#
# Return `(block_indices, final)`: the indices (into the request's block table,
# ascending) and whether the request stops for this round.

# %%
def plan_copy_round(num_computed_tokens: int, block_size: int, num_copied_blocks: int,
                    stop_threshold_blocks: int = 1, force_final: bool = False) -> tuple[list[int], bool]:
    """The next migration round: (block indices to copy, is it the stop-and-copy)."""
    ### BEGIN SOLUTION
    num_full = num_computed_tokens // block_size
    num_blocks = -(-num_computed_tokens // block_size)
    if force_final or num_blocks - num_copied_blocks <= stop_threshold_blocks:
        return list(range(num_copied_blocks, num_blocks)), True
    return list(range(num_copied_blocks, num_full)), False
    ### END SOLUTION


# %% tags=["benchmark"]
print(plan_copy_round(37, 16, 0))      # 2 full blocks, 1 partial: copy the 2 full ones
print(plan_copy_round(40, 16, 2))      # only the partial block left: stop and copy it

# %% [markdown]
# ## 2. The rounds on a clock
#
# Copying `b` blocks takes `b * seconds_per_block`. Meanwhile the request
# decodes one token every `seconds_per_token` (keep the fractional progress:
# after a round of `t` seconds, `num_computed_tokens` has grown by
# `t / seconds_per_token`; plan with its integer part). Run rounds with your
# plan until the final one; round number `max_rounds` is forced final (a
# request decoding faster than the copy would never converge).
#
# Return `(round_blocks, downtime_s, total_s)`: blocks copied per round, the
# final round's duration (the request is stopped only then), and the time from
# the first round's start to the final round's end.

# %%
def simulate_migration(num_computed_tokens: int, block_size: int, seconds_per_block: float,
                       seconds_per_token: float, stop_threshold_blocks: int = 1,
                       max_rounds: int = 8) -> tuple[list[int], float, float]:
    """Llumnix's rounds on a clock: (blocks per round, downtime in s, total time in s)."""
    ### BEGIN SOLUTION
    clock, copied, progress, rounds = 0.0, 0, float(num_computed_tokens), []
    while True:
        blocks, final = plan_copy_round(int(progress), block_size, copied, stop_threshold_blocks,
                                        force_final=len(rounds) + 1 >= max_rounds)
        took = len(blocks) * seconds_per_block
        rounds.append(len(blocks))
        if final:
            return rounds, took, clock + took
        clock += took
        copied += len(blocks)
        progress += took / seconds_per_token
    ### END SOLUTION


# %% tags=["benchmark"]
# SmolLM2 on this machine: ~46 KB of fp32 K/V per token, 16 tokens a block, a transport of ~0.5 GB/s
# (lesson 14's measurement) -> ~1.5 ms a block; decoding ~30 ms a token.
per_block = 16 * 46_080 / 0.5e9
for tokens in (256, 2048, 16384):
    rounds, down, total = simulate_migration(tokens, 16, per_block, 0.030)
    _, stop_all, _ = simulate_migration(tokens, 16, per_block, 0.030, stop_threshold_blocks=math.inf)
    print(f"{tokens:>6} tokens: rounds {rounds}, downtime {down * 1000:.1f} ms "
          f"(stop-and-copy of everything: {stop_all * 1000:.1f} ms), total {total * 1000:.1f} ms")

# %% tags=["benchmark"]
from minisys.cluster.migration import plan_copy_round as minisys_plan

same = all(plan_copy_round(c, 4, k, t) == (minisys_plan(c, 4, k, t).block_indices, minisys_plan(c, 4, k, t).final)
           for c in range(1, 40) for k in range(c // 4 + 1) for t in (1, 2))
print("your plan is minisys's plan:", same)
