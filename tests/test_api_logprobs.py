"""Logprobs on the OpenAI routes, through the `openai` client (in-process app, tiny random model).

Oracle: ``torch.log_softmax`` of the model's naive whole-sequence forward (`forward_sequence`),
greedy, so each token is that row's argmax. Completions: ``logprobs: k`` (+ ``echo``) in the
legacy shape; chat: ``logprobs: true, top_logprobs: k``; streamed chunks add up to the body.
"""
from __future__ import annotations

import pytest
import torch

from minisys.engine.config import EngineConfig

openai = pytest.importorskip("openai")

KEY = "sk-lp"
ATOL = 1e-4
N = 3


@pytest.fixture(scope="module")
def env(tiny_dirs):
    from fastapi.testclient import TestClient

    from minisys.llm import LLM
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=64, max_num_seqs=4))
    llm.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with TestClient(build_app(AsyncLLMEngine(llm.engine), llm.tokenizer, "tiny", api_key=KEY)) as c:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0), c, llm


def _oracle(llm, prompt_ids, n):
    """Greedy continuation and the log_softmax rows of the naive forward over prompt + continuation."""
    model = llm.engine.model
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.forward_sequence(ids)[-1].argmax()))
        lp = torch.log_softmax(model.forward_sequence(ids).float(), dim=-1)
    return ids[len(prompt_ids):], lp


def _text(tok, t):
    return tok.decode([t], skip_special_tokens=False)


def _check_completion(lps, tok, ids, lp, first, k):
    """lps: the legacy shape for tokens ids[first:] (scored by lp rows first-1, ...)."""
    offset = 0
    for j, (t, text, v, top, off) in enumerate(zip(ids[first:], lps.tokens, lps.token_logprobs, lps.top_logprobs,
                                                    lps.text_offset), start=first):
        assert text == _text(tok, t) and off == offset
        offset += len(text)
        if j == 0:
            assert v is None and top is None
            continue
        assert abs(v - lp[j - 1, t].item()) < ATOL
        top_v, top_i = lp[j - 1].topk(k)
        cands = [(_text(tok, i), x) for i, x in zip(top_i.tolist(), top_v.tolist())] + [(text, lp[j - 1, t].item())]
        assert top.keys() == {s for s, _ in cands}          # keyed by text: tokens of equal text share a key
        assert all(any(s == cs and abs(x - cx) < ATOL for cs, cx in cands) for s, x in top.items())
    assert len(lps.tokens) == len(ids) - first


@pytest.mark.parametrize("echo", [False, True])
def test_completions_logprobs_and_echo(env, echo):
    client, _, llm = env
    tok = llm.tokenizer
    prompt = "the cat"
    pids = tok.encode(prompt)
    out_ids, lp = _oracle(llm, pids, N)
    kw = dict(model="tiny", prompt=prompt, max_tokens=N, temperature=0, logprobs=2, echo=echo,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    ch = r.choices[0]
    ids = pids + out_ids if echo else out_ids
    assert ch.text.startswith(prompt) == echo
    _check_completion(ch.logprobs, tok, pids + out_ids, lp, 0 if echo else len(pids), 2)
    assert len(ch.logprobs.tokens) == len(ids)
    chunks = list(client.completions.create(**kw, stream=True))      # streamed: the same, chunk by chunk
    got = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in got) == ch.text
    assert sum((c.logprobs.tokens for c in got if c.logprobs), []) == ch.logprobs.tokens
    assert sum((c.logprobs.token_logprobs for c in got if c.logprobs), []) == ch.logprobs.token_logprobs
    assert sum((c.logprobs.text_offset for c in got if c.logprobs), []) == ch.logprobs.text_offset


def test_chat_logprobs_top_logprobs(env):
    client, _, llm = env
    tok = llm.tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    pids = tok.encode(tok.apply_chat_template(msgs))
    out_ids, lp = _oracle(llm, pids, N)
    kw = dict(model="tiny", messages=msgs, max_tokens=N, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == N
    for m, (t, c) in enumerate(zip(out_ids, content)):
        row = lp[len(pids) - 1 + m]
        assert c.token == _text(tok, t) and c.bytes == list(c.token.encode("utf-8"))
        assert abs(c.logprob - row[t].item()) < ATOL and abs(c.logprob - row.max().item()) < ATOL   # greedy
        top_v, top_i = row.topk(2)
        assert [x.token for x in c.top_logprobs] == [_text(tok, i) for i in top_i.tolist()]
        assert all(abs(x.logprob - v) < ATOL for x, v in zip(c.top_logprobs, top_v.tolist()))
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = sum((c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs), [])
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "the", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "the", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "the", "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprobs_fields_are_a_400_naming_them(env, path, body, param):
    _, c, llm = env
    r = c.post(path, json={**body, "max_tokens": 2}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert not llm.engine.has_unfinished()
