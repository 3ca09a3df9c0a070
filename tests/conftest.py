"""Shared fixtures: the real default model, its transformers twin, tiny random models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 on CPU, via minisys's own loader."""
    from minisys.model import load
    return load(None, device="cpu", dtype=torch.float32, quiet=True)


@pytest.fixture(scope="session")
def smol_gguf_path() -> Path:
    from minisys.model.store import fetch_gguf
    return fetch_gguf(quiet=True)


@pytest.fixture(scope="session")
def hf_smol(smol_gguf_path):
    """The same GGUF loaded by Hugging Face transformers: the independent oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    d, f = str(smol_gguf_path.parent), smol_gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, tok


def save_tiny_hf_model(path: Path, model_type: str, seed: int = 0, tie: bool = False, **sizes) -> Path:
    """Save a small random Llama/Qwen2 with transformers' save_pretrained (plus SmolLM2-like tokenizer files);
    ``sizes`` override config fields (e.g. ``max_position_embeddings`` for long generations)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    fields = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=10000.0)
    cfg = AutoConfig.for_model(model_type, **{**fields, **sizes})
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():   # random non-zero biases so that Qwen2's q/k/v bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    _write_tiny_tokenizer(path, 512)
    return path


def _write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE whose vocabulary fits the tiny model (256 bytes + merges + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tk.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def save_tiny_model():
    """`save_tiny_hf_model` itself, for a module that needs other sizes (``import conftest`` is ambiguous:
    tests/labs has a conftest too)."""
    return save_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{name: directory} of tiny random HF checkpoints: llama (untied), llama (tied), qwen2."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": save_tiny_hf_model(root / "llama", "llama", seed=1),
        "llama-tied": save_tiny_hf_model(root / "llama-tied", "llama", seed=2, tie=True),
        "qwen2": save_tiny_hf_model(root / "qwen2", "qwen2", seed=3),
    }


@pytest.fixture(scope="session")
def tiny_app(tiny_dirs):
    """A factory: ``with tiny_app(key, chat_template=None, app_args={}, **engine_config) as (client, llm)``
    serves the tiny llama in process (FastAPI's TestClient over `build_app` and `AsyncLLMEngine`)."""
    from contextlib import contextmanager

    from fastapi.testclient import TestClient

    from minisys.engine.config import EngineConfig
    from minisys.llm import LLM
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    @contextmanager
    def make(key: str, chat_template: str | None = None, app_args: dict | None = None, **engine_config):
        config = {"num_kv_blocks": 64, "max_num_seqs": 4, **engine_config}
        llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
                  engine_config=EngineConfig(**config))
        if chat_template is not None:
            llm.tokenizer.chat_template = chat_template
        with TestClient(build_app(AsyncLLMEngine(llm.engine), llm.tokenizer, "tiny", api_key=key,
                                  **(app_args or {}))) as client:
            yield client, llm
    return make


@pytest.fixture(scope="module")
def smol_paged(smol):
    """The real model with the paged attention backend for this module (put back after it)."""
    model, tok = smol
    old = model.attention
    model.set_attention_backend("paged")
    yield model, tok
    model.set_attention_backend(old)


@pytest.fixture(scope="session")
def graded_student_notebook():
    """``grade(labs/NN-....ipynb)`` of an untouched student notebook, graded once per session.

    The lab pipeline (stubs score zero) and the grader's attack tests (an attack scores no more
    than the honest stubs) both need this report; grading is deterministic for the same file,
    so they share one run instead of grading each notebook twice.
    """
    from minisys.grading.grader import grade
    cache: dict[Path, object] = {}

    def get(path: Path):
        path = Path(path).resolve()
        if path not in cache:
            cache[path] = grade(path)
        return cache[path]
    return get


@pytest.fixture(scope="session")
def kv_hosts(tiny_dirs):
    """Two tiny-model engines in two processes joined by one gloo KV group (lesson 14; shared by
    tests/test_kv_transfer.py and tests/test_migration.py: started once)."""
    from minisys.cluster.engine_host import EngineHosts
    from tests.kv_cluster_helpers import HOST_CONFIG
    with EngineHosts(tiny_dirs["llama"], 2, HOST_CONFIG) as h:
        yield h


@pytest.fixture(scope="session")
def kv_replicas():
    """Two SmolLM2 replica servers (1 thread each) on one gloo KV group: their URLs (lesson 14)."""
    from tests.kv_cluster_helpers import two_replicas
    with two_replicas(["--num-kv-blocks", "256"]) as urls:
        yield urls


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test on tiny models or shapes: on a shared 2-core machine two threads mostly
    wait for each other. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
