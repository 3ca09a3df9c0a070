"""Lesson 16, compound AI: embeddings (vs transformers), the vector index (vs numpy brute force),
the course corpus, retrieval-augmented generation and its document KV reuse (vs recomputing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minisys.rag.embed import embed_token_ids, mean_pool

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

TEXTS = ["The prefix cache reuses full KV blocks of a shared prompt prefix.",
         "Paris is the capital of France.", "x", "Continuous batching admits new requests every step."]


def _hf_embedding(hf_model, ids: list[int]) -> torch.Tensor:
    """The oracle: transformers' LlamaModel last_hidden_state (after the final norm), mean, L2-normalised."""
    with torch.no_grad():
        h = hf_model.model(torch.tensor([ids])).last_hidden_state[0]         # (T, C)
    return torch.nn.functional.normalize(h.float().mean(0), dim=-1)


def test_embeddings_are_transformers_mean_pooled_last_hidden_state(smol, hf_smol):
    model, tok = smol
    ids = [tok.encode(t) for t in TEXTS]
    ours = embed_token_ids(model, ids)                                       # one packed forward
    assert ours.shape == (len(TEXTS), model.config.hidden_size)
    for i, x in enumerate(ids):
        torch.testing.assert_close(ours[i], _hf_embedding(hf_smol[0], x), atol=1e-4, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_packing_never_mixes_texts(smol):
    model, tok = smol
    ids = [tok.encode(t) for t in TEXTS]
    together = embed_token_ids(model, ids)
    apart = embed_token_ids(model, ids, max_tokens_per_forward=1)            # one text per forward
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)


def test_mean_pool_is_a_per_segment_mean():
    h = torch.arange(12, dtype=torch.float32).view(6, 2)
    got = mean_pool(h, [1, 2, 3], normalize=False)
    want = torch.stack([h[:1].mean(0), h[1:3].mean(0), h[3:].mean(0)])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="at least one token"):
        mean_pool(h, [6, 0])


# ---------------------------------------------------------------- the vector index
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng, n: int, d: int = 32, centers: int = 20) -> np.ndarray:
    """Unit vectors around random centres: the structure IVF's k-means cells exploit (uniform random
    vectors have none, and IVF's recall on them says little)."""
    c = rng.standard_normal((centers, d))
    return _unit(c[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, d)))


def _check_same_neighbours(scores, ids, X, Q, tol: float = 1e-5) -> None:
    """Agreement with brute force over the whole collection: the same scores in the same order and the
    same ids; where scores tie (within float rounding) the index may order the tied ids differently,
    and a tie group cut by k may hold any of the tied ids, so those are compared as sets."""
    from minisys.rag.index import search_naive
    k = ids.shape[1]
    all_scores, all_ids = search_naive(X, Q, len(X))                         # every vector, ranked
    np.testing.assert_allclose(scores, all_scores[:, :k], atol=tol, rtol=0)
    for q in range(len(Q)):
        j = 0
        while j < k:
            end = j + 1
            while end < len(X) and abs(all_scores[q, end] - all_scores[q, j]) <= tol:
                end += 1
            assert set(ids[q, j:min(end, k)]) <= set(all_ids[q, j:end]), (q, j, ids[q], all_ids[q, :k])
            j = end


def test_flat_index_returns_the_brute_force_neighbours():
    from minisys.rag.index import IndexConfig, VectorIndex, search_naive
    rng = np.random.default_rng(0)
    X, Q = _unit(rng.standard_normal((1000, 48))), _unit(rng.standard_normal((40, 48)))
    index = VectorIndex.build(X, IndexConfig(kind="flat"))
    for k in (1, 7, 50):
        scores, ids = index.search(Q, k)
        want_scores, want_ids = search_naive(X, Q, k)
        assert ids.shape == (40, k) and np.all(np.diff(scores, axis=1) <= 1e-6)
        np.testing.assert_array_equal(ids, want_ids)          # random vectors: no ties, so ids in order
        _check_same_neighbours(scores, ids, X, Q)


def test_flat_index_with_ties_and_k_beyond_the_collection():
    from minisys.rag.index import IndexConfig, VectorIndex, search_naive
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal((5, 16)))
    X = np.concatenate([base, base, base[:2]])                # duplicates: exact ties
    Q = np.concatenate([base[:3], _unit(rng.standard_normal((3, 16)))])
    index = VectorIndex.build(X, IndexConfig(kind="flat"))
    scores, ids = index.search(Q, 5)
    _check_same_neighbours(scores, ids, X, Q)
    scores, ids = index.search(Q[:1], 20)                     # k > N: the tail is (-inf, -1), as faiss
    want_scores, want_ids = search_naive(X, Q[:1], 20)
    assert (ids[0, 12:] == -1).all() and (want_ids[0, 12:] == -1).all()
    assert np.isneginf(scores[0, 12:]).all() and np.isneginf(want_scores[0, 12:]).all()
    _check_same_neighbours(scores[:, :12], ids[:, :12], X, Q[:1])


@pytest.mark.parametrize("kind,config,min_recall", [
    ("ivf", {"nprobe": 8}, 0.95),          # measured 0.974-0.988 over seeds 0-3 (nlist 45); nprobe 1: 0.78
    ("hnsw", {"ef_search": 128}, 0.9),     # measured 0.922-0.986 over seeds 0-3; ef_search 64: 0.80-0.92
])
def test_approximate_indexes_recall_against_brute_force(kind, config, min_recall):
    from minisys.rag.index import IndexConfig, VectorIndex, recall_at_k, search_naive
    rng = np.random.default_rng(2)
    X, Q = _clustered(rng, 2000), _clustered(rng, 50)
    _, truth = search_naive(X, Q, 10)
    _, ids = VectorIndex.build(X, IndexConfig(kind=kind, **config)).search(Q, 10)
    assert recall_at_k(ids, truth) >= min_recall


def test_ivf_scanning_every_cell_is_exact():
    from minisys.rag.index import IndexConfig, VectorIndex, search_naive
    rng = np.random.default_rng(3)
    X, Q = _clustered(rng, 800), _clustered(rng, 20)
    index = VectorIndex.build(X, IndexConfig(kind="ivf", nlist=16, nprobe=16))
    _check_same_neighbours(*index.search(Q, 5), X, Q)


def test_index_refuses_bad_input():
    from minisys.rag.index import IndexConfig, VectorIndex
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(kind="ivf", nprobe=0)
    index = VectorIndex.build(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((1, 4)), 0)


# ---------------------------------------------------------------- the course corpus and the RAG prompt
def test_corpus_passages_cover_the_files_under_their_headings(tmp_path):
    from minisys.rag.corpus import build_corpus, load_passages, save_passages, split_markdown
    text = ("intro words here\n\n# Alpha\n\none two three. four five six.\n\n```\n# not a heading\n\ncode\n```\n\n"
            "## Beta\n\n" + " ".join(f"w{i}." for i in range(25)))
    ps = split_markdown(text, "x.md", max_words=10)
    assert [p.heading for p in ps][:2] == ["", "Alpha"] and {p.heading for p in ps} == {"", "Alpha", "Beta"}
    assert all(len(p.text.split()) <= 10 for p in ps)
    assert any("# not a heading\n\ncode" in p.text for p in ps)              # a fence is kept whole
    body = [ln for ln in text.splitlines() if ln not in ("# Alpha", "## Beta")]    # the two real headings
    assert [w for p in ps for w in p.text.split()] == " ".join(body).split()     # every word once, in order
    (tmp_path / "a.md").write_text(text)
    (tmp_path / "b.md").write_text("# B\n\nlast words")
    corpus = build_corpus(tmp_path, ["a.md", "b.md"], max_words=10)
    assert [p.id for p in corpus] == list(range(len(corpus))) and corpus[-1].source == "b.md"
    save_passages(corpus, tmp_path / "p.jsonl")
    assert load_passages(tmp_path / "p.jsonl") == corpus


def test_rag_prompt_is_canonical_and_block_aligned(smol):
    from minisys.rag.corpus import Passage
    from minisys.rag.prompt import build_rag_prompt
    _, tok = smol
    ps = [Passage(i, "lessons/x.md", f"h{i}", f"passage number {i} says something {'long ' * i}") for i in range(4)]
    a = build_rag_prompt(tok, "why?", [ps[3], ps[1]], block_size=16)
    b = build_rag_prompt(tok, "why?", [ps[1], ps[3]], block_size=16)
    assert a == b and a.passage_ids == [1, 3]
    assert all(e % 16 == 0 for e in a.segment_ends)
    c = build_rag_prompt(tok, "how?", [ps[1], ps[2]], block_size=16)    # shares head + passage 1
    assert c.token_ids[:a.segment_ends[1]] == a.token_ids[:a.segment_ends[1]]
    assert c.token_ids[a.segment_ends[1]:a.segment_ends[2]] != a.token_ids[a.segment_ends[1]:a.segment_ends[2]]
    text = tok.decode(a.token_ids)
    assert text.index("h1") < text.index("h3") < text.index("why?")
    raw = build_rag_prompt(tok, "why?", [ps[3], ps[1]], canonical=False, align=False)
    assert raw.passage_ids == [3, 1] and len(raw.token_ids) < len(a.token_ids)
    popular = build_rag_prompt(tok, "why?", [ps[1], ps[3], ps[1]], order_key=lambda p: (-{3: 5}.get(p.id, 0), p.id))
    assert popular.passage_ids == [3, 1]                                   # the most retrieved first, no duplicates


# ---------------------------------------------------------------- document KV reuse
def _lcp_blocks(a: list[int], b: list[int], block_size: int) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // block_size


def test_document_kv_reuse_gives_the_same_greedy_answers_and_prefills_less(tiny_dirs):
    """A query stream where passage 0 is popular, on an engine with the prefix cache and one without
    (the tiny random model: its flat logits make near-ties, and so any KV difference, likelier to show).
    The oracle for the saving: for each prompt, the full blocks of its longest common prefix with any
    earlier prompt (at least one token left to compute), counted from the token lists alone."""
    from minisys.engine.config import EngineConfig
    from minisys.engine.llm_engine import LLMEngine
    from minisys.engine.sampling_params import SamplingParams
    from minisys.model import load
    from minisys.rag.corpus import Passage
    from minisys.rag.prompt import build_rag_prompt
    model, tok = load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, quiet=True)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    ps = [Passage(i, "x.md", f"s{i}", f"the {'quick brown' if i % 2 else 'lazy'} fox {i} jumps") for i in range(5)]
    stream = [(0, 2), (2, 0), (0, 3), (1, 4), (0, 2), (0, 1)]
    prompts = [build_rag_prompt(tok, f"q{i}?", [ps[j] for j in ids]).token_ids for i, ids in enumerate(stream)]
    sp = SamplingParams(temperature=0, max_tokens=8)
    answers, prefilled = {}, {}
    for cache in (False, True):
        engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=128, max_num_seqs=2, enable_prefix_caching=cache))
        answers[cache] = []
        for i, ids in enumerate(prompts):                                   # one at a time: a query stream
            engine.add_request(str(i), ids, sp)
            while engine.has_unfinished():
                answers[cache] += [out.outputs[0].token_ids for out in engine.step() if out.finished]
        prefilled[cache] = engine.stats.prefill_tokens
    assert answers[True] == answers[False]                                  # token for token
    bs = 16
    reused = sum(min(max((_lcp_blocks(p, q, bs) for q in prompts[:i]), default=0), (len(p) - 1) // bs) * bs
                 for i, p in enumerate(prompts))
    assert prefilled[False] == sum(map(len, prompts))
    assert prefilled[True] == prefilled[False] - reused
    assert reused >= 4 * (len(prompts[0]) - len(prompts[0]) % bs) // 3    # most of every repeat's passages


def test_real_model_document_kv_reuse_gives_the_same_greedy_tokens(smol):
    """The same, on SmolLM2 (one repeat of a short prompt; the bench runs a longer stream)."""
    from minisys.engine.config import EngineConfig
    from minisys.engine.llm_engine import LLMEngine
    from minisys.engine.sampling_params import SamplingParams
    from minisys.rag.corpus import Passage
    from minisys.rag.prompt import build_rag_prompt
    model, tok = smol
    ps = [Passage(0, "lessons/03-paged-kv.md", "blocks", "A block holds the K and V of 16 tokens."),
          Passage(1, "lessons/03-paged-kv.md", "sharing", "Full blocks of a shared prefix are reused.")]
    prompts = [build_rag_prompt(tok, q, ps, system="Answer briefly.").token_ids
               for q in ("How many tokens in a block?", "What is reused?")]
    out = {}
    for cache in (False, True):
        engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=32, max_num_seqs=1, enable_prefix_caching=cache))
        out[cache] = []
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=4))
            while engine.has_unfinished():
                out[cache] += [o.outputs[0].token_ids for o in engine.step() if o.finished]
        out[cache].append(engine.stats.prefill_tokens)
    assert out[True][:2] == out[False][:2]
    shared = _lcp_blocks(*prompts, 16) * 16
    assert shared >= 48 and out[True][2] == out[False][2] - shared


# ---------------------------------------------------------------- python -m minisys rag
def _llm_over(model, tok):
    """An `LLM` over the session's already-loaded model (a second load costs CI time)."""
    from minisys.engine.config import EngineConfig
    from minisys.engine.llm_engine import LLMEngine
    from minisys.llm import LLM
    llm = LLM.__new__(LLM)
    llm.model, llm.tokenizer, llm.engine_kind, llm._next_id, llm.runner = model, tok, "llm", 0, None
    llm.engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, max_num_seqs=2))
    return llm


def test_rag_index_query_ask_on_a_subset_of_the_course(tmp_path, smol, capsys, monkeypatch):
    """Index 6 passages of lesson 03, ask with a sentence that appears in exactly one of them: that passage
    is retrieved first (the nearest by the flat index, checked against brute force), and `rag ask` answers
    from the retrieved passage with the real model."""
    from minisys.rag import cli
    from minisys.rag.corpus import build_corpus
    from minisys.rag.index import search_naive
    model, tok = smol

    llm = _llm_over(model, tok)
    monkeypatch.setattr(cli, "_llm", lambda args: llm)
    common = ["--dir", str(tmp_path / "idx")]
    assert cli.main(["index", *common, "--source", "lessons/03-paged-kv.md", "--max-words", "40",
                     "--limit", "6"]) == 0
    store = cli.RagStore.load(tmp_path / "idx")
    assert len(store.passages) == 6 and store.vectors.shape == (6, model.config.hidden_size)
    sentences = [(s.strip(), p) for p in store.passages for s in p.text.replace("\n", " ").split(". ")
                 if len(s.split()) >= 8 and "`" not in s]
    question, target = max(sentences, key=lambda sp: len(sp[0].split()))   # a long plain sentence, one passage
    assert sum(question in p.text for p in store.passages) == 1
    qv = cli.embed_texts(llm, [question])[0]
    assert store.retrieve(qv, 3)[0][0].id == search_naive(store.vectors, qv[None], 1)[1][0, 0] == target.id
    capsys.readouterr()
    assert cli.main(["query", question, "-k", "2", *common]) == 0
    assert f"1. [" in capsys.readouterr().out.split("\n")[0]
    assert cli.main(["ask", question, "-k", "1", "--max-tokens", "4", *common]) == 0
    out = capsys.readouterr().out
    assert f"#{target.id} " in out.splitlines()[0] and out.splitlines()[2].startswith("answer: ")
    assert len(out.splitlines()[2]) > len("answer: ")
    assert cli.main(["ask", "x", "--model", "other", *common]) == 2                  # built by another model


def test_rag_is_a_minisys_command_and_a_missing_index_is_a_clear_error(tmp_path, capsys):
    from minisys.cli import main
    assert main(["rag", "query", "what?", "--dir", str(tmp_path / "none")]) == 2
    assert "rag index" in capsys.readouterr().err
    assert main(["rag", "ask", "what?", "-k", "0", "--dir", str(tmp_path)]) == 2


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_index_saved_and_loaded_searches_the_same(tmp_path, kind):
    from minisys.rag.index import IndexConfig, VectorIndex
    rng = np.random.default_rng(4)
    X = _clustered(rng, 500)
    config = IndexConfig(kind=kind, nprobe=4, ef_search=32)
    index = VectorIndex.build(X, config)
    index.save(tmp_path / "i.faiss")
    loaded = VectorIndex.load(tmp_path / "i.faiss", config)
    assert loaded.ntotal == 500 and loaded.dim == 32
    for a, b in zip(index.search(X[:20], 5), loaded.search(X[:20], 5)):
        np.testing.assert_array_equal(a, b)
