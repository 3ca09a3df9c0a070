"""Hostile input and long runs (issue: no 500s, fuzzing, slow clients, graceful shutdown, flat memory).

One live `python -m minisys serve` on the tiny random chat checkpoint serves the module (text
battery, schemathesis, stalled clients, soak); the SIGTERM test starts a server of its own, since it
kills it. Oracles: the status codes and fields the API promises (400 naming the field, never 5xx),
the OpenAPI document itself (schemathesis checks responses against it), the engine's KV counters
from /metrics (idle = nothing queued, every block free), the process's exit code and wall clock.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from minisys.bench.server_process import wait_healthy
from minisys.server.metrics import parse_metrics

from test_server_robust import TEMPLATE, launch, port_of, stop

pytestmark = pytest.mark.timeout(300)
KEY = "hostile-key-91c2"
H = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def chat_dir(tiny_dirs, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile") / "tiny-chat"
    shutil.copytree(tiny_dirs["llama"], d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))
    return d


@pytest.fixture(scope="module")
def live(chat_dir, tmp_path_factory):
    """(base URL, log path) of one server for the module: tiny chat model, the key from the env."""
    log = tmp_path_factory.mktemp("hostile-live") / "server.log"
    proc = launch(["--model", str(chat_dir), "--max-num-seqs", "16"], log, env={"MINISYS_API_KEY": KEY})
    url = f"http://127.0.0.1:{port_of(proc)}"
    try:
        wait_healthy(url, proc, 120.0, log)
    except TimeoutError:
        proc.kill()
        raise
    yield url, log
    stop(proc)


def idle(url: str, timeout: float = 10.0) -> bool:
    """True once nothing is in the engine and every KV block is free (within ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = parse_metrics(httpx.get(url + "/metrics", headers=H, timeout=10).text)
        if m["minisys:num_requests_in_engine"] == 0 and m["minisys:kv_blocks_free"] == m["minisys:kv_blocks_total"]:
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------ text that is not text
# Raw bodies: JSON may spell a lone surrogate ("\ud800"), Python's json gives a str UTF-8 cannot encode.
UNENCODABLE = {
    "prompt": ("/v1/completions", r'{"prompt": "a\ud800b"}', "prompt", "prompt"),
    "prompt in a list": ("/v1/completions", r'{"prompt": ["ok", "x\udfff"]}', "prompt", "prompt.1"),
    "stop string": ("/v1/completions", r'{"prompt": "hi", "stop": ["\ud800"]}', "stop", "stop.0"),
    "stop as one string": ("/v1/completions", r'{"prompt": "hi", "stop": "\uDBFF"}', "stop", "stop"),
    "model": ("/v1/completions", r'{"prompt": "hi", "model": "\ud800"}', "model", "model"),
    "user": ("/v1/completions", r'{"prompt": "hi", "user": "\udc00"}', "user", "user"),
    "chat content": ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}',
                     "messages", "messages.0.content"),
    "chat content part": ("/v1/chat/completions",
                          r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
                          "messages", "messages.0.content.0.text"),
    "chat model": ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "model": "\ud800"}',
                   "model", "model"),
}


@pytest.mark.parametrize("case", list(UNENCODABLE))
def test_unencodable_text_is_400_naming_the_field(live, case):
    url, _ = live
    path, body, param, where = UNENCODABLE[case]
    r = httpx.post(url + path, content=body.encode(), headers=H, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(where + ": ") and "surrogate" in err["message"]


def test_paired_surrogates_are_text_and_deep_nesting_is_400(live):
    url, _ = live
    r = httpx.post(url + "/v1/completions", content=rb'{"prompt": "\ud83d\ude00 hi", "max_tokens": 2}',
                   headers=H, timeout=30)
    assert r.status_code == 200, r.text                     # an escaped emoji is a valid pair
    r = httpx.post(url + "/v1/completions", content=b"[" * 100_000 + b"]" * 100_000, headers=H, timeout=30)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert idle(url)


def test_llm_generate_refuses_unencodable_text_with_a_value_error(tiny_dirs):
    from minisys.engine.sampling_params import SamplingParams
    from minisys.llm import LLM

    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True)
    sp = SamplingParams(max_tokens=2)
    for prompt in ["a\ud800", {"prompt": "\udfff"}]:
        with pytest.raises(ValueError, match=r"^prompt is not valid text: a lone surrogate"):
            llm.generate(prompt, sp, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^stop is not valid text"):
        SamplingParams(stop=["ok", "\ud800"])
    assert not llm.engine.has_unfinished()
    assert llm.generate("the quick", sp, use_tqdm=False)[0].outputs[0].token_ids   # still serving
