"""Tensor parallelism (lesson 13): Megatron's split of the model over ranks, and the processes that run them.

- `shard`: which heads / rows / columns each rank holds; the checkpoint (or one layer's) slice it loads.
- `linear`: column- and row-parallel linear layers, vocab-parallel embedding and LM head.
- `cost`: the bytes the all-reduces send per token (the paper arithmetic; `comm` times the real ones).
- `comm`: the process group (gloo on CPU, nccl on CUDA) and the timed all-reduce.
- `workers`: start, watch and stop worker processes (generic: reused by lesson 14's replicas).

The tensor-parallel model runner (rank 0 broadcasts each step's batch to the workers) is
`minisys.engine.tp_model_runner`: an engine part, above the model that uses this package.
"""
