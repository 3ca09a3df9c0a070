"""Text <-> token ids, and the chat template.

A thin wrapper around a Hugging Face `tokenizers.Tokenizer` (byte-level BPE)
plus the model's jinja2 chat template, both read from a model directory.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


def unencodable_at(text: str) -> int | None:
    """Index of the first character of ``text`` that UTF-8 cannot encode, or None if it is all text.

    A Python ``str`` can hold lone surrogates (U+D800..U+DFFF: JSON's ``"\\ud800"``
    decodes to one); no tokenizer, log or JSON response can encode them.
    Every other code point is encodable.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_text(text: str, what: str) -> None:
    """ValueError naming ``what`` if ``text`` is not a string or not encodable text (`unencodable_at`)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    i = unencodable_at(text)
    if i is not None:
        raise ValueError(f"{what} is not valid text: a lone surrogate U+{ord(text[i]):04X} at character {i} "
                         f"(UTF-8 cannot encode it)")


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tk = tokenizer
        self._chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        ids = set(eos_token_ids)
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            ids.add(tokenizer.token_to_id(eos_token))
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        path = Path(path)
        tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():      # transformers >= 4.43 saves it apart
            template = (path / "chat_template.jinja").read_text()
        return cls(tk, template, _tok_str(cfg.get("bos_token")), _tok_str(cfg.get("eos_token")),
                   eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) map to their ids.

        Through ``encode_batch`` (same ids): HF tokenizers' ``encode`` holds
        Python's GIL for the whole text (seconds on a multi-MB prompt, which
        froze the server's event loop), ``encode_batch`` releases it.

        ``limit``: ValueError, without tokenizing, when `min_tokens` shows the
        text cannot fit in that many tokens (a 4 MB prompt costs seconds of a
        core to tokenize; the server refuses it in microseconds). A text that
        fits is never refused: the bound is below its true count.
        """
        if limit is not None and (least := self.min_tokens(text)) > limit:
            raise ValueError(f"the prompt has at least {least} tokens ({len(text.encode('utf-8'))} bytes, at most "
                             f"{self.max_token_bytes} per token), over the model's context of {limit} tokens")
        return self._tk.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """The most UTF-8 bytes of text one token can stand for (special tokens included), or None when
        the tokenizer has a normalizer (which may drop input characters, so no such bound holds).

        Measured on the decoded vocabulary: byte-level BPE decodes each token to
        exactly the input bytes it covers; a partial UTF-8 byte decodes to U+FFFD
        (3 bytes), which only makes the bound larger, never wrong.
        """
        if self._tk.normalizer is not None:
            return None
        n = self._tk.get_vocab_size(with_added_tokens=True)
        return max(1, max(len(self._tk.decode([i], skip_special_tokens=False).encode("utf-8")) for i in range(n)))

    @functools.cached_property
    def dropped_bytes(self) -> bytes:
        """The UTF-8 bytes this tokenizer drops from its input: a byte-level BPE whose vocabulary lacks a
        byte's symbol has no token for it (SmolLM2's lacks six control characters, e.g. 0x16: ``encode("\x16")``
        is ``[]``). They stand for no token, so `min_tokens` does not count them. Empty for other tokenizers."""
        if "ByteLevel" not in repr(self._tk.pre_tokenizer):
            return b""
        vocab = self._tk.get_vocab(with_added_tokens=False)
        symbols = _byte_symbols()
        return bytes(b for b in range(256) if symbols[b] not in vocab)

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))``: ceil(bytes / `max_token_bytes`), not counting the
        `dropped_bytes` (0 when there is no bound). Invariant, tested on random text:
        ``min_tokens(t) <= len(encode(t))``."""
        if self.max_token_bytes is None:
            return 0
        data = text.encode("utf-8")
        kept = len(data) - sum(data.count(b) for b in self.dropped_bytes)
        return -(-kept // self.max_token_bytes)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render a conversation with the model's chat template (jinja2), as transformers does.

        ``tools`` (OpenAI's function dicts) are passed to the template as ``tools``; a template that
        never reads them (`template_has_tools` False) would drop them, so that is a ValueError.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        if tools and not self.template_has_tools:
            raise ValueError("this model's chat template has no tool format (it never reads `tools`)")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs a 'role' and a 'content', got {m!r}")
        extra = {"tools": tools} if tools else {}
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, text: str | None) -> None:
        """A new template: what was compiled from the old one is dropped."""
        self._chat_template = text
        self.__dict__.pop("_template", None)
        self.__dict__.pop("template_has_tools", None)

    @functools.cached_property
    def _template(self):
        """The chat template, compiled once (a fresh jinja environment per render also left cyclic
        garbage behind every request)."""
        return _template_env().from_string(self.chat_template)

    @functools.cached_property
    def template_has_tools(self) -> bool:
        """Whether the chat template reads a ``tools`` variable (has its own tool format), from its AST."""
        if not self.chat_template:
            return False
        import jinja2.meta
        return "tools" in jinja2.meta.find_undeclared_variables(_template_env().parse(self.chat_template))


def _tok_str(tok: Any) -> str | None:
    if isinstance(tok, dict):     # {"content": "<|im_end|>", ...} in older configs
        return tok.get("content")
    return tok


def _template_env():
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env


def _raise(message: str):
    raise ValueError(message)


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet (what HF's ``ByteLevel`` pre-tokenizer maps each byte to): byte b -> its
    symbol. Printable bytes stand for themselves; the others are shifted past 255, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]
