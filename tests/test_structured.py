"""Structured outputs (`minisys.structured`) in the sampler, the engine and the eager baseline.

Oracles: the token masks against sets computed naively from the vocabulary
(a choice: tokens whose text keeps the output a prefix of some choice; a
regex: tokens whose text fully matches the regex's prefix language, by
Python's ``re``); `apply_token_mask` against a Python loop; every generated
output against ``jsonschema`` (the schema's own validator) or ``re.fullmatch``;
unconstrained rows against a run without the constrained ones.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from minisys.engine.config import EngineConfig
from minisys.engine.eager import EagerGenerator
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams
from minisys.structured import (GrammarCompiler, StructuredOutputsParams, allowed_token_ids, apply_token_mask,
                                fill_bitmasks)

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False}
INVENTORY = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 4},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                         "color": {"enum": ["red", "green", "blue"]}},
        "required": ["sku", "qty", "color"], "additionalProperties": False}},
    "in_stock": {"type": "boolean"}}, "required": ["items", "in_stock"], "additionalProperties": False}
SMALL = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "ok": {"type": "boolean"}, "tag": {"enum": ["x", "y"]}},
         "required": ["id", "ok", "tag"], "additionalProperties": False}
SCHEMAS = {"person": PERSON, "inventory": INVENTORY, "small": SMALL}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICE = ["yes", "no", "maybe later"]
MAX_TOKENS = 90


def _prompt(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def _run(engine: LLMEngine, reqs) -> dict:
    for rid, ids, sp in reqs:
        engine.add_request(rid, ids, sp)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks, "KV blocks leaked"
    return done


def _check(kind: str, text: str) -> None:
    """The output is what the constraint promises (independent validators)."""
    if kind in SCHEMAS:
        jsonschema.validate(json.loads(text), SCHEMAS[kind])
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICE, text
    elif kind == "object":
        assert isinstance(json.loads(text), dict), text


def _spec(kind: str) -> StructuredOutputsParams:
    if kind in SCHEMAS:
        return StructuredOutputsParams(json=SCHEMAS[kind])
    return {"regex": StructuredOutputsParams(regex=REGEX), "choice": StructuredOutputsParams(choice=CHOICE),
            "object": StructuredOutputsParams(json_object=True)}[kind]


# ------------------------------------------------------------------ masks against naive oracles
@pytest.fixture(scope="module")
def compiler(smol):
    _, tok = smol
    return GrammarCompiler.for_tokenizer(tok, tok.vocab_size), tok


def _texts(tok) -> list[str]:
    return [tok.decode([t], skip_special_tokens=False) for t in range(tok.vocab_size)]


def test_choice_mask_is_the_set_of_prefix_consistent_tokens(compiler):
    """Where the grammar leaves a real choice, the mask is exactly the tokens whose text keeps the output a
    prefix of some choice (+ EOS where the output is a whole choice). Where the rest is forced, llguidance
    allows only the canonical tokenization of the forced text: a non-empty subset."""
    comp, tok = compiler
    texts, eos = _texts(tok), set(tok.eos_token_ids)
    choices = ["maybe", "maybe not", "may I", "yes"]
    m = comp.matcher(StructuredOutputsParams(choice=choices))
    out = ""
    for t in tok.encode("maybe not") + [None]:
        got = set(allowed_token_ids(fill_bitmasks([m])[0], tok.vocab_size))
        want = {t for t, s in enumerate(texts) if s and t not in eos and "\ufffd" not in s
                and any(c.startswith(out + s) for c in choices)}
        if out in choices:
            want |= eos
        if len(want) > 1 and len([c for c in choices if c.startswith(out)]) > 1:
            assert got == want, (out, sorted(got ^ want)[:10])
        else:
            assert got and got <= want, out
        if t is None:
            break
        assert m.accept(t)
        out += texts[t]
    assert out == "maybe not" and m.is_terminated


def test_regex_mask_matches_python_re_on_every_token(compiler):
    comp, tok = compiler
    texts = _texts(tok)
    m = comp.matcher(StructuredOutputsParams(regex="[0-9]{2}-[a-z]+"))
    prefix_ok = re.compile(r"[0-9]{1,2}|[0-9]{2}-[a-z]*")       # the prefixes of [0-9]{2}-[a-z]+
    got = set(allowed_token_ids(fill_bitmasks([m])[0], tok.vocab_size))
    assert got == {t for t, s in enumerate(texts) if s and prefix_ok.fullmatch(s)}
    for t in tok.encode("42-"):
        assert m.accept(t)
    got = set(allowed_token_ids(fill_bitmasks([m])[0], tok.vocab_size))
    assert got == {t for t, s in enumerate(texts) if s and re.fullmatch("[a-z]+", s)}
    assert not m.is_accepting


def test_apply_token_mask_equals_a_python_loop():
    g = torch.Generator().manual_seed(0)
    for V, W in ((100, 4), (70, 2), (64, 2)):        # V not a multiple of 32; V wider than the words cover
        logits = torch.randn(5, V, generator=g)
        bits = torch.randint(-2**31, 2**31 - 1, (3, W), generator=g, dtype=torch.int64).to(torch.int32)
        rows = [4, 0, 2]
        got = apply_token_mask(logits, rows, bits)
        want = logits.clone()
        for j, r in enumerate(rows):
            ok = set(allowed_token_ids(bits[j], V))
            for t in range(V):
                if t not in ok:
                    want[r, t] = float("-inf")
        assert torch.equal(got, want)
        assert not torch.equal(got, logits) and torch.isfinite(logits).all()     # the input is untouched


def test_compile_cache_and_errors_naming_the_field(compiler):
    comp, _ = compiler
    before = comp.compiles
    a = comp.matcher(StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    b = comp.matcher(StructuredOutputsParams(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}'))
    assert comp.compiles == before + 1 and a.llmatcher is not b.llmatcher       # one compile, two matchers
    for spec, name in ((StructuredOutputsParams(json={"type": "frob"}), "structured_outputs.json"),
                       (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
                       (StructuredOutputsParams(grammar="start: ("), "structured_outputs.grammar"),
                       (StructuredOutputsParams(json={"type": "frob"}, origin="response_format.json_schema.schema"),
                        "response_format.json_schema.schema")):
        with pytest.raises(ValueError, match=re.escape(name)):
            comp.compile(spec)
    for kw, name in (({}, "exactly one"), ({"json": {}, "regex": "a"}, "exactly one"),
                     ({"json": "{not json"}, "structured_outputs.json"), ({"json": [1]}, "structured_outputs.json"),
                     ({"choice": []}, "structured_outputs.choice"), ({"regex": ""}, "structured_outputs.regex")):
        with pytest.raises(ValueError, match=re.escape(name)):
            StructuredOutputsParams(**kw)


# ------------------------------------------------------------------ the engine
@pytest.mark.slow
def test_engine_battery_valid_greedy_and_sampled_with_unconstrained_rows_unchanged(smol_paged):
    """Every constrained output validates; an unconstrained greedy row batched with them emits exactly
    what it emits alone."""
    model, tok = smol_paged
    p_json = _prompt(tok, "Describe a person or an inventory as JSON.")
    reqs, kinds = [], {}
    for kind in ("person", "inventory", "regex", "choice"):
        for mode in ("greedy", "sampled"):
            sp = SamplingParams(temperature=0 if mode == "greedy" else 0.9, seed=7, max_tokens=MAX_TOKENS,
                                n=2 if (mode == "sampled" and kind == "person") else 1,
                                structured_outputs=_spec(kind))
            reqs.append((f"{kind}-{mode}", p_json, sp))
            kinds[f"{kind}-{mode}"] = kind
    free = ("free", _prompt(tok, "Say hello."), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=16, num_kv_blocks=256))
    done = _run(engine, reqs[:6] + [free] + reqs[6:])
    for rid, kind in kinds.items():
        for c in done[rid].outputs:
            assert c.finish_reason == "stop", (rid, c.text)
            _check(kind, c.text)
    alone = _run(LLMEngine(model, tok, EngineConfig(max_num_seqs=16, num_kv_blocks=256)), [free])
    assert done["free"].outputs[0].token_ids == alone["free"].outputs[0].token_ids
    assert engine.runner.masks.fills > 0
    assert engine.grammars.compiles == 4


@pytest.mark.slow
def test_preemption_keeps_the_matcher_consistent(smol_paged):
    """Recompute after preemption: the same greedy outputs as without memory pressure, all valid."""
    model, tok = smol_paged
    reqs = [(f"r{i}", _prompt(tok, f"JSON for item {i}."),
             SamplingParams(temperature=0, max_tokens=40, structured_outputs=_spec("small"))) for i in range(3)]
    roomy = _run(LLMEngine(model, tok, EngineConfig(max_num_seqs=4, num_kv_blocks=128)), reqs)
    biggest = max(-(-(len(ids) + 40) // 4) for _, ids, _ in reqs)      # blocks of one request at max_tokens
    used = sum(-(-(len(ids) + len(roomy[rid].outputs[0].token_ids)) // 4) for rid, ids, _ in reqs)
    assert used > biggest + 1, "the pool must be too small for all three at once"
    tight = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=biggest + 1, max_num_seqs=4))
    done = _run(tight, reqs)
    assert tight.stats.preemptions > 0
    for rid, _, _ in reqs:
        assert done[rid].outputs[0].token_ids == roomy[rid].outputs[0].token_ids
        _check("small", done[rid].outputs[0].text)


@pytest.mark.slow
def test_eager_baseline_emits_what_the_engine_emits(smol_paged):
    model, tok = smol_paged
    ids = _prompt(tok, "Pick one.")
    for kind in ("choice", "regex"):
        sp = SamplingParams(temperature=0.9, seed=3, max_tokens=20, structured_outputs=_spec(kind))
        eager = EagerGenerator(model, tok).generate(ids, sp)
        engine = _run(LLMEngine(model, tok, EngineConfig(num_kv_blocks=64)), [("x", ids, sp)])["x"].outputs[0]
        assert eager.token_ids == engine.token_ids and eager.finish_reason == "stop"
        _check(kind, eager.text)


def test_refusals_name_the_field(smol_paged):
    model, tok = smol_paged
    spec_engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, speculative_method="ngram"))
    with pytest.raises(ValueError, match="structured_outputs.json .*speculative decoding"):
        spec_engine.add_request("a", [1, 2], SamplingParams(structured_outputs=_spec("person")))
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64))
    with pytest.raises(ValueError, match="structured_outputs.regex is not a valid regular expression"):
        engine.add_request("b", [1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    assert not engine.has_unfinished() and not spec_engine.has_unfinished()
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})
    with pytest.raises(ValueError, match="structured_outputs.regex is not"):
        EagerGenerator(model, tok).check_prompt([1], SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="(")))


@pytest.mark.slow
def test_a_failed_step_with_a_constrained_row_does_not_break_the_next_steps(smol_paged, monkeypatch):
    """A forward that raises while a constrained row is scheduled leaves no mask fill pending: the
    engine serves the next request (a stale fill would fail every later step)."""
    model, tok = smol_paged
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=4, num_kv_blocks=64))
    sp = SamplingParams(temperature=0, max_tokens=8, structured_outputs=_spec("choice"))
    engine.add_request("boom", _prompt(tok, "Pick one."), sp)
    real = engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    monkeypatch.setattr(engine.runner, "forward", real)
    engine.abort("boom")
    done = _run(engine, [("next", _prompt(tok, "Pick one."), sp)])
    _check("choice", done["next"].outputs[0].text)


def test_a_json_string_nested_too_deeply_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="guided_json is nested too deeply|json is nested too deeply"):
        StructuredOutputsParams(json="[" * 100_000 + "]" * 100_000, origin="guided_json")


def test_a_grammar_too_large_to_compile_per_request_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"structured_outputs.choice: \d+ bytes is more than"):
        StructuredOutputsParams(choice=[f"option {i}" for i in range(20_000)])
