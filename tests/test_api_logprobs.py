"""Logprobs on the OpenAI routes, through the `openai` client (in-process app, tiny random model).

Oracle: ``torch.log_softmax`` of the model's naive whole-sequence forward (`forward_sequence`),
greedy, so each token is that row's argmax. Completions: ``logprobs: k`` (+ ``echo``) in the
legacy shape; chat: ``logprobs: true, top_logprobs: k``; streamed chunks add up to the body.
"""
from __future__ import annotations

import openai
import pytest
import torch


KEY = "sk-lp"
ATOL = 1e-4
N = 3


@pytest.fixture(scope="module")
def env(tiny_app):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with tiny_app(KEY, chat_template=template) as (c, llm):
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


# ------------------------------------------------ vLLM's prompt_logprobs and truncate_prompt_tokens
@pytest.fixture(scope="module")
def hf_tiny(tiny_dirs):
    """The same tiny checkpoint loaded by Hugging Face transformers: the independent oracle."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]), dtype=torch.float32).eval()


def _hf_rows(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)     # (len, V)


def _check_prompt_logprobs(got, ids, lp, k, tok):
    """vLLM's shape: None, then per token {"id": {logprob, rank, decoded_token}} = it + its top k."""
    assert len(got) == len(ids) and got[0] is None
    for j in range(1, len(ids)):
        entry, row, t = got[j], lp[j - 1], ids[j]
        want = row[t].item()
        assert abs(entry[str(t)]["logprob"] - want) < ATOL
        assert int((row > want + ATOL).sum()) + 1 <= entry[str(t)]["rank"] <= int((row > want - ATOL).sum()) + 1
        top_v, top_i = row.topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert set(entry) == {str(i) for i in top_i.tolist()} | {str(t)}
        for r, (i, v) in enumerate(zip(top_i.tolist(), top_v.tolist()), start=1):
            assert abs(entry[str(i)]["logprob"] - v) < ATOL and (i == t or entry[str(i)]["rank"] == r)
        for i, e in entry.items():
            assert e["decoded_token"] == _text(tok, int(i))


def _post(c, path, body):
    return c.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_prompt_logprobs_match_transformers(env, hf_tiny):
    """Completions (two token-id prompts, n=2: each choice carries its prompt's) and chat (top level)."""
    _, c, llm = env
    tok = llm.tokenizer
    prompts = [tok.encode("the quick brown fox"), tok.encode("over the lazy dog the")]
    r = _post(c, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "n": 2, "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4 and all(ch["logprobs"] is None for ch in choices)
    for ch in choices:
        ids = prompts[ch["index"] // 2]
        _check_prompt_logprobs(ch["prompt_logprobs"], ids, _hf_rows(hf_tiny, ids), 3, tok)
    msgs = [{"role": "user", "content": "the lazy fox"}]
    r = _post(c, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    ids = tok.encode(tok.apply_chat_template(msgs))
    _check_prompt_logprobs(r.json()["prompt_logprobs"], ids, _hf_rows(hf_tiny, ids), 0, tok)
    plain = _post(c, "/v1/completions", {"prompt": "the", "max_tokens": 1}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None


def test_echo_logprobs_and_prompt_logprobs_each_keep_their_own_count(env, hf_tiny):
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens=1) beside prompt_logprobs=4."""
    _, c, llm = env
    tok = llm.tokenizer
    ids = tok.encode("the quick brown fox jumps")
    r = _post(c, "/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
                                     "logprobs": 1, "prompt_logprobs": 4})
    ch = r.json()["choices"][0]
    lp = _hf_rows(hf_tiny, ids)
    _check_prompt_logprobs(ch["prompt_logprobs"], ids, lp, 4, tok)
    legacy = ch["logprobs"]
    assert legacy["token_logprobs"][0] is None and len(legacy["token_logprobs"]) == len(ids) + 1
    for j in range(1, len(ids)):
        assert abs(legacy["token_logprobs"][j] - lp[j - 1, ids[j]].item()) < ATOL
        assert 1 <= len(legacy["top_logprobs"][j]) <= 2                   # the token + its top 1
        assert abs(max(legacy["top_logprobs"][j].values()) - lp[j - 1].max().item()) < ATOL


def test_truncate_prompt_tokens_keeps_the_last_k(env, hf_tiny):
    _, c, llm = env
    tok = llm.tokenizer
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    body = {"prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 2, "temperature": 0,
            "echo": True, "prompt_logprobs": 0, "truncate_prompt_tokens": 4, "ignore_eos": True}
    r = _post(c, "/v1/completions", body).json()
    kept = ids[-4:]
    assert r["usage"]["prompt_tokens"] == 4
    ch = r["choices"][0]
    _check_prompt_logprobs(ch["prompt_logprobs"], kept, _hf_rows(hf_tiny, kept), 0, tok)
    out_ids, _ = _oracle(llm, kept, 2)
    assert ch["text"] == tok.decode(kept) + tok.decode(out_ids)
    longer = _post(c, "/v1/completions", {**body, "truncate_prompt_tokens": len(ids)}).json()
    assert longer["usage"]["prompt_tokens"] == len(ids)                  # k >= the prompt: nothing cut
    # -1: as many as fit beside max_tokens (a prompt too long for the context otherwise)
    n_ctx = llm.engine.config.max_model_len
    long_ids = (ids * (n_ctx // len(ids) + 2))[:n_ctx + 5]
    too_long = _post(c, "/v1/completions", {"prompt": long_ids, "max_tokens": 3})
    assert too_long.status_code == 400, too_long.text
    fit = _post(c, "/v1/completions", {"prompt": long_ids, "max_tokens": 3, "truncate_prompt_tokens": -1})
    assert fit.status_code == 200, fit.text
    assert fit.json()["usage"]["prompt_tokens"] == n_ctx - 3
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    chat = _post(c, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "truncate_prompt_tokens": 3,
                                             "prompt_logprobs": 0}).json()
    cids = tok.encode(tok.apply_chat_template(msgs))[-3:]
    assert chat["usage"]["prompt_tokens"] == 3
    _check_prompt_logprobs(chat["prompt_logprobs"], cids, _hf_rows(hf_tiny, cids), 0, tok)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "the", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "the", "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "the", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1,
                              "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "the", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "the", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "the", "truncate_prompt_tokens": 10 ** 6}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": 10 ** 6},
     "truncate_prompt_tokens"),
])
def test_bad_prompt_logprobs_and_truncation_are_a_400_naming_them(env, path, body, param):
    _, c, llm = env
    r = _post(c, path, {**body, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert not llm.engine.has_unfinished()
