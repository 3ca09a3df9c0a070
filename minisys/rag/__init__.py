"""Compound AI, part 1 (lesson 16): embeddings, a vector index, retrieval-augmented generation.

    embed.py   text -> vector from the served model (mean-pooled final hidden states)
    index.py   a faiss vector index (flat, IVF, HNSW) with numpy brute force beside it
    corpus.py  the course's own text split into passages
    prompt.py  retrieved passages in a canonical order, so their KV blocks are reused
    cli.py     python -m minisys rag index | query | ask
"""
