"""`python -m minisys serve`'s engine flags, derived from `EngineConfig`'s fields.

Oracles: configs written out by hand for each command line; the dataclass
itself for the defaults (the flags must add no default of their own); the
list of `EngineConfig` fields for the flags that must exist. No model is
loaded: every refusal happens before one would be.
"""
from __future__ import annotations

import dataclasses

import pytest

from minisys.cli import build_parser
from minisys.engine.config import EngineConfig
from minisys.server import engine_args
from minisys.server.launch import engine_config, serve


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_every_field_is_a_flag_with_its_help():
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(EngineConfig):
        assert engine_args.flag(f.name) in text, f.name
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in " ".join(text.split()), f.name
    assert "--no-enable-chunked-prefill" in text and "--no-enable-prefix-caching" in text


def test_no_flags_give_the_dataclass_defaults():
    cfg = engine_config(parse())
    assert cfg == EngineConfig()
    assert cfg.enable_chunked_prefill is True and cfg.enable_prefix_caching is True   # vLLM V1's defaults
    assert engine_args.given_engine_args(parse("--port", "9000")) == {}


def test_flags_set_exactly_their_fields():
    cfg = engine_config(parse("--max-num-seqs", "8", "--block-size", "4", "--no-enable-chunked-prefill",
                              "--no-enable-prefix-caching", "--kv-cache-bytes", "1000000",
                              "--max-num-batched-tokens", "256", "--speculative-method", "ngram",
                              "--num-speculative-tokens", "3", "--ngram-prompt-lookup-min", "2"))
    assert cfg == EngineConfig(max_num_seqs=8, block_size=4, enable_chunked_prefill=False,
                               enable_prefix_caching=False, kv_cache_bytes=1_000_000, max_num_batched_tokens=256,
                               speculative_method="ngram", num_speculative_tokens=3, ngram_prompt_lookup_min=2)
    assert engine_config(parse("--kv-memory-fraction", "0.25")).kv_memory_fraction == 0.25
    assert engine_config(parse("--enable-chunked-prefill")).enable_chunked_prefill is True


@pytest.mark.parametrize("argv,named", [(["--speculative-method", "medusa"], "--speculative-method"),
                                        (["--max-num-seqs", "many"], "--max-num-seqs"),
                                        (["--no-prefix-caching"], "--no-prefix-caching"),
                                        (["--frobnicate", "1"], "--frobnicate")])
def test_bad_flags_are_refused_by_name(capsys, argv, named):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert named in capsys.readouterr().err


def test_invalid_values_are_refused_by_the_config():
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config(parse("--max-num-seqs", "0"))
    with pytest.raises(ValueError, match="at most one"):
        engine_config(parse("--num-kv-blocks", "8", "--kv-cache-bytes", "100"))


def test_eager_refuses_engine_flags_before_loading_anything(capsys):
    assert engine_config(parse("--engine", "eager")) is None
    with pytest.raises(ValueError, match="--max-num-seqs, --no-enable-chunked-prefill"):
        engine_config(parse("--engine", "eager", "--max-num-seqs", "8", "--no-enable-chunked-prefill"))
    assert serve(parse("--engine", "eager", "--block-size", "8")) == 2
    assert "--block-size" in capsys.readouterr().err
    assert serve(parse("--max-num-seqs", "-1")) == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass
    class Knobs:
        documented: int = dataclasses.field(default=3, metadata={"help": "50% more"})
        silent: int = 1

    documented, silent = dataclasses.fields(Knobs)
    assert engine_args._help(documented) == "50%% more (default: 3)"        # argparse-escaped
    with pytest.raises(ValueError, match="silent"):
        engine_args._help(silent)
